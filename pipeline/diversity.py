"""Caption cleaning and diversity: normalisation, near-duplicate detection (MinHash), selection, diversity metrics.

Pure functions over lists of strings and numpy arrays; no I/O, no models (embeddings come in as arrays).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter

import numpy as np

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
_PRIME = (1 << 31) - 1  # MinHash universal hashing mod a Mersenne prime: a * x stays below 2^62 in uint64
CHARSETS = ("any", "latin", "ascii")


def normalize(text: str) -> str:
    """NFKC, control characters to spaces, whitespace runs collapsed, stripped."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return _WS.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits)."""
    return _WORD.findall(text.casefold())


def charset_ok(text: str, charset: str) -> bool:
    """Whether every letter of `text` is ASCII (`ascii`), of the Latin script (`latin`), or anything (`any`)."""
    if charset == "any":
        return True
    if charset == "ascii":
        return text.isascii()
    if charset == "latin":
        return all(not c.isalpha() or unicodedata.name(c, "").startswith("LATIN") for c in text)
    raise ValueError(f"unknown --charset {charset!r}: expected one of {CHARSETS}")


def dedup_key(text: str) -> str:
    """Exact-duplicate key: case and punctuation do not make a caption new."""
    return " ".join(words(text))


# ----------------------------------------------------------------------------------------------- near duplicates


def shingles(text: str, n: int) -> set[int]:
    """crc32 hashes of the word n-grams of `text` (the whole text if it has fewer than n words)."""
    toks = words(text)
    grams = [" ".join(toks[i : i + n]) for i in range(max(1, len(toks) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams}


def minhash(shingle_set: set[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (P,) of a shingle set under P hash functions (a * x + b) mod p."""
    x = np.fromiter(shingle_set, np.uint64, len(shingle_set)) % _PRIME  # (S,)
    return ((a[:, None] * x[None, :] + b[:, None]) % _PRIME).min(axis=1)  # (P,)


def near_duplicates(
    texts: list[str], threshold: float = 0.8, ngram: int = 2, num_perm: int = 64, bands: int = 16, seed: int = 0
) -> dict[int, tuple[int, float]]:
    """Near-duplicates in order: {index: (index of the earlier kept text, Jaccard)}; first occurrence wins.

    MinHash + LSH banding proposes candidates; the exact Jaccard similarity of the word n-gram sets decides, so the
    result does not depend on hash luck beyond recall (bands x rows tuned for thresholds >= 0.5).
    """
    if num_perm % bands:
        raise ValueError(f"num_perm {num_perm} is not a multiple of bands {bands}")
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
    b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
    rows = num_perm // bands
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    sets: dict[int, set[int]] = {}
    removed: dict[int, tuple[int, float]] = {}
    for i, text in enumerate(texts):
        sh = shingles(text, ngram)
        sig = minhash(sh, a, b)
        keys = [sig[k * rows : (k + 1) * rows].tobytes() for k in range(bands)]
        candidates = sorted({j for k, key in enumerate(keys) for j in buckets[k].get(key, ())})
        best = max(((len(sh & sets[j]) / len(sh | sets[j]), -j) for j in candidates), default=(0.0, 0))
        if best[0] >= threshold:
            removed[i] = (-best[1], best[0])
            continue
        sets[i] = sh
        for k, key in enumerate(keys):
            buckets[k].setdefault(key, []).append(i)
    return removed


# ----------------------------------------------------------------------------------------------------- embeddings


def hash_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    """A model-free sentence embedding: hashed word unigrams + bigrams, L2-normalised -> (N, dim) float32."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        toks = words(text)
        for g in [*toks, *(f"{x} {y}" for x, y in zip(toks, toks[1:], strict=False))]:
            h = zlib.crc32(g.encode())
            out[i, h % dim] += 1.0 if (h >> 31) & 1 else -1.0  # a sign bit keeps collisions unbiased
    return l2_normalize(out)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (k-means++ seeding) on unit rows: (centroids (k, D), labels (N,))."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centers = [x[rng.integers(n)]]
    dist = 1.0 - x @ centers[0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None) ** 2
        idx = rng.choice(n, p=p / p.sum()) if p.sum() > 0 else rng.integers(n)
        centers.append(x[idx])
        dist = np.minimum(dist, 1.0 - x @ x[idx])
    c = np.stack(centers)
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = (x @ c.T).argmax(1)  # (N,)
        new = np.stack([x[labels == j].sum(0) if (labels == j).any() else c[j] for j in range(k)])
        new = l2_normalize(new)
        if np.allclose(new, c):
            break
        c = new
    return c, labels


def select_random(n_total: int, n: int, seed: int) -> np.ndarray:
    """`n` indices drawn uniformly without replacement, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n_total, size=min(n, n_total), replace=False))


def select_clusters(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices spread evenly over clusters: each gets an equal quota, a small cluster's unused quota goes
    to the others (water-filling); members are drawn at random within a cluster. Sorted."""
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(labels == j)) for j in np.unique(labels)]
    take = np.zeros(len(members), np.int64)
    left = min(n, len(labels))
    while left > 0:
        open_ = [j for j, m in enumerate(members) if take[j] < len(m)]
        share = max(1, left // len(open_))
        for j in open_:
            extra = min(share, len(members[j]) - take[j], left)
            take[j] += extra
            left -= extra
            if left == 0:
                break
    return np.sort(np.concatenate([m[:t] for m, t in zip(members, take, strict=True)]))


def select_farthest(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Greedy farthest-point (k-center) selection on unit rows from a seeded start; O(n N D). Sorted."""
    n = min(n, len(x))
    first = int(np.random.default_rng(seed).integers(len(x)))
    chosen = [first]
    dist = 1.0 - x @ x[first]  # cosine distance to the chosen set, (N,)
    dist[first] = -np.inf
    for _ in range(1, n):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
        dist[chosen] = -np.inf
    return np.sort(np.asarray(chosen, np.int64))


# -------------------------------------------------------------------------------------------------------- metrics


def distinct_ngrams(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over `texts` (distinct-n); 0 when there are none."""
    grams = Counter(tuple(t[i : i + n]) for t in map(words, texts) for i in range(len(t) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean cosine distance over all pairs i != j of unit rows (0 for fewer than 2 rows)."""
    n = len(x)
    if n < 2:
        return 0.0
    s = x.sum(0)
    # sum_{i != j} x_i . x_j = |sum x|^2 - sum |x_i|^2, so no N x N matrix is needed.
    off_diag = float(s @ s - (x * x).sum())
    return 1.0 - off_diag / (n * (n - 1))


def coverage_radius(pool: np.ndarray, selected: np.ndarray) -> float:
    """Mean cosine distance from each pool row to its nearest selected row (lower = the selection covers more)."""
    if len(selected) == 0 or len(pool) == 0:
        return 0.0
    best = np.full(len(pool), -np.inf, np.float32)
    for s in range(0, len(selected), 1024):  # chunks bound the (N, chunk) similarity matrix
        best = np.maximum(best, (pool @ selected[s : s + 1024].T).max(1))
    return float(np.mean(1.0 - best))


def cluster_entropy(counts: np.ndarray) -> float:
    """Normalised entropy of a cluster histogram in [0, 1] (1 = perfectly even)."""
    p = counts[counts > 0] / max(1, counts.sum())
    if len(counts) < 2:
        return 1.0
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))
