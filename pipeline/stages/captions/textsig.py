"""Vectorised text signatures for de-duplication and diversity: token hashes, n-grams, MinHash, deletion keys.

Captions arrive as de-duplication keys (lower-case words joined by single spaces, `diversity.dedup_key`) and leave
as flat numpy arrays: `tokens` (u64 hash per word) with `offsets` (N+1), so that N captions cost a few arrays, not
N Python lists. All hashes are stable across processes (blake2b for strings, fixed mixers for numbers), so Ray
workers and the driver agree on them.

- `minhash` / `band_keys`: MinHash of word n-gram shingles and its LSH bands (the Jaccard near-duplicate rule).
- `deletion_keys`: the hash of each caption and of each caption with one word deleted. Two captions one word apart
  (substitution, insertion or deletion) share such a key, so grouping by key finds every such pair exactly, with
  no pairwise comparison (an LSH family for word edit distance 1, the short-caption near-duplicate rule).
  Two captions with adjacent words swapped share a deletion key with the same deleted word at adjacent positions
  (`transposition_pairs`).
- `pair_edits` (a transposition counts as one edit) / `pair_transposed` / `pair_jaccard`: verification of
  candidate pairs, vectorised over pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

U64 = np.uint64
_BASE = U64(0x9E3779B97F4A7C15 | 1)  # odd, so invertible mod 2^64
_BASE_INV = U64(pow(int(_BASE), -1, 1 << 64))
FULL = -1  # `deletion_keys` position of the whole caption


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on u64 (wrapping arithmetic): a stable, well-mixed hash of integers."""
    x = np.asarray(x, U64) + U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def hash_strings(values: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes (blake2b) of strings -> (N,) u64."""
    out = np.empty(len(values), U64)
    for i, v in enumerate(values):
        out[i] = int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little")
    return out


def tokenize(keys: pa.Array | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """De-duplication keys -> (token hashes (T,) u64, offsets (N+1,) int64); caption i is tokens[off[i]:off[i+1]]."""
    keys = pa.array(keys, pa.string()) if not isinstance(keys, pa.Array) else keys.cast(pa.string())
    lists = pc.split_pattern(keys, " ")
    flat = pc.list_flatten(lists)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = pc.equal(pc.utf8_length(keys), 0).to_numpy(zero_copy_only=False)
    if empty.any():  # "" splits into one empty token; it has none
        lengths[empty] = 0
        flat = flat.filter(pc.not_equal(flat, ""))
    enc = pc.dictionary_encode(flat)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    vocab = hash_strings(enc.dictionary.to_pylist())  # one blake2b per distinct word
    tokens = vocab[enc.indices.to_numpy(zero_copy_only=False)] if len(flat) else np.zeros(0, U64)
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def owners(offsets: np.ndarray) -> np.ndarray:
    """The caption index of every token position -> (T,) int64."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def ngrams(
    tokens: np.ndarray, offsets: np.ndarray, n: int, whole_if_short: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of each caption -> (hashes u64, owner int64), in caption order. A caption shorter
    than n (but not empty) gives one gram of all its words (`whole_if_short`, the shingles), or none (distinct-n)."""
    lengths = np.diff(offsets)
    h = tokens.copy()
    own = owners(offsets)
    pos = np.arange(len(tokens)) - offsets[own]  # position in the caption
    for k in range(1, n):  # h[g] = mix of tokens g .. g+k, valid where g+k stays inside the caption
        nxt = np.zeros_like(h)
        nxt[:-k] = tokens[k:]
        h = splitmix64(h * U64(31) ^ nxt)
    keep = pos + n <= lengths[own]
    short = (lengths < n) & (lengths > 0)
    if (
        whole_if_short and short.any()
    ):  # the whole caption is its single gram: the last valid window is its first position
        whole = np.zeros(len(tokens), bool)
        whole[offsets[:-1][short]] = True
        h[whole] = _short_gram(tokens, offsets, np.flatnonzero(short), n)
        keep |= whole
    return h[keep], own[keep]


def _short_gram(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """The gram hash of captions shorter than n: their tokens mixed in order, padded with zeros to n."""
    h = np.zeros(len(rows), U64)
    for k in range(n):
        idx = offsets[rows] + k
        tok = np.where(idx < offsets[rows + 1], tokens[np.minimum(idx, len(tokens) - 1)], U64(0))
        h = tok if k == 0 else splitmix64(h * U64(31) ^ tok)
    return h


def minhash(shingles: np.ndarray, owner: np.ndarray, n_rows: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures (n_rows, num_perm) u32 of shingle sets given as (hash, owner) sorted by owner.

    Hash p is multiply-add-shift on the 32-bit folded shingle: ((a_p x + b_p) mod 2^64) >> 32, strongly universal.
    Every row must own at least one shingle.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 63, num_perm, dtype=U64) | U64(1)
    b = rng.integers(0, 1 << 63, num_perm, dtype=U64)
    x = (shingles >> U64(32)) ^ (shingles & U64(0xFFFFFFFF))
    starts = np.searchsorted(owner, np.arange(n_rows))
    sig = np.empty((n_rows, num_perm), np.uint32)
    for p in range(num_perm):  # one pass per permutation keeps memory at one shingle-length vector
        hp = ((a[p] * x + b[p]) >> U64(32)).astype(np.uint32)
        sig[:, p] = np.minimum.reduceat(hp, starts) if len(hp) else 0
    return sig


def band_keys(sig: np.ndarray, bands: int, salt: np.ndarray | None = None) -> np.ndarray:
    """LSH band keys (n_rows, bands) u64: each band's `rows` signature values hashed with the band number (and
    an optional per-row `salt`, e.g. a metadata hash, so only captions with equal salts can collide)."""
    n, num_perm = sig.shape
    rows = num_perm // bands
    out = np.empty((n, bands), U64)
    for k in range(bands):
        h = splitmix64(np.full(n, k, U64))
        for j in range(k * rows, (k + 1) * rows):
            h = splitmix64(h ^ sig[:, j].astype(U64))
        out[:, k] = h if salt is None else splitmix64(h ^ salt)
    return out


def lsh_rows(threshold: float, num_perm: int) -> int:
    """Rows per band: the most for which a pair at Jaccard `threshold` still collides in some band with p >= 0.99."""
    best = 1
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands >= 1 and 1 - (1 - threshold**rows) ** bands >= 0.99:
            best = rows
    return best


def deletion_keys(
    tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, salt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of each caption in `rows` and of its one-word deletions -> (keys u64, row int64, pos int16).

    Caption r emits its own key (pos `FULL`) and one per word position p (the caption without word p). Equal keys
    at equal p: the two captions differ in word p only; a `FULL` key equal to another's deletion key: one word
    inserted. `salt` (per caption, e.g. a metadata hash) is mixed in, so only equal salts collide. Hashing is
    polynomial in the token hashes mod 2^64, computed for all prefixes at once with the inverse base (O(tokens)).
    """
    n_tok = len(tokens)
    pw = np.cumprod(np.full(n_tok + 1, _BASE, U64)) * _BASE_INV  # pw[g] = B^g
    ipw = np.cumprod(np.full(n_tok + 1, _BASE_INV, U64)) * _BASE  # ipw[g] = B^-g
    csum = np.zeros(n_tok + 1, U64)
    np.cumsum(tokens * ipw[:n_tok], out=csum[1:])  # csum[g] = sum_{h<g} t_h B^-h

    def power(k: np.ndarray) -> np.ndarray:  # B^k for k >= -1
        return np.where(k >= 0, pw[np.maximum(k, 0)], _BASE_INV)

    s, e = offsets[rows], offsets[rows + 1]
    full = power(e - 1) * (csum[e] - csum[s])
    lengths = e - s
    rep = np.repeat(np.arange(len(rows)), lengths)
    p = _ranges(s, lengths)  # every token position of the rows
    dele = power(e[rep] - 2) * (csum[p] - csum[s[rep]]) + power(e[rep] - 1) * (csum[e[rep]] - csum[p + 1])
    keys = np.concatenate([_seal(full, lengths, salt[rows]), _seal(dele, lengths[rep] - 1, salt[rows][rep])])
    row = np.concatenate([rows, rows[rep]])
    pos = np.concatenate([np.full(len(rows), FULL, np.int16), (p - s[rep]).astype(np.int16)])
    return keys, row.astype(np.int64), pos


def _seal(h: np.ndarray, length: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Finish a polynomial hash: mix in the sequence length and the salt."""
    return splitmix64(splitmix64(h + splitmix64(length.astype(U64))) ^ salt)


def _first_mismatch(eq: np.ndarray, rep: np.ndarray, k: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per pair, the first k where `eq` is False (m where there is none); `rep` is sorted."""
    out = m.copy()
    bad = np.flatnonzero(~eq)
    if len(bad):
        first = np.r_[True, rep[bad][1:] != rep[bad][:-1]]
        out[rep[bad][first]] = k[bad][first]
    return out


def _edit_ends(
    tokens: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the pairs whose lengths are within one (`near`): starts, lengths, and the common prefix / suffix lengths
    (capped at the shorter caption)."""
    sa, sb = offsets[a], offsets[b]
    la, lb = offsets[a + 1] - sa, offsets[b + 1] - sb
    near = np.flatnonzero(np.abs(la - lb) <= 1)
    sa, sb, la, lb = sa[near], sb[near], la[near], lb[near]
    m = np.minimum(la, lb)
    rep = np.repeat(np.arange(len(near)), m)
    k = np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
    pre = _first_mismatch(tokens[sa[rep] + k] == tokens[sb[rep] + k], rep, k, m)
    suf = _first_mismatch(tokens[sa[rep] + la[rep] - 1 - k] == tokens[sb[rep] + lb[rep] - 1 - k], rep, k, m)
    return near, sa, sb, la, lb, pre, suf


def _swapped(*ends: np.ndarray) -> np.ndarray:
    """From (tokens, and `_edit_ends`' sa, sb, la, lb, pre, suf): equal lengths, all words equal but those at
    positions pre and pre + 1, and those two swapped."""
    tokens, sa, sb, la, lb, pre, suf = ends
    two = (la == lb) & (pre + suf == la - 2) & (pre + 1 < la)
    i = np.minimum(pre, np.maximum(la - 2, 0))  # in range everywhere; only `two` pairs count
    ok = two & (la >= 2)
    x0, x1 = tokens[np.where(ok, sa + i, 0)], tokens[np.where(ok, sa + i + 1, 0)]
    y0, y1 = tokens[np.where(ok, sb + i, 0)], tokens[np.where(ok, sb + i + 1, 0)]
    return ok & (x0 == y1) & (x1 == y0)


def pair_edits(tokens: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Word edit distance of caption pairs (a[i], b[i]), an adjacent transposition counting as one edit (optimal
    string alignment), capped at 2 -> (P,) int8 in {0, 1, 2 (= 2 or more)}.

    d <= 1 iff the common prefix and the common suffix together cover the shorter caption (lengths within one), or
    the lengths are equal and the only two differing words are adjacent and swapped.
    """
    out = np.full(len(a), 2, np.int8)
    near, sa, sb, la, lb, pre, suf = _edit_ends(tokens, offsets, a, b)
    if not len(near):
        return out
    m = np.minimum(la, lb)
    need = np.where(la == lb, la - 1, m)
    d = np.where((la == lb) & (pre == la), 0, np.where(pre + suf >= need, 1, 2))
    if len(tokens):
        d[(d == 2) & _swapped(tokens, sa, sb, la, lb, pre, suf)] = 1
    out[near] = d
    return out


def pair_transposed(tokens: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether caption b[i] is caption a[i] with two adjacent (different) words swapped -> (P,) bool."""
    out = np.zeros(len(a), bool)
    if not len(tokens):
        return out
    near, sa, sb, la, lb, pre, suf = _edit_ends(tokens, offsets, a, b)
    out[near] = _swapped(tokens, sa, sb, la, lb, pre, suf)
    return out


def transposition_pairs(
    key: np.ndarray, word: np.ndarray, row: np.ndarray, pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a rows, b rows) of adjacent transpositions from `deletion_keys` (key, the deleted word's
    token, row, position): "... x y ..." without x at p equals "... y x ..." without x at p + 1, so equal (key,
    deleted word) at positions p and p + 1 is such a pair. Members sorted by (key + word, position, row), each
    paired with the next when the position is one more. O(keys); every candidate still goes through `verify`."""
    m = pos >= 0
    k = splitmix64(key[m] ^ splitmix64(word[m]))
    r, p = row[m], pos[m].astype(np.int64)
    order = np.lexsort((r, p, k))
    k, r, p = k[order], r[order], p[order]
    nxt = np.flatnonzero((k[1:] == k[:-1]) & (p[1:] == p[:-1] + 1) & (r[1:] != r[:-1]))  # "x x": not a pair
    return r[nxt], r[nxt + 1]


def pair_jaccard(tokens: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Exact Jaccard similarity of the word n-gram sets of caption pairs (a[i], b[i]) -> (P,) float32."""
    if not len(a):
        return np.zeros(0, np.float32)
    rows, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    loc_tok, loc_off = gather(tokens, offsets, rows)
    h, own = ngrams(loc_tok, loc_off, n)
    order = np.lexsort((h, own))
    h, own = h[order], own[order]
    first = np.r_[True, (h[1:] != h[:-1]) | (own[1:] != own[:-1])]
    h, own = h[first], own[first]  # each caption's gram set, sorted
    set_off = np.searchsorted(own, np.arange(len(rows) + 1))
    ia, ib = inv[: len(a)], inv[len(a) :]
    size_a, size_b = np.diff(set_off)[ia], np.diff(set_off)[ib]
    pid = np.concatenate([np.repeat(np.arange(len(a)), size_a), np.repeat(np.arange(len(a)), size_b)])
    grams = np.concatenate([h[_ranges(set_off[ia], size_a)], h[_ranges(set_off[ib], size_b)]])
    keys = splitmix64(grams ^ splitmix64(pid.astype(U64)))
    order = np.argsort(keys)
    # A (pair, gram) key occurs twice exactly when the gram is in both sets of the pair.
    same = keys[order][1:] == keys[order][:-1]
    both = np.bincount(pid[order][1:][same], minlength=len(a))
    return (both / np.maximum(size_a + size_b - both, 1)).astype(np.float32)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [starts[i], starts[i] + lengths[i])."""
    rep = np.repeat(np.arange(len(starts)), lengths)
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + starts[rep]


def gather(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of captions `rows` as a new (tokens, offsets) pair."""
    lengths = offsets[rows + 1] - offsets[rows]
    return np.asarray(tokens[_ranges(offsets[rows], lengths)]), np.concatenate([[0], np.cumsum(lengths)])
