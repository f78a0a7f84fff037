"""`build-captions`: caption sources -> cleaned, de-duplicated, diversity-selected caption shards plus a report.

Steps: read every source (files and the built-in ShapesWorld generator) -> normalise -> drop empty, too short or
long, wrong-charset captions -> drop exact duplicates -> drop near duplicates (MinHash over word n-grams) -> embed the
survivors (`CaptionEmbedder`, mapped through `runtime.map_stage`, so on Ray with `--workers N`) -> select `--n` of
them (clusters evenly, farthest-point, or random) -> write `part-NNNNN.parquet` caption shards, `rejects.parquet`
(every removed caption with its reason), `diversity.json`, `report.json` and `manifest.json`.
Counts add up: inputs = kept + removed, removed split by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import diversity as dv
from pipeline import shards
from pipeline.caption_sources import CAPTIONS_FORMAT, CaptionRecord, read_captions, shapes_captions

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=True),  # GenEval metadata as JSON (ShapesWorld), else null
        pa.field("cluster", pa.int32(), nullable=False),  # the embedding cluster the caption belongs to
    ]
)
CAPTION_SCHEMA_VERSION = 1
SELECTORS = ("cluster", "farthest", "random")
EMBEDDERS = ("minilm", "hash")
CONTENT_KEYS = (
    *("field", "min_words", "max_words", "charset", "near_dup", "near_dup_threshold", "ngram", "embedder"),
    *("select", "n", "clusters", "seed", "shapes", "shapes_diversity", "shapes_scenes", "shard_size"),
)


@dataclass
class CaptionsConfig:
    """Everything `build-captions` needs; written, resolved, into the manifest."""

    inputs: list[str]
    output: str
    n: int = 1000
    field: str = "caption"
    shapes: int = 0
    shapes_diversity: float = 1.0
    shapes_scenes: int | None = None
    min_words: int = 1
    max_words: int = 128
    charset: str = "any"
    near_dup: bool = True
    near_dup_threshold: float = 0.8
    ngram: int = 2
    embedder: str = "minilm"
    select: str = "cluster"
    clusters: int = 64
    shard_size: int = 100_000
    batch_size: int = 256
    workers: int = 0
    ray_address: str | None = None
    seed: int = 0
    overwrite: bool = False

    def content(self) -> dict[str, Any]:
        """The settings that determine the output."""
        return {**{k: getattr(self, k) for k in CONTENT_KEYS}, "schema_version": CAPTION_SCHEMA_VERSION}


def validate(cfg: CaptionsConfig) -> None:
    """Check a config up front, with errors that name the bad value."""
    if not cfg.inputs and cfg.shapes <= 0:
        raise ValueError("no captions: give --input files and/or --shapes N (the built-in ShapesWorld source)")
    for name in ("n", "min_words", "max_words", "ngram", "clusters", "shard_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.select not in SELECTORS:
        raise ValueError(f"unknown --select {cfg.select!r}: expected one of {SELECTORS}")
    if cfg.embedder not in EMBEDDERS:
        raise ValueError(f"unknown --embedder {cfg.embedder!r}: expected one of {EMBEDDERS}")
    if cfg.charset not in dv.CHARSETS:
        raise ValueError(f"unknown --charset {cfg.charset!r}: expected one of {dv.CHARSETS}")
    if not 0.0 < cfg.near_dup_threshold <= 1.0:
        raise ValueError(f"--near-dup-threshold must be in (0, 1], got {cfg.near_dup_threshold}")


class CaptionEmbedder:
    """The embedding stage: captions -> unit sentence vectors (MiniLM mean-pooled token states, or hashed n-grams)."""

    def __init__(self, embedder: str = "minilm", device: str = "auto") -> None:
        self.embedder = embedder
        if embedder == "minilm":
            from lightgen_model.encoders import build_text_encoder
            from pipeline.teachers import resolve_device

            self.encoder = build_text_encoder("minilm", device=resolve_device(device))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """{"i": [...], "caption": [...]} -> {"i": [...], "embedding": (B, D) float32}."""
        texts = [str(t) for t in batch["caption"]]
        if self.embedder == "hash":
            return {"i": batch["i"], "embedding": dv.hash_embed(texts)}
        pooled = np.stack([t.astype(np.float32).mean(0) for t in self.encoder(texts)])  # (B, 384)
        return {"i": batch["i"], "embedding": dv.l2_normalize(pooled)}


def caption_id(caption: str) -> str:
    """A stable id from the normalised caption text (captions are unique after de-duplication)."""
    return "c" + shards.digest(caption)[:16]


def _removal(rec: CaptionRecord, reason: str, detail: str = "") -> dict[str, str]:
    """A rejects row: the caption's id (or its source row when it has no text), reason, the caption as detail."""
    text = dv.normalize(rec.caption) if rec.caption else ""
    return {"id": caption_id(text) if text else rec.ref, "source": rec.ref, "reason": reason, "detail": detail or text}


def clean(records: list[CaptionRecord], cfg: CaptionsConfig) -> tuple[list[CaptionRecord], list[dict[str, str]]]:
    """Normalise, filter and de-duplicate (exact, then near) in input order; first occurrence wins."""
    kept: list[CaptionRecord] = []
    removed: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for rec in records:
        text = dv.normalize(rec.caption) if rec.caption is not None else ""
        n_words = len(dv.words(text))
        reason = rec.error or ("empty" if not text else "")
        reason = reason or ("too_short" if n_words < cfg.min_words else "too_long" if n_words > cfg.max_words else "")
        reason = reason or ("" if dv.charset_ok(text, cfg.charset) else "bad_charset")
        key = dv.dedup_key(text)
        if not reason and key in seen:
            removed.append(_removal(rec, "exact_dup", f"= {seen[key]}: {text}"))
            continue
        if reason:
            removed.append(_removal(rec, reason))
            continue
        seen[key] = caption_id(text)
        kept.append(CaptionRecord(rec.source, rec.ref, text, rec.metadata))
    if cfg.near_dup and kept:
        near = dv.near_duplicates([r.caption for r in kept], cfg.near_dup_threshold, cfg.ngram, seed=cfg.seed)
        for i, (j, sim) in sorted(near.items()):
            detail = f"~ {caption_id(kept[j].caption)} (jaccard {sim:.3f}): {kept[i].caption}"
            removed.append(_removal(kept[i], "near_dup", detail))
        kept = [r for i, r in enumerate(kept) if i not in near]
    return kept, removed


def embed(captions: list[str], cfg: CaptionsConfig) -> np.ndarray:
    """(N, D) unit embeddings of `captions`, in order, through the stage runner (in process or on Ray)."""
    from pipeline import runtime

    items = [{"i": i, "caption": c} for i, c in enumerate(captions)]
    with runtime.ray_session(cfg.ray_address, enabled=cfg.workers > 0 and bool(items)):
        rows = runtime.map_stage(
            CaptionEmbedder,
            items,
            constructor_kwargs={"embedder": cfg.embedder},
            workers=cfg.workers,
            batch_size=cfg.batch_size,
            address=cfg.ray_address,
        )
        out = sorted(((int(r["i"]), np.asarray(r["embedding"], np.float32)) for r in rows), key=lambda t: t[0])
    # `i` travels with each row because Ray returns batches in completion order.
    return np.stack([e for _, e in out]) if out else np.zeros((0, 1), np.float32)


def select(x: np.ndarray, labels: np.ndarray, cfg: CaptionsConfig) -> np.ndarray:
    """Indices (sorted) of the `cfg.n` captions kept by `cfg.select`."""
    if cfg.select == "random":
        return dv.select_random(len(x), cfg.n, cfg.seed)
    if cfg.select == "farthest":
        return dv.select_farthest(x, cfg.n, cfg.seed)
    return dv.select_clusters(labels, cfg.n, cfg.seed)


def diversity_metrics(texts: list[str], x: np.ndarray, labels: np.ndarray, k: int, pool: np.ndarray | None) -> dict:
    """Distinct n-gram ratios, embedding spread and coverage of `pool`, and the cluster histogram of a caption set.

    `pool=None`: the set is the pool itself, whose coverage radius is 0 by definition (and costly to compute).
    """
    hist = np.bincount(labels, minlength=k) if len(labels) else np.zeros(k, np.int64)
    return {
        "captions": len(texts),
        **{f"distinct_{n}": round(dv.distinct_ngrams(texts, n), 4) for n in (1, 2, 3)},
        "mean_pairwise_distance": round(dv.mean_pairwise_distance(x), 4),
        "coverage_radius": round(dv.coverage_radius(pool, x), 4) if pool is not None else 0.0,
        "clusters_hit": int((hist > 0).sum()),
        "cluster_entropy": round(dv.cluster_entropy(hist), 4),
        "cluster_histogram": hist.tolist(),
    }


def diversity_report(pool_texts: list[str], x: np.ndarray, labels: np.ndarray, chosen: np.ndarray, cfg) -> dict:
    """Metrics of the de-duplicated pool, the selection, and a random selection of the same size (the baseline)."""
    k = int(labels.max()) + 1 if len(labels) else 0
    # Coverage is measured on at most 2000 pool captions: the selection is compared with a fixed sample of the pool.
    sample = x[dv.select_random(len(x), 2000, cfg.seed + 1)] if len(x) else x
    base = dv.select_random(len(x), len(chosen), cfg.seed + 2)
    sets = {"pool": np.arange(len(x)), "selected": chosen, "random_baseline": base}
    return {
        name: diversity_metrics(
            [pool_texts[i] for i in idx], x[idx], labels[idx], k, None if name == "pool" else sample
        )
        for name, idx in sets.items()
    }


def format_table(report: dict[str, Any]) -> str:
    """The diversity report as a short text table (one row per metric; pool / selected / random columns)."""
    div = report["diversity"]
    cols = ("pool", "selected", "random_baseline")
    metrics = ("captions", "distinct_1", "distinct_2", "distinct_3", "mean_pairwise_distance", "coverage_radius")
    lines = [f"{'metric':<24}" + "".join(f"{c:>16}" for c in cols)]
    for m in (*metrics, "clusters_hit", "cluster_entropy"):
        lines.append(f"{m:<24}" + "".join(f"{div[c][m]:>16}" for c in cols))
    removed = ", ".join(f"{k}={v}" for k, v in report["removed_by_reason"].items()) or "none"
    lines.append(f"inputs {report['inputs']} = kept {report['kept']} + removed {report['removed']} ({removed})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ the run


def _write_shards(out: Path, rows: list[dict[str, Any]], cfg: CaptionsConfig, config_digest: str) -> list:
    """Write the kept captions as `part-NNNNN.parquet` shards; a shard already on disk with the same rows is kept."""
    results = []
    for index, span in enumerate(shards.plan_shards(len(rows), cfg.shard_size)):
        chunk = [rows[i] for i in span]
        meta = {"config_digest": config_digest, "input_digest": shards.digest([r["id"] for r in chunk])}
        old = shards.complete_shard_meta(out, index)
        if old is not None and old.get("config_digest") != config_digest:
            raise ValueError(
                f"{out} holds caption shards made with other settings (e.g. {shards.shard_name(index)}); "
                "pass --overwrite to replace them or choose another --output"
            )
        if old is None or old.get("input_digest") != meta["input_digest"]:
            table = pa.Table.from_pylist(chunk, schema=CAPTION_SCHEMA)
            with shards.ShardWriter(out, index, CAPTION_SCHEMA, meta) as writer:
                writer.write(table)
                writer.commit(shards.rejects_table([]))
        results.append(shards.shard_result(out, index))
    shards.remove_outputs(out, keep_below=len(results))
    return results


def run_build_captions(cfg: CaptionsConfig) -> dict[str, Any]:
    """Run the stage end to end; returns the report (also written to `report.json`, diversity in `diversity.json`)."""
    t0 = time.perf_counter()
    # 1. Check the settings; read every source in a fixed order.
    validate(cfg)
    records = read_captions(cfg.inputs, cfg.field) if cfg.inputs else []
    if cfg.shapes:
        records += shapes_captions(cfg.shapes, cfg.seed, cfg.shapes_diversity, cfg.shapes_scenes)
    # 2. Clean and de-duplicate; embed and cluster the pool; select.
    pool, removed = clean(records, cfg)
    if not pool:
        raise ValueError(f"no captions left after cleaning {len(records)} inputs (check --field and the filters)")
    texts = [r.caption for r in pool]
    x = embed(texts, cfg)
    _, labels = dv.kmeans(x, cfg.clusters, seed=cfg.seed)
    chosen = select(x, labels, cfg)
    chosen_set = set(chosen.tolist())
    removed += [_removal(r, "not_selected") for i, r in enumerate(pool) if i not in chosen_set]
    # 3. Write shards (kept ones are reused), rejects, reports, manifest.
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        shards.remove_outputs(out)
    shards.clean_temporaries(out)
    config_digest = shards.digest(cfg.content())
    rows = [
        {"id": caption_id(texts[i]), "caption": texts[i], "source": pool[i].source, "metadata": pool[i].metadata,
         "cluster": int(labels[i])}
        for i in chosen
    ]  # fmt: skip
    results = _write_shards(out, rows, cfg, config_digest)
    shards.write_table_atomic(out / shards.REJECTS, shards.rejects_table(removed))
    seconds = time.perf_counter() - t0
    reasons = Counter(r["reason"] for r in removed)
    report = {
        "inputs": len(records),
        "kept": len(rows),
        "removed": len(removed),
        "removed_by_reason": dict(sorted(reasons.items())),
        "duplicates_removed": reasons["exact_dup"] + reasons["near_dup"],
        "shards": len(results),
        "seconds": round(seconds, 3),
        "captions_per_s": round(len(records) / seconds, 1) if seconds > 0 else None,
        "diversity": diversity_report(texts, x, labels, chosen, cfg),
    }
    shards.write_json_atomic(out / shards.DIVERSITY, report["diversity"])
    shards.write_json_atomic(out / shards.REPORT, {k: v for k, v in report.items() if k != "diversity"})
    _manifest(out, cfg, config_digest, results, len(removed))
    return report


def _manifest(out: Path, cfg: CaptionsConfig, config_digest: str, results: list, removed: int) -> None:
    """Write the complete manifest (its `rejected` / `inputs` count the global removals, not per-shard rejects)."""
    config = {**asdict(cfg), "inputs": [str(Path(p).resolve()) for p in cfg.inputs], "output": str(out.resolve())}
    header = {
        "format": CAPTIONS_FORMAT,
        "schema_version": CAPTION_SCHEMA_VERSION,
        "stage": "build-captions",
        "code_version": shards.code_version(),
        "config": config,
        "config_digest": config_digest,
        "n_shards": len(results),
    }
    writer = shards.ManifestWriter(out, header)
    for r in results:
        writer.add(r, write=False)
    rows = sum(r.rows for r in results)
    writer.write(complete=True, rejected=removed, inputs=rows + removed)
