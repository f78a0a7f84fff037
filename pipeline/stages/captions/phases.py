"""The per-chunk phases of `build-captions`: read + clean, embed, label, finalise (rejects + statistics), shards.

Each phase is a plain function of small arguments (a chunk number, its first global row, settings) that reads and
writes files in the work folder and returns small metadata, so the runner's executor (`executors.execute`) runs it in
this process or as a Ray Data task; `write_shard` publishes with the runner's writer (`runner.publish_shard`).
Global per-row state (status, cluster, selection) lives in `.npy` arrays the driver writes and the tasks
memory-map. A chunk is the rows of one `ReadTask`, in input order; global row = chunk offset + local row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import runner, shards
from pipeline.core import workfiles as wf
from pipeline.core.storage import Storage
from pipeline.io.caption_sources import READ_ERRORS, ReadTask, field_counts, read_task
from pipeline.stages.captions import dedup, textsig
from pipeline.stages.captions import diversity as dv

FILTERS = ("empty", "too_short", "too_long", "bad_charset")
REASONS = ("", *FILTERS, *READ_ERRORS, "exact_dup", "near_dup", "not_selected")  # status codes, 0 = kept
CODE = {r: i for i, r in enumerate(REASONS)}
SET_BITS = {"pool": 1, "selected": 2, "random_baseline": 4}  # the diversity report's caption sets
CHUNK_SCHEMA = pa.schema(
    [
        ("text", pa.string()),  # normalised caption ("" when there is none)
        ("ref", pa.string()),  # file:row
        ("metadata", pa.string()),
        ("status", pa.int8()),  # REASONS code after cleaning
        ("key", pa.string()),  # de-duplication key (words), "" for removed rows
        ("cid", pa.uint64()),  # caption id value (0 without text): id = "c%016x"
        ("key_hash", pa.uint64()),
        ("meta_hash", pa.uint64()),  # 0 without metadata
    ]
)


@dataclass(frozen=True)
class CleanSettings:
    """What the read phase needs: the caption field and the filters."""

    field: str = "caption"
    min_words: int = 1
    max_words: int = 128
    charset: str = "any"


@dataclass(frozen=True)
class EmbedSettings:
    """What the embedding phase needs."""

    embedder: str = "minilm"
    batch_size: int = 256
    device: str = "auto"


def format_id(cid: int) -> str:
    """The caption id string of a `cid` value."""
    return f"c{cid:016x}"


def cid_value(text: str) -> int:
    """The caption id value of a normalised caption (`captions.caption_id` = "c" + its 16 hex digits)."""
    return int(shards.digest(text)[:16], 16)


# -------------------------------------------------------------------------------------------------------- read


def clean_batch(records: list, s: CleanSettings) -> pa.Table:
    """Normalise and filter a batch of `CaptionRecord`s -> a `CHUNK_SCHEMA` table (one row per record)."""
    texts, keys, n = dv.normalize_batch([r.caption for r in records])
    status = np.zeros(len(records), np.int8)
    for i, rec in enumerate(records):
        if rec.error:
            status[i] = CODE[rec.error]
        elif not texts[i]:
            status[i] = CODE["empty"]
        elif n[i] < s.min_words or n[i] > s.max_words:
            status[i] = CODE["too_short" if n[i] < s.min_words else "too_long"]
        elif s.charset != "any" and not dv.charset_ok(texts[i], s.charset):
            status[i] = CODE["bad_charset"]
    keys = [k if st == 0 else "" for k, st in zip(keys, status.tolist(), strict=True)]
    metas = [r.metadata for r in records]
    key_hash = np.where(status == 0, textsig.hash_strings(keys), np.uint64(0))
    with_meta = [i for i, m in enumerate(metas) if m is not None]
    meta_hash = np.zeros(len(records), np.uint64)
    meta_hash[with_meta] = textsig.hash_strings([metas[i] for i in with_meta])
    cids = np.asarray([cid_value(t) if t else 0 for t in texts], np.uint64)
    cols = [texts, [r.ref for r in records], metas, status, keys, cids, key_hash, meta_hash]
    return pa.table(cols, schema=CHUNK_SCHEMA)


def read_chunk(task: ReadTask, chunk: int, s: CleanSettings, work: str, parts: int) -> dict[str, Any]:
    """Read, clean and store one chunk; write its exact-duplicate shuffle pieces. Returns counts."""
    writer = wf.ArrowWriter(dedup.chunk_file(work, chunk), CHUNK_SCHEMA)
    rows, ok_rows, ok_hash, ok_cid = 0, [], [], []
    fields = {"rows": 0, "missing_field": 0, "unparsed": 0}
    status = Counter()
    for records in read_task(task, s.field):
        table = clean_batch(records, s)
        writer.write(table)
        st = table.column("status").to_numpy()
        ok = np.flatnonzero(st == 0)
        ok_rows.append(ok + rows)
        ok_hash.append(table.column("key_hash").to_numpy()[ok])
        ok_cid.append(table.column("cid").to_numpy()[ok])
        status.update(REASONS[c] for c in st[st != 0])
        fields = {k: v + n for (k, v), n in zip(fields.items(), field_counts(records).values(), strict=True)}
        rows += len(records)
    writer.close()
    cat = lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t)
    dedup.write_exact_pieces(
        work, chunk, cat(ok_rows, np.int64), cat(ok_hash, np.uint64), cat(ok_cid, np.uint64), parts
    )
    return {"chunk": chunk, "rows": rows, "removed": dict(status), "fields": fields, "path": task.path}


# ------------------------------------------------------------------------------------------------------- embed


class CaptionEmbedder:
    """The embedding stage: captions -> unit sentence vectors (MiniLM mean-pooled token states, or hashed n-grams)."""

    def __init__(self, embedder: str = "minilm", device: str = "auto") -> None:
        self.embedder = embedder
        if embedder == "minilm":
            from lightgen_model.encoders import build_text_encoder, resolve_device

            self.encoder = build_text_encoder("minilm", device=resolve_device(device))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """{"i": [...], "caption": [...]} -> {"i": [...], "embedding": (B, D) float32}."""
        texts = [str(t) for t in batch["caption"]]
        if self.embedder == "hash":
            return {"i": batch["i"], "embedding": dv.hash_embed(texts)}
        pooled = np.stack([t.astype(np.float32).mean(0) for t in self.encoder(texts)])  # (B, 384)
        return {"i": batch["i"], "embedding": dv.l2_normalize(pooled)}


_EMBEDDERS: dict[tuple[str, str], CaptionEmbedder] = {}  # one model per worker process, loaded on first use


def embed_chunk(work: str, chunk: int, offset: int, s: EmbedSettings) -> dict[str, Any]:
    """Embed the chunk's pool rows (survivors of de-duplication) -> `emb/c<chunk>.npy` (rows, D) float32."""
    texts = wf.read_arrow(dedup.chunk_file(work, chunk), ["text"]).column("text")
    pool = np.asarray(wf.load_npy(Path(work) / "status.npy")[offset : offset + len(texts)]) == 0
    texts = pc.take(texts, np.flatnonzero(pool)).to_pylist()
    if (s.embedder, s.device) not in _EMBEDDERS:
        _EMBEDDERS[(s.embedder, s.device)] = CaptionEmbedder(s.embedder, s.device)
    embedder = _EMBEDDERS[(s.embedder, s.device)]
    parts = [
        embedder({"i": list(range(i, i + len(texts[i : i + s.batch_size]))), "caption": texts[i : i + s.batch_size]})
        for i in range(0, len(texts), s.batch_size)
    ]
    x = np.concatenate([p["embedding"] for p in parts]).astype(np.float32) if parts else np.zeros((0, 1), np.float32)
    wf.save_npy(wf.work_path(work, "emb", f"c{chunk:05d}.npy"), x)
    return {"chunk": chunk, "rows": len(texts), "dim": int(x.shape[1])}


def label_chunk(work: str, chunk: int) -> dict[str, Any]:
    """Nearest k-means centroid of each pool row of the chunk -> `labels/c<chunk>.npy`."""
    x = wf.load_npy(wf.work_path(work, "emb", f"c{chunk:05d}.npy"), mmap=False)
    centroids = wf.load_npy(Path(work) / "centroids.npy", mmap=False)
    labels = dv.assign(x, centroids).astype(np.int32) if len(x) else np.zeros(0, np.int32)
    wf.save_npy(wf.work_path(work, "labels", f"c{chunk:05d}.npy"), labels)
    return {"chunk": chunk, "rows": len(labels)}


# ---------------------------------------------------------------------------------------------------- finalise


def finalize_chunk(work: str, chunk: int, offset: int, parts: int, cover_block: int = 4096) -> dict[str, Any]:
    """The chunk's rejects (`rejects/c<chunk>.arrow`), its diversity statistics (`stats/c<chunk>.npz`) and its
    word n-grams split into `parts` partitions by hash (`grams/c<chunk>-p<part>`)."""
    table = wf.read_arrow(dedup.chunk_file(work, chunk), ["text", "ref", "cid"])
    sl = slice(offset, offset + len(table))
    g = {k: np.asarray(wf.load_npy(Path(work) / f"{k}.npy")[sl]) for k in ("status", "partner", "baseline")}
    near = {k: np.asarray(wf.load_npy(Path(work) / f"near_{k}.npy")[sl]) for k in ("jaccard", "edits", "swapped")}
    rejects = chunk_rejects(table, g["status"], g["partner"], near)
    wf.write_arrow(wf.work_path(work, "rejects", f"c{chunk:05d}.arrow"), rejects)
    pool = np.flatnonzero((g["status"] == 0) | (g["status"] == CODE["not_selected"]))
    x = wf.load_npy(wf.work_path(work, "emb", f"c{chunk:05d}.npy"), mmap=False)
    sets = {
        "pool": np.ones(len(pool), bool),
        "selected": g["status"][pool] == 0,
        "random_baseline": g["baseline"][pool],
    }
    cover = wf.load_npy(Path(work) / "cover.npy", mmap=False)
    cover_in = wf.load_npy(Path(work) / "cover_in.npy", mmap=False)  # (S, 3): sample row in pool / selected / base
    stats: dict[str, np.ndarray] = {}
    for name, m in sets.items():
        xs = x[m]
        stats[f"{name}_count"] = np.asarray(len(xs))
        stats[f"{name}_sum"] = xs.sum(0, dtype=np.float64) if len(xs) else np.zeros(x.shape[1])
        stats[f"{name}_sumsq"] = np.asarray((xs.astype(np.float64) ** 2).sum())
        best = np.full(len(cover), -np.inf, np.float32)
        out = np.flatnonzero(~cover_in[:, list(SET_BITS).index(name)])  # a sample row in the set is its own nearest
        for s in range(0, len(xs) if len(out) else 0, cover_block):  # bounds the (S, block) similarities
            best[out] = np.maximum(best[out], (cover[out] @ xs[s : s + cover_block].T).max(1))
        stats[f"{name}_cover"] = best
    tokens, offsets = dedup.token_store(work)
    loc_tok, loc_off = textsig.gather(tokens, offsets, pool + offset)
    bits = (1 | sets["selected"].astype(np.uint64) << 1 | sets["random_baseline"].astype(np.uint64) << 2).astype(
        np.uint64
    )
    grams = {}
    for n in (1, 2, 3):  # gram hash with its sets' bits in the low 3 bits, split by hash for `distinct_partition`
        h, owner = textsig.ngrams(loc_tok, loc_off, n, whole_if_short=False)
        grams[n] = (h & ~np.uint64(7)) | bits[owner]
    for p in range(parts):
        piece = {f"g{n}": g[(g >> np.uint64(40)) % np.uint64(parts) == p] for n, g in grams.items()}
        wf.save_arrays(wf.work_path(work, "grams", wf.piece(chunk, p)), **piece)
    wf.save_arrays(wf.work_path(work, "stats", f"c{chunk:05d}.npz"), **stats)
    return {"chunk": chunk, "rejects": len(rejects)}


def chunk_rejects(table: pa.Table, status: np.ndarray, partner: np.ndarray, near: dict) -> pa.Table:
    """Rejects rows {id, source, reason, detail} of a chunk's removed rows, in row order."""
    rows = []
    texts, refs, cids = (table.column(c).to_pylist() for c in ("text", "ref", "cid"))
    for i in np.flatnonzero(status != 0).tolist():
        reason, text = REASONS[status[i]], texts[i]
        detail = text
        if reason == "exact_dup":
            detail = f"= {format_id(int(partner[i]))}: {text}"
        elif reason == "near_dup":
            apart = " two words swapped" if near["swapped"][i] else " one word apart" if near["edits"][i] <= 1 else ""
            detail = f"~ {format_id(int(partner[i]))} (jaccard {near['jaccard'][i]:.3f}){apart}: {text}"
        rows.append(
            {"id": format_id(cids[i]) if text else refs[i], "source": refs[i], "reason": reason, "detail": detail}
        )
    return shards.rejects_table(rows)


# ------------------------------------------------------------------------------------------------------ shards


def shard_spans(kept: list[int], offsets: list[int], shard_size: int, sources: list[str]) -> list[list[tuple]]:
    """Per output shard, its spans [(chunk, chunk offset, skip, take, source)]: `shard_size` kept rows in order."""
    first = [0]
    for k in kept:
        first.append(first[-1] + k)  # kept rank of each chunk's first kept row
    plan = []
    for start in range(0, first[-1], shard_size):
        stop = min(start + shard_size, first[-1])
        plan.append(
            [
                (c, offsets[c], max(0, start - first[c]), min(stop, first[c + 1]) - max(start, first[c]), sources[c])
                for c in range(len(kept))
                if first[c] < stop and first[c + 1] > start
            ]
        )
    return plan


def write_shard(work: str, out: str, index: int, spans: list[tuple], schema: pa.Schema, meta: dict) -> dict[str, Any]:
    """Caption shard `index` from `spans` [(chunk, offset, skip, take, source)]: the chunk's kept rows [skip,
    skip + take) in order, published to `out` by the runner's writer (a shard finished earlier with the same config
    and ids is kept). Returns its receipt."""
    parts = []
    for chunk, offset, skip, take, source in spans:
        t = wf.read_arrow(dedup.chunk_file(work, chunk), ["text", "metadata", "cid"])
        sl = slice(offset, offset + len(t))
        keep = np.flatnonzero(np.asarray(wf.load_npy(Path(work) / "status.npy")[sl]) == 0)[skip : skip + take]
        cluster = np.asarray(wf.load_npy(Path(work) / "cluster.npy")[sl])[keep]
        cids = t.column("cid").to_numpy()[keep]
        parts.append(
            pa.table(
                {
                    "id": [format_id(int(c)) for c in cids],
                    "caption": pc.take(t.column("text"), keep),
                    "source": [source] * len(keep),
                    "metadata": pc.take(t.column("metadata"), keep),
                    "cluster": cluster.astype(np.int32),
                },
                schema=schema,
            )
        )
    table = pa.concat_tables(parts)
    meta = {**meta, "input_digest": shards.digest(table.column("id").to_pylist()), "shard": index}
    return runner.publish_shard(Storage(out), index, schema, meta, [table])


# --------------------------------------------------------------------------------------------------- diversity


def diversity_report(
    work: str, n_chunks: int, hist: dict[str, np.ndarray], grams: dict[str, list[int]]
) -> dict[str, dict[str, Any]]:
    """Pool / selected / random-baseline metrics from the chunks' statistics, the sets' cluster histograms and
    their n-gram counts ({"<set>_<n>": [distinct, total]}, summed over `distinct_partition`s)."""
    paths = [wf.work_path(work, "stats", f"c{c:05d}.npz") for c in range(n_chunks)]
    cover_in = wf.load_npy(Path(work) / "cover_in.npy", mmap=False)
    report = {}
    for name in SET_BITS:
        count, total, sumsq, best = 0, 0.0, 0.0, None
        for p in paths:
            with np.load(p) as z:
                count += int(z[f"{name}_count"])
                total = total + z[f"{name}_sum"]
                sumsq += float(z[f"{name}_sumsq"])
                best = z[f"{name}_cover"] if best is None else np.maximum(best, z[f"{name}_cover"])
        # sum_{i != j} x_i . x_j = |sum x|^2 - sum |x_i|^2, so no N x N matrix is needed.
        mpd = 1.0 - (float(np.dot(total, total)) - sumsq) / (count * (count - 1)) if count >= 2 else 0.0
        if best is not None:
            best[cover_in[:, list(SET_BITS).index(name)]] = 1.0
        cover = float(np.mean(1.0 - best)) if name != "pool" and count and best is not None and len(best) else 0.0
        h = hist[name]
        report[name] = {
            "captions": count,
            **{f"distinct_{n}": round(grams[f"{name}_{n}"][0] / max(1, grams[f"{name}_{n}"][1]), 4) for n in (1, 2, 3)},
            "mean_pairwise_distance": round(mpd, 4),
            "coverage_radius": round(cover, 4),
            "clusters_hit": int((h > 0).sum()),
            "cluster_entropy": round(dv.cluster_entropy(h), 4),
            "cluster_histogram": h.tolist(),
        }
    return report


def distinct_partition(work: str, part: int, n_chunks: int) -> dict[str, Any]:
    """Distinct and total word n-grams (n = 1, 2, 3) per caption set in partition `part` (distinct counts add up
    over partitions: equal grams share a partition) -> {"part", "counts": {"<set>_<n>": [distinct, total]}}."""
    counts = {}
    for n in (1, 2, 3):
        g = np.concatenate(
            [wf.load_arrays(wf.work_path(work, "grams", wf.piece(c, part)))[f"g{n}"] for c in range(n_chunks)]
        )
        g.sort()
        for name, bit in SET_BITS.items():
            sel = g[(g & np.uint64(bit)) != 0] >> np.uint64(3)
            counts[f"{name}_{n}"] = [int(len(sel) and 1 + np.count_nonzero(sel[1:] != sel[:-1])), len(sel)]
    return {"part": part, "counts": counts}
