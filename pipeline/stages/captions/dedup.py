"""Exact and near-duplicate removal as shuffles over partition files, for millions of captions.

The phases are plain functions of small arguments that read and write files in the work folder (`workfiles`), so
the same code runs in this process or as Ray Data tasks (`executors.execute`); none holds more than one partition.

1. Exact: the read phase writes each chunk's (key hash, row, caption id) split by `key hash % parts`;
   `exact_partition` finds, per key, the first row in input order (global row number) and lists the others.
2. Signatures (`near_signatures`, per chunk, rows that survived step 1): word tokens (kept in a token store for
   verification), MinHash LSH band keys of word n-grams, and deletion keys (`textsig.deletion_keys`) of captions of
   at least min(`edit_words`, `change_words`) words; every key is salted with the caption's metadata hash
   (captions describing different GenEval scenes are never duplicates) and written to partition `key % parts`.
3. Buckets (`near_partition`): rows sharing a key are candidates. LSH buckets are sorted by (length, row) and each
   member is paired with the next `window` members only, so a hot bucket (a template phrase shared by thousands of
   captions) costs O(size x window), not O(size^2). Deletion-key groups are exact (every member is one word from
   every other), so each member is linked to the group's first, O(size), and the edge carries the group (its word
   position). Equal deletion keys with the same deleted word at adjacent positions are adjacent transpositions
   ("a red big car" / "a big red car"; `textsig.transposition_pairs`), linked in position order, O(size).
   Candidates are verified vectorised: word edit distance 1 (a transposition counts as one edit): a word inserted /
   deleted or two adjacent words swapped with both captions >= `edit_words` words, or a word changed with both >=
   `change_words` words (a changed word alters content more often: "a red car" / "a blue car"; a swap keeps every
   word), or word n-gram Jaccard >= `threshold`.
4. `keep_first` over the verified edges, in input order: a row is removed when a kept earlier row is its near
   duplicate. Nothing is removed through a chain: connected components removed "a photo of a golden helicopter"
   because "a photo of a golden" (a near duplicate of it) was one of "a photo of a golden guitar".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import workfiles as wf
from pipeline.stages.captions import textsig

CHUNKS, EXACT, EXACT_OUT, TOKENS, NEAR, EDGES = "chunks", "exact", "exact-out", "tokens", "near", "edges"


@dataclass(frozen=True)
class NearDupSettings:
    """The near-duplicate rules and their LSH parameters."""

    threshold: float = 0.8  # word n-gram Jaccard that makes a near duplicate
    ngram: int = 2
    edit_words: int = 8  # a word inserted / deleted, or two adjacent words swapped: a near duplicate from this many
    change_words: int = 12  # a word changed (substituted) is one when both captions have this many words
    num_perm: int = 60
    window: int = 8  # LSH bucket members are compared with the next `window` members by length
    sig_keep: int = 32  # MinHash values kept per caption to skip pairs far below the threshold before exact Jaccard
    seed: int = 0
    parts: int = 8


def chunk_file(work: str | Path, chunk: int) -> Path:
    """The cleaned rows of input chunk `chunk`."""
    return wf.work_path(work, CHUNKS, f"c{chunk:05d}.arrow")


# ------------------------------------------------------------------------------------------------------ exact


def write_exact_pieces(
    work: str | Path, chunk: int, rows: np.ndarray, key_hash: np.ndarray, cid: np.ndarray, parts: int
) -> None:
    """The exact-duplicate shuffle: candidate rows (key hash, local row, caption id) split by key hash."""
    part = (key_hash % np.uint64(parts)).astype(np.int64)
    for p in range(parts):
        m = part == p
        wf.save_arrays(wf.work_path(work, EXACT, wf.piece(chunk, p)), key=key_hash[m], row=rows[m], cid=cid[m])


def exact_partition(work: str, part: int, offsets: list[int]) -> dict:
    """Exact duplicates of partition `part`: per key, rows after the first (input order) -> `exact-out/p<part>`."""
    keys, rows, cids = [], [], []
    for c in range(len(offsets) - 1):
        a = wf.load_arrays(wf.work_path(work, EXACT, wf.piece(c, part)))
        keys.append(a["key"])
        rows.append(a["row"] + offsets[c])  # global row number = input order
        cids.append(a["cid"])
    key, row, cid = np.concatenate(keys), np.concatenate(rows), np.concatenate(cids)
    order = np.lexsort((row, key))
    key, row, cid = key[order], row[order], cid[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    winner = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0)) if len(key) else np.zeros(0, np.int64)
    dup = ~first
    path = wf.work_path(work, EXACT_OUT, f"p{part:03d}.npz")
    wf.save_arrays(path, row=row[dup], winner=row[winner[dup]], winner_cid=cid[winner[dup]])
    return {"part": part, "dups": int(dup.sum())}


# -------------------------------------------------------------------------------------------------- signatures


def near_signatures(work: str, chunk: int, offset: int, settings: NearDupSettings, keys: bool = True) -> dict:
    """Tokens (`tokens/c<chunk>`) of chunk `chunk`'s surviving rows (status 0) and, with `keys`, their LSH band keys
    and deletion keys, split into partitions (`near/c<chunk>-p<part>`)."""
    import pyarrow.compute as pc

    table = wf.read_arrow(chunk_file(work, chunk), ["key", "meta_hash"])
    local = np.flatnonzero(np.asarray(wf.load_npy(Path(work) / "status.npy")[offset : offset + len(table)]) == 0)
    tokens, offsets = textsig.tokenize(pc.take(table.column("key"), local))
    rows, lengths = local + offset, np.diff(offsets)
    if not keys:
        wf.save_arrays(wf.work_path(work, TOKENS, f"c{chunk:05d}.npz"), row=rows, length=lengths, tokens=tokens)
        return {"chunk": chunk, "rows": len(local), "tokens": len(tokens)}
    salt = table.column("meta_hash").to_numpy()[local]
    bands = settings.num_perm // textsig.lsh_rows(settings.threshold, settings.num_perm)
    shingles, owner = textsig.ngrams(tokens, offsets, settings.ngram)
    sig = textsig.minhash(shingles, owner, len(local), settings.num_perm, settings.seed)
    kept = sig[:, : settings.sig_keep]
    wf.save_arrays(wf.work_path(work, TOKENS, f"c{chunk:05d}.npz"), row=rows, length=lengths, tokens=tokens, sig=kept)
    lsh = textsig.band_keys(sig, bands, salt).reshape(-1)  # (rows * bands,)
    lsh_row = np.repeat(np.arange(len(local)), bands)
    shortest = min([w for w in (settings.edit_words, settings.change_words) if w > 0], default=0)
    long = np.flatnonzero(lengths >= shortest) if shortest else np.zeros(0, np.int64)
    dkey, drow, dpos = textsig.deletion_keys(tokens, offsets, long, salt)
    dword = tokens[offsets[drow] + np.maximum(dpos, 0)] if len(dkey) else np.zeros(0, np.uint64)  # the deleted word
    lsh_part = (lsh % np.uint64(settings.parts)).astype(np.int64)
    del_part = (dkey % np.uint64(settings.parts)).astype(np.int64)
    for p in range(settings.parts):
        m, d = lsh_part == p, del_part == p
        wf.save_arrays(
            wf.work_path(work, NEAR, wf.piece(chunk, p)),
            **{"lsh_key": lsh[m], "lsh_row": rows[lsh_row[m]], "lsh_len": lengths[lsh_row[m]]},
            **{"del_key": dkey[d], "del_row": rows[drow[d]], "del_pos": dpos[d], "del_word": dword[d]},
        )
    return {"chunk": chunk, "rows": len(local), "tokens": len(tokens), "lsh": len(lsh), "deletion": len(dkey)}


def build_token_store(work: str, n_chunks: int, n_rows: int) -> None:
    """Concatenate the chunks' tokens into `tokens.npy` + `tok_off.npy` (N+1, by global row), memory-mapped."""
    lengths = np.zeros(n_rows, np.int64)
    for c in range(n_chunks):
        a = wf.load_arrays(wf.work_path(work, TOKENS, f"c{c:05d}.npz"))
        lengths[a["row"]] = a["length"]
    off = np.concatenate([[0], np.cumsum(lengths)])
    wf.save_npy(Path(work) / "tok_off.npy", off)
    store = np.lib.format.open_memmap(Path(work) / "tokens.npy", mode="w+", dtype=np.uint64, shape=(int(off[-1]),))
    for c in range(n_chunks):
        a = wf.load_arrays(wf.work_path(work, TOKENS, f"c{c:05d}.npz"))
        if len(a["row"]):
            store[off[a["row"][0]] : off[a["row"][0]] + len(a["tokens"])] = a["tokens"]
    store.flush()
    del store
    if "sig" in a:  # the MinHash prefixes, by global row (zeros for removed rows)
        sig = np.lib.format.open_memmap(
            Path(work) / "sig.npy", mode="w+", dtype=np.uint32, shape=(n_rows, a["sig"].shape[1])
        )
        for c in range(n_chunks):
            b = wf.load_arrays(wf.work_path(work, TOKENS, f"c{c:05d}.npz"))
            sig[b["row"]] = b["sig"]
        sig.flush()
        del sig


def token_store(work: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets by global row) of the token store, memory-mapped."""
    return wf.load_npy(Path(work) / "tokens.npy"), np.asarray(wf.load_npy(Path(work) / "tok_off.npy"))


# ----------------------------------------------------------------------------------------------------- buckets


def near_partition(work: str, part: int, n_chunks: int, settings: NearDupSettings) -> dict:
    """Candidate pairs of partition `part`'s buckets, verified -> `edges/p<part>.npz` (a < b, global rows)."""
    cols: dict[str, list[np.ndarray]] = {}
    for c in range(n_chunks):
        for k, v in wf.load_arrays(wf.work_path(work, NEAR, wf.piece(c, part))).items():
            cols.setdefault(k, []).append(v)
    a = {k: np.concatenate(v) for k, v in cols.items()}
    lsh_a, lsh_b, hot = window_pairs(a["lsh_key"], a["lsh_row"], a["lsh_len"], settings.window)
    del_a, del_b, del_pos = deletion_pairs(a["del_key"], a["del_row"], a["del_pos"])
    tr_a, tr_b = textsig.transposition_pairs(a["del_key"], a["del_word"], a["del_row"], a["del_pos"])
    pa, pb = np.concatenate([lsh_a, tr_a, del_a]), np.concatenate([lsh_b, tr_b, del_b])
    pos = np.concatenate([np.full(len(lsh_a) + len(tr_a), -1, np.int64), del_pos])
    lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
    m = lo != hi
    pair, pos = (lo[m].astype(np.uint64) << np.uint64(32)) | hi[m].astype(np.uint64), pos[m]
    order = np.lexsort((-pos, pair))  # one edge per pair; a substitution group's edge (pos >= 0) first
    pair, pos = pair[order], pos[order]
    first = np.r_[True, pair[1:] != pair[:-1]] if len(pair) else np.zeros(0, bool)
    pair, pos = pair[first], pos[first]
    lo, hi = (pair >> np.uint64(32)).astype(np.int64), (pair & np.uint64(0xFFFFFFFF)).astype(np.int64)
    sig = wf.load_npy(Path(work) / "sig.npy")
    ok = verify(*token_store(work), lo, hi, settings, sig)
    wf.save_arrays(wf.work_path(work, EDGES, f"p{part:03d}.npz"), a=lo[ok], b=hi[ok], pos=pos[ok])
    return {"part": part, "candidates": len(pair), "edges": int(ok.sum()), "hot_buckets": hot}


def window_pairs(key: np.ndarray, row: np.ndarray, length: np.ndarray, window: int) -> tuple:
    """LSH bucket candidates: members sorted by (length, row), each paired with the next `window` in its bucket.

    Returns (a rows, b rows, number of buckets larger than window + 1, i.e. capped)."""
    order = np.lexsort((row, length, key))
    k, r = key[order], row[order]
    a, b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for d in range(1, window + 1):
        idx = np.flatnonzero(k[d:] == k[:-d])
        if not len(idx):
            break
        a.append(r[idx])
        b.append(r[idx + d])
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    hot = int((np.diff(np.r_[starts, len(k)]) > window + 1).sum())
    return np.concatenate(a), np.concatenate(b), hot


def deletion_pairs(key: np.ndarray, row: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deletion-key candidates (a rows, b rows, word position): equal (key, position) -> substitutions, linked to the
    group's first member a, with the position; a caption's own key (`FULL`) equal to others' deletion keys ->
    insertions, linked to it, position -1. O(group size)."""
    order = np.lexsort((row, pos, key))
    k, r, p = key[order], row[order], pos[order]
    idx = np.arange(len(k))
    new_key = np.r_[True, k[1:] != k[:-1]] if len(k) else np.zeros(0, bool)
    new_group = new_key | np.r_[True, p[1:] != p[:-1]] if len(k) else new_key
    group_first = np.maximum.accumulate(np.where(new_group, idx, 0)) if len(k) else idx
    key_first = np.maximum.accumulate(np.where(new_key, idx, 0)) if len(k) else idx
    sub = ~new_group & (p >= 0)
    ins = ~new_key & (p[key_first] == textsig.FULL) & (p >= 0)
    return (
        np.r_[r[group_first[sub]], r[key_first[ins]]],
        np.r_[r[sub], r[ins]],
        np.r_[p[sub], np.full(ins.sum(), -1, p.dtype)],
    )


def verify(
    tokens: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, s: NearDupSettings, sig: np.ndarray | None
) -> np.ndarray:
    """Which pairs are near duplicates: a word inserted / deleted or two adjacent words swapped (both >= `edit_words`
    words), a word changed (both >= `change_words` words), or word n-gram Jaccard >= `threshold` (computed exactly,
    for the pairs whose MinHash prefixes `sig` agree on at least threshold - 0.25: 3.5 standard errors below at 32
    values)."""
    la, lb = offsets[a + 1] - offsets[a], offsets[b + 1] - offsets[b]
    ok = np.zeros(len(a), bool)
    if s.edit_words > 0 or s.change_words > 0:
        one = np.flatnonzero(textsig.pair_edits(tokens, offsets, a, b) <= 1)
        changed = la[one] == lb[one]
        changed[changed] = ~textsig.pair_transposed(tokens, offsets, a[one][changed], b[one][changed])
        need = np.where(changed, s.change_words or 1 << 30, s.edit_words or 1 << 30)
        ok[one] = np.minimum(la[one], lb[one]) >= need
    todo = np.flatnonzero(~ok)
    if sig is not None and len(todo):
        est = np.concatenate([(sig[a[c]] == sig[b[c]]).mean(1) for c in np.array_split(todo, len(todo) // 65_536 + 1)])
        todo = todo[est >= s.threshold - 0.25]
    if len(todo):
        ok[todo] = textsig.pair_jaccard(tokens, offsets, a[todo], b[todo], s.ngram) >= s.threshold - 1e-9
    return ok


def keep_first(n: int, a: np.ndarray, b: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Greedy in input order: a row is removed when a kept earlier row is its near duplicate -> (n,) the kept row
    each row duplicates (the smallest; itself where kept).

    Edges (a, b, pos) with pos >= 0 are the stars of substitution groups (captions equal but for word `pos`,
    pairwise near duplicates) around their first row; a group counts as the clique it is: its first kept member is
    what its later members duplicate. No two kept rows are joined by an edge or a group, and every removed row is a
    near duplicate of the kept row it names (no chain: in x ~ y ~ z with x, z far apart, z stays when y goes).
    """
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    sub = pos >= 0
    gkey = lo[sub] * 65_536 + pos[sub].astype(np.int64)  # a group = (its first row, the position)
    groups, g = np.unique(gkey, return_inverse=True)
    # events by row: (row, 0, an earlier neighbour) per plain edge, (row, 1, group) per group member
    row = np.concatenate([hi[~sub], groups // 65_536, hi[sub]])
    kind = np.r_[np.zeros(len(row) - len(groups) - len(g), np.int64), np.ones(len(groups) + len(g), np.int64)]
    other = np.concatenate([lo[~sub], np.arange(len(groups)), g])
    order = np.lexsort((other, kind, row))
    row, kind, other = row[order].tolist(), kind[order].tolist(), other[order].tolist()
    removed: dict[int, int] = {}  # removed row -> the kept row it duplicates
    owner = [-1] * len(groups)  # a group's first kept member
    i = 0
    while i < len(row):
        y, best, member_of = row[i], -1, []
        while i < len(row) and row[i] == y:
            x = other[i] if kind[i] == 0 else owner[other[i]]
            if kind[i]:
                member_of.append(other[i])
            if x >= 0 and x not in removed and (best < 0 or x < best):
                best = x
            i += 1
        if best >= 0:
            removed[y] = best
        else:
            for k in member_of:
                owner[k] = y
    keeper = np.arange(n, dtype=np.int64)
    keeper[list(removed)] = list(removed.values())
    return keeper


def load_edges(work: str | Path, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All verified edges (a, b, substitution group position or -1) of the bucket phase."""
    edges = [wf.load_arrays(wf.work_path(work, EDGES, f"p{p:03d}.npz")) for p in range(parts)]
    return tuple(np.concatenate([e[k] for e in edges]) for k in ("a", "b", "pos"))
