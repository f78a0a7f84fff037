"""Caption cleaning and diversity: normalisation, near-duplicate detection (MinHash), selection, diversity metrics.

Pure functions over lists of strings and numpy arrays; no I/O, no models (embeddings come in as arrays).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from pipeline.stages.captions import textsig

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
CHARSETS = ("any", "latin", "ascii")


def normalize(text: str) -> str:
    """NFKC, control characters to spaces, whitespace runs collapsed, stripped."""
    text = unicodedata.normalize("NFKC", text)
    if not text.isprintable():  # only then can it hold control / format characters (category C)
        text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return _WS.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits)."""
    return _WORD.findall(text.casefold())


def normalize_batch(captions: list[str | None]) -> tuple[list[str], list[str], np.ndarray]:
    """`normalize`, `dedup_key` and the word count of many captions (None -> ""): (texts, keys, words (N,)).

    ASCII captions (most) go through Arrow compute kernels; for them NFKC is the identity, casefold is lower and
    a word is [a-z0-9_]+, so the result equals the per-caption functions. Others take the per-caption path.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    texts, keys = [""] * len(captions), [""] * len(captions)
    n_words = np.zeros(len(captions), np.int64)
    fast = [i for i, c in enumerate(captions) if c is not None and c.isascii()]
    if fast:
        arr = pa.array([captions[i] for i in fast], pa.string())
        arr = pc.utf8_trim(pc.replace_substring_regex(arr, r"[\x00-\x20\x7f]+", " "), " ")  # controls, spaces
        key = pc.utf8_trim(pc.replace_substring_regex(pc.ascii_lower(arr), r"[^a-z0-9_]+", " "), " ")
        count = pc.count_substring(key, " ").to_numpy(zero_copy_only=False) + 1
        n_words[fast] = np.where(pc.utf8_length(key).to_numpy(zero_copy_only=False) > 0, count, 0)
        for i, t, k in zip(fast, arr.to_pylist(), key.to_pylist(), strict=True):
            texts[i], keys[i] = t, k
    for i in set(range(len(captions))) - set(fast):
        if captions[i] is not None:
            texts[i] = normalize(captions[i])
            toks = words(texts[i])
            keys[i], n_words[i] = " ".join(toks), len(toks)
    return texts, keys, n_words


def charset_ok(text: str, charset: str) -> bool:
    """Whether every letter of `text` is ASCII (`ascii`), of the Latin script (`latin`), or anything (`any`)."""
    if charset == "any":
        return True
    if charset == "ascii":
        return text.isascii()
    if charset == "latin":
        return text.isascii() or all(not c.isalpha() or unicodedata.name(c, "").startswith("LATIN") for c in text)
    raise ValueError(f"unknown --charset {charset!r}: expected one of {CHARSETS}")


def dedup_key(text: str) -> str:
    """Exact-duplicate key: case and punctuation do not make a caption new."""
    return " ".join(words(text))


# ----------------------------------------------------------------------------------------------------- embeddings


def hash_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    """A model-free sentence embedding: hashed word unigrams + bigrams, L2-normalised -> (N, dim) float32."""
    tokens, offsets = textsig.tokenize([dedup_key(t) for t in texts])
    return hash_embed_tokens(tokens, offsets, dim)


def hash_embed_tokens(tokens: np.ndarray, offsets: np.ndarray, dim: int = 256) -> np.ndarray:
    """`hash_embed` of tokenised captions (`textsig.tokenize`): each gram adds +-1 at its hash mod `dim`."""
    n = len(offsets) - 1
    bi, bi_owner = textsig.ngrams(tokens, offsets, 2, whole_if_short=False)
    grams = np.concatenate([textsig.splitmix64(tokens), textsig.splitmix64(bi)])
    owner = np.concatenate([textsig.owners(offsets), bi_owner])
    sign = np.where(grams >> np.uint64(63), 1.0, -1.0)  # a sign bit keeps collisions unbiased
    flat = owner * dim + (grams % np.uint64(dim)).astype(np.int64)
    out = np.bincount(flat, weights=sign, minlength=n * dim).reshape(n, dim)
    return l2_normalize(out)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (k-means++ seeding) on unit rows: (centroids (k, D), labels (N,)).

    For large sets fit it on a sample and label the rest with `assign` (what `build-captions` does).
    """
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
    for _ in range(iters):
        labels = assign(x, c)
        new = l2_normalize(_cluster_sums(x, labels, c))
        if np.allclose(new, c):
            break
        c = new
    return c, assign(x, c)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Per-cluster sums of rows (k, D); an empty cluster keeps its old centre."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(x), np.float32), (labels, np.arange(len(x)))), shape=(len(old), len(x)))
    out = np.asarray(onehot @ x)  # (k, D)
    empty = np.bincount(labels, minlength=len(old)) == 0
    out[empty] = old[empty]
    return out


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """The nearest centroid (largest dot product) of each unit row -> (N,) int64."""
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = (x[s : s + chunk] @ centroids.T).argmax(1)  # (chunk, k)
    return out


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
    tokens, offsets = textsig.tokenize([dedup_key(t) for t in texts])
    grams, _ = textsig.ngrams(tokens, offsets, n, whole_if_short=False)
    return len(np.unique(grams)) / len(grams) if len(grams) else 0.0


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean cosine distance over all pairs i != j of unit rows (0 for fewer than 2 rows)."""
    n = len(x)
    if n < 2:
        return 0.0
    s = x.sum(0, dtype=np.float64)
    # sum_{i != j} x_i . x_j = |sum x|^2 - sum |x_i|^2, so no N x N matrix is needed.
    off_diag = float(s @ s - (x.astype(np.float64) ** 2).sum())
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
