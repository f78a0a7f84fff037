"""`build-captions`: caption sources -> cleaned, de-duplicated, diversity-selected caption shards plus a report.

Built for millions of captions: inputs (local paths or URIs such as `s3://bucket/captions`) are read in chunks
(`caption_sources.ReadTask`), every phase is a function over chunk or partition files in a work folder
(`phases`, `dedup`), run by the runner's executor (`executors.execute`, as the stages' units) in this process
(`--workers 0`, no Ray) or as Ray Data tasks (`--workers N`); the driver keeps only per-row arrays (status,
cluster) and small statistics. The work folder is local scratch: under `--output` when that is a local path, else
`--work-dir` (a temporary folder by default); on a Ray cluster of several nodes it must be a path every node sees.
The outputs are published by the runner's writer (`runner.publish_shard`, receipts, `runner.write_manifest`) to
`--output`, local or a URI. Outputs do not depend on the number of workers.

Steps: 1. read + normalise + filter (empty, too short / long, wrong charset, unreadable rows) -> 2. exact
duplicates (hash partitions of the word key) -> 3. near duplicates (LSH + deletion-key buckets, verified, removed
when a kept earlier caption is one; `dedup`) -> 4. embeddings (`CaptionEmbedder` in the workers), k-means fitted
on a sample and assigned to all -> 5. selection of `--n` (clusters evenly, farthest-point on a sample, or random) -> 6. rejects and diversity
statistics per chunk -> 7. `part-NNNNN.parquet` caption shards, `rejects.parquet` (every removed caption with its
reason), `diversity.json`, `report.json`, `manifest.json`. Counts add up: inputs = kept + removed.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import runner, shards, storage
from pipeline.core import workfiles as wf
from pipeline.core.executors import calls, execute
from pipeline.core.options import StageConfig, opt
from pipeline.core.schema import MANIFEST, REJECT_SCHEMA
from pipeline.core.stage import Stage
from pipeline.core.storage import Storage
from pipeline.io.caption_sources import CAPTIONS_FORMAT, check_fields, plan_reads, shapes_task
from pipeline.stages.captions import dedup
from pipeline.stages.captions import diversity as dv
from pipeline.stages.captions import phases as st
from pipeline.stages.captions.phases import CaptionEmbedder  # noqa: F401 (the embedding stage, public here)

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir

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
FARTHEST_POOL = 20_000  # farthest-point selection runs on at most this many pool captions (a seeded sample)
COVER_SAMPLE = 2000  # pool captions the coverage radius is measured on
CONTENT_KEYS = (
    *("field", "min_words", "max_words", "charset", "near_dup", "near_dup_threshold", "ngram", "near_dup_edit_words"),
    "near_dup_change_words",
    *("embedder", "select", "n", "clusters", "kmeans_sample", "seed", "shapes", "shapes_diversity", "shapes_scenes"),
    "shard_size",
)


@dataclass
class CaptionsConfig(StageConfig):
    """Everything `build-captions` needs; written, resolved, into the manifest."""

    shared_defaults = {
        "inputs": ([], "JSONL / JSON / Parquet / CSV files, webdataset .tar, folders or globs (repeat)."),
        "output": ("", "Output folder or URI: caption shards, rejects, diversity.json, report, manifest."),
        "batch_size": (256, "Captions per embedding call."),
        "shard_size": (100_000, "Captions per output shard."),
        "workers": (0, "Ray tasks in parallel (reading, de-duplication, embeddings); 0 = no Ray."),
        "seed": (0, "Random seed (selection, k-means, ShapesWorld)."),
        "overwrite": (False, "Replace earlier outputs; without it other settings are refused."),
    }
    # A global job of plain one-CPU tasks per phase (`executors.execute(actors=False)`), not a pool of model-holding
    # workers with a progress bar over shards: these options have no effect here.
    shared_unused = ("gpus_per_worker", "cpus_per_worker", "progress")

    n: int = opt(1000, "Captions to select.")
    field: str = opt("caption", "The record field / column holding the caption.")
    shapes: int = opt(0, "Add N captions from the built-in ShapesWorld generator (with metadata).")
    shapes_diversity: float = opt(1.0, "ShapesWorld caption diversity in [0, 1] (paraphrase rate).")
    shapes_scenes: int | None = opt(None, "Distinct ShapesWorld scenes per category.", show="all")
    min_words: int = opt(1, "Remove captions with fewer words (too_short).")
    max_words: int = opt(128, "Remove captions with more words (too_long).")
    charset: str = opt("any", "Keep captions whose letters are: any, latin, ascii (bad_charset).")
    near_dup: bool = opt(True, "Remove near duplicates (MinHash LSH + one-word-edit buckets).")
    near_dup_threshold: float = opt(0.8, "Word n-gram Jaccard similarity that makes a near duplicate.")
    ngram: int = opt(2, "Word n-gram size of the near-duplicate shingles.")
    near_dup_edit_words: int = opt(
        8,
        "A word inserted or deleted, or two adjacent words swapped, makes a near duplicate when both captions have "
        "this many words (0 = off).",
    )
    near_dup_change_words: int = opt(
        12, "A word changed makes a near duplicate when both captions have this many words (0 = off)."
    )
    embedder: str = opt("minilm", "Sentence embeddings for selection: minilm, hash (model-free).")
    select: str = opt("cluster", "Selection: cluster (k-means, even per cluster), farthest, random.")
    clusters: int = opt(64, "k of the k-means over caption embeddings.")
    kmeans_sample: int = opt(100_000, "Captions k-means is fitted on (a seeded sample); all are assigned.")
    partitions: int = opt(0, "Shuffle partitions of the de-duplication (0 = from the input size).")
    work_dir: str | None = opt(
        None,
        "Scratch folder of the intermediate files (a local path; on a multi-node Ray cluster one every node sees).",
        show="under --output if local, else a temporary folder",
    )

    def content(self) -> dict[str, Any]:
        """The settings that determine the output."""
        return {**{k: getattr(self, k) for k in CONTENT_KEYS}, "schema_version": CAPTION_SCHEMA_VERSION}


def validate(cfg: CaptionsConfig) -> None:
    """Check a config up front, with errors that name the bad value."""
    if not cfg.inputs and cfg.shapes <= 0:
        raise ValueError("no captions: give --input files and/or --shapes N (the built-in ShapesWorld source)")
    cfg.check()  # --output, --batch-size, --shard-size, --workers
    for name in ("n", "min_words", "max_words", "ngram", "clusters", "kmeans_sample"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("near_dup_edit_words", "near_dup_change_words", "partitions"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.select not in SELECTORS:
        raise ValueError(f"unknown --select {cfg.select!r}: expected one of {SELECTORS}")
    if cfg.embedder not in EMBEDDERS:
        raise ValueError(f"unknown --embedder {cfg.embedder!r}: expected one of {EMBEDDERS}")
    if cfg.charset not in dv.CHARSETS:
        raise ValueError(f"unknown --charset {cfg.charset!r}: expected one of {dv.CHARSETS}")
    if not 0.0 < cfg.near_dup_threshold <= 1.0:
        raise ValueError(f"--near-dup-threshold must be in (0, 1], got {cfg.near_dup_threshold}")


def caption_id(caption: str) -> str:
    """A stable id from the normalised caption text (captions are unique after de-duplication)."""
    return st.format_id(st.cid_value(caption))


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


def work_folder(cfg: CaptionsConfig) -> Path:
    """The scratch folder of a run: `--work-dir`, else under a local `--output`, else a new temporary folder."""
    if cfg.work_dir:
        if storage.is_remote(cfg.work_dir):
            raise ValueError(f"--work-dir must be a local path (or a shared mount), got {storage.public(cfg.work_dir)}")
        return Path(cfg.work_dir) / wf.WORK_DIR
    if not storage.is_remote(cfg.output):
        root = storage.resolve(cfg.output)[1]
        return Path(root) / wf.WORK_DIR
    return Path(tempfile.mkdtemp(prefix="lightgen-captions-"))  # removed whole at the end


class CaptionBuild:
    """One run of the stage: the driver's per-row arrays and the numbered steps that fill them."""

    def __init__(self, cfg: CaptionsConfig) -> None:
        self.cfg = cfg
        self.store = Storage(cfg.output)
        self.work = work_folder(cfg)
        self.config_digest = shards.digest(cfg.content())
        self.timings: dict[str, float] = {}
        self.stats: dict[str, Any] = {}

    def check_shared(self) -> None:
        """On a multi-node Ray cluster: every node must see the output and the work folder."""
        from pipeline.core import runtime

        runtime.check_shared_storage(self.cfg.output)
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            runtime.check_shared_storage(str(self.work))
        except ValueError as e:
            raise ValueError(
                f"the work folder {self.work} is not visible from every node ({e}); pass --work-dir, a folder on "
                "storage every node mounts"
            ) from None

    def _map(self, fn: Any, args: list[tuple], key: str = "chunk") -> list[dict[str, Any]]:
        """Run a phase over its tasks with the runner's executor (in process or Ray Data); results in task order."""
        cfg = self.cfg
        results = execute(
            calls(fn), args, workers=cfg.workers, ray_address=cfg.ray_address, cpus=1.0, gpus=0.0, actors=False
        )
        return sorted(results, key=lambda r: r[key])

    def _save(self, **arrays: np.ndarray) -> None:  # driver arrays the tasks memory-map
        for name, a in arrays.items():
            wf.save_npy(self.work / f"{name}.npy", a)

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def run(self) -> dict[str, Any]:
        """Steps 0-7; returns the report."""
        t0 = time.perf_counter()
        self.prepare()  # 0. outputs checked, work folder, read plan
        self.read()  # 1. read + clean
        self.exact()  # 2. exact duplicates
        self.near_duplicates()  # 3. near duplicates (and the token store)
        self.embed_and_cluster()  # 4. embeddings, k-means
        self.select()  # 5. selection
        diversity = self.finalize()  # 6. rejects, diversity statistics
        results = self.write_shards()  # 7. caption shards, reports, manifest
        return self.report(results, diversity, time.perf_counter() - t0)

    def prepare(self) -> None:
        """Refuse outputs made with other settings (unless --overwrite); plan the reads and the partitions."""
        cfg = self.cfg
        runner.prepare_output(self.store, "build-captions", cfg.overwrite, self.config_digest)
        self.tasks = plan_reads(cfg.inputs, cfg.field) if cfg.inputs else []
        if cfg.shapes:
            self.tasks.append(shapes_task(cfg.shapes, cfg.seed, cfg.shapes_diversity, cfg.shapes_scenes))
        files = {t.path for t in self.tasks if t.kind != "shapes"}
        estimate = sum(storage.file_info(p).size // 100 for p in files)
        self.parts = cfg.partitions or int(np.clip(-(-(estimate + cfg.shapes) // 200_000), max(1, cfg.workers), 64))
        rules = (cfg.near_dup_threshold, cfg.ngram, cfg.near_dup_edit_words, cfg.near_dup_change_words)
        self.near = dedup.NearDupSettings(*rules, seed=cfg.seed, parts=self.parts)
        wf.reset(self.work)

    def read(self) -> None:
        """1. Every read task -> a cleaned chunk file; per-row status, caption ids; unknown --field errors."""
        t0 = time.perf_counter()
        s = st.CleanSettings(self.cfg.field, self.cfg.min_words, self.cfg.max_words, self.cfg.charset)
        args = [(task, i, s, str(self.work), self.parts) for i, task in enumerate(self.tasks)]
        self.chunks = self._map(st.read_chunk, args)
        fields: dict[str, Counter] = {}
        for c in self.chunks:
            fields.setdefault(c["path"], Counter()).update(c["fields"])
        check_fields(fields, self.cfg.field)
        self.offsets = np.concatenate([[0], np.cumsum([c["rows"] for c in self.chunks])]).astype(np.int64)
        self.n = int(self.offsets[-1])
        cols = [wf.read_arrow(dedup.chunk_file(self.work, i), ["status", "cid"]) for i in range(len(self.chunks))]
        self.status = np.concatenate([c.column("status").to_numpy() for c in cols] or [np.zeros(0, np.int8)])
        self.cid = np.concatenate([c.column("cid").to_numpy() for c in cols] or [np.zeros(0, np.uint64)])
        self.partner = np.zeros(self.n, np.uint64)
        self._timed("read", t0)

    def exact(self) -> None:
        """2. Exact duplicates, one task per key-hash partition."""
        t0 = time.perf_counter()
        self._map(
            dedup.exact_partition, [(str(self.work), p, self.offsets.tolist()) for p in range(self.parts)], "part"
        )
        for p in range(self.parts):
            a = wf.load_arrays(wf.work_path(self.work, dedup.EXACT_OUT, f"p{p:03d}.npz"))
            self.status[a["row"]] = st.CODE["exact_dup"]
            self.partner[a["row"]] = a["winner_cid"]
        self._save(status=self.status)
        self._timed("exact_dedup", t0)

    def near_duplicates(self) -> None:
        """3. Signatures per chunk, the token store, buckets per partition, the first of each kept in order."""
        t0, work, keys = time.perf_counter(), str(self.work), self.cfg.near_dup
        self._map(
            dedup.near_signatures, [(work, c, int(self.offsets[c]), self.near, keys) for c in range(len(self.chunks))]
        )
        dedup.build_token_store(work, len(self.chunks), self.n)
        self.near_info = {
            k: np.zeros(self.n, t) for k, t in (("jaccard", np.float32), ("edits", np.int8), ("swapped", bool))
        }
        if keys:
            parts = self._map(
                dedup.near_partition, [(work, p, len(self.chunks), self.near) for p in range(self.parts)], "part"
            )
            a, b, pos = dedup.load_edges(work, self.parts)
            self.stats["near_dup"] = {
                "bucket_pairs": sum(r["candidates"] for r in parts),  # work done (a pair may recur per partition)
                "duplicate_pairs": len(np.unique(a * self.n + b)),
                "hot_buckets": sum(r["hot_buckets"] for r in parts),
            }
            keeper = dedup.keep_first(self.n, a, b, pos)
            removed = np.flatnonzero(keeper != np.arange(self.n))
            self.status[removed] = st.CODE["near_dup"]
            self.partner[removed] = self.cid[keeper[removed]]
            tokens, offsets = dedup.token_store(work)
            self.near_info["jaccard"][removed] = st.textsig.pair_jaccard(
                tokens, offsets, removed, keeper[removed], self.cfg.ngram
            )
            self.near_info["edits"][removed] = st.textsig.pair_edits(tokens, offsets, removed, keeper[removed])
            self.near_info["swapped"][removed] = st.textsig.pair_transposed(tokens, offsets, removed, keeper[removed])
        self._save(status=self.status, **{f"near_{k}": v for k, v in self.near_info.items()})
        self._timed("near_dedup", t0)

    def embed_and_cluster(self) -> None:
        """4. Embeddings of the pool (survivors) in the workers; k-means on a sample, labels for all."""
        t0, work, cfg = time.perf_counter(), str(self.work), self.cfg
        self.pool = np.flatnonzero(self.status == 0)  # pool index -> global row, input order
        if not len(self.pool):
            raise ValueError(f"no captions left after cleaning {self.n} inputs (check --field and the filters)")
        self.pool_off = np.searchsorted(self.pool, self.offsets)  # pool index range of each chunk
        es = st.EmbedSettings(cfg.embedder, cfg.batch_size)
        self._map(st.embed_chunk, [(work, c, int(self.offsets[c]), es) for c in range(len(self.chunks))])
        self._timed("embed", t0)
        t0 = time.perf_counter()
        sample = np.arange(len(self.pool))
        if len(sample) > cfg.kmeans_sample:
            sample = dv.select_random(len(self.pool), cfg.kmeans_sample, cfg.seed)
        centroids, _ = dv.kmeans(self.pool_embeddings(sample), cfg.clusters, seed=cfg.seed)
        self.k = len(centroids)
        self._save(centroids=centroids.astype(np.float32))
        self._map(st.label_chunk, [(work, c) for c in range(len(self.chunks))])
        self.labels = np.concatenate(
            [wf.load_npy(wf.work_path(work, "labels", f"c{c:05d}.npy"), mmap=False) for c in range(len(self.chunks))]
        ).astype(np.int64)
        self._timed("cluster", t0)

    def pool_embeddings(self, idx: np.ndarray) -> np.ndarray:
        """Embeddings of pool indices `idx` (sorted), read from the chunks' embedding files."""
        out = []
        for c in range(len(self.chunks)):
            lo, hi = np.searchsorted(idx, self.pool_off[c : c + 2])
            if hi > lo:
                x = wf.load_npy(wf.work_path(self.work, "emb", f"c{c:05d}.npy"))
                out.append(np.asarray(x[idx[lo:hi] - self.pool_off[c]], np.float32))
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    def select(self) -> None:
        """5. The kept `--n`: clusters evenly, farthest-point (on a pool sample), or random; the random baseline."""
        t0, cfg, n_pool = time.perf_counter(), self.cfg, len(self.pool)
        if cfg.select == "random":
            chosen = dv.select_random(n_pool, cfg.n, cfg.seed)
        elif cfg.select == "farthest":
            cand = (
                np.arange(n_pool) if n_pool <= FARTHEST_POOL else dv.select_random(n_pool, FARTHEST_POOL, cfg.seed + 3)
            )
            chosen = cand[dv.select_farthest(self.pool_embeddings(cand), cfg.n, cfg.seed)]
            if cfg.n > len(cand):  # more than the sample: the rest at random
                rest = np.setdiff1d(np.arange(n_pool), cand)
                chosen = np.sort(np.r_[chosen, rest[dv.select_random(len(rest), cfg.n - len(cand), cfg.seed)]])
        else:
            chosen = dv.select_clusters(self.labels, cfg.n, cfg.seed)
        self.chosen = chosen
        not_chosen = np.ones(n_pool, bool)
        not_chosen[chosen] = False
        self.status[self.pool[not_chosen]] = st.CODE["not_selected"]
        baseline = np.zeros(self.n, bool)
        baseline[self.pool[dv.select_random(n_pool, len(chosen), cfg.seed + 2)]] = True
        cluster = np.full(self.n, -1, np.int32)
        cluster[self.pool] = self.labels
        cover_idx = dv.select_random(n_pool, COVER_SAMPLE, cfg.seed + 1)
        cover_in = np.stack([np.ones(len(cover_idx), bool), ~not_chosen[cover_idx], baseline[self.pool[cover_idx]]], 1)
        self._save(
            status=self.status,
            partner=self.partner,
            baseline=baseline,
            cluster=cluster,
            cover=self.pool_embeddings(cover_idx),
            cover_in=cover_in,
        )
        self._timed("select", t0)

    def finalize(self) -> dict[str, Any]:
        """6. Rejects and statistics per chunk; `rejects.parquet`; the diversity report."""
        t0 = time.perf_counter()
        work, n_chunks = str(self.work), len(self.chunks)
        self._map(st.finalize_chunk, [(work, c, int(self.offsets[c]), self.parts) for c in range(n_chunks)])
        grams: Counter = Counter()
        for r in self._map(st.distinct_partition, [(work, p, n_chunks) for p in range(self.parts)], "part"):
            for k, (d, t) in r["counts"].items():
                grams[k] = [grams[k][0] + d, grams[k][1] + t] if k in grams else [d, t]
        with (
            self.store.writer(shards.REJECTS) as stream,
            pq.ParquetWriter(stream, REJECT_SCHEMA, compression="zstd") as w,
        ):
            for c in range(n_chunks):  # streamed, one chunk at a time, in input order
                w.write_table(wf.read_arrow(wf.work_path(self.work, "rejects", f"c{c:05d}.arrow")))
        sets = {"pool": np.arange(len(self.pool)), "selected": self.chosen}
        sets["random_baseline"] = dv.select_random(len(self.pool), len(self.chosen), self.cfg.seed + 2)
        hist = {name: np.bincount(self.labels[idx], minlength=self.k) for name, idx in sets.items()}
        diversity = st.diversity_report(work, n_chunks, hist, dict(grams))
        self._timed("finalize", t0)
        return diversity

    def write_shards(self) -> list[dict[str, Any]]:
        """7a. Caption shards of `--shard-size` kept rows each, in input order, published with the runner's writer (a
        shard finished earlier with the same ids is kept); returns their receipts."""
        t0 = time.perf_counter()
        bounds = zip(self.offsets[:-1], self.offsets[1:], strict=True)
        kept = [int((self.status[a:b] == 0).sum()) for a, b in bounds]
        plan = st.shard_spans(kept, self.offsets.tolist(), self.cfg.shard_size, [t.source for t in self.tasks])
        # From here on the folder is this run's: an incomplete manifest refuses other settings if the run dies.
        self.store.write_json(MANIFEST, {**self.header(len(plan)), "complete": False})
        meta = {"config_digest": self.config_digest}
        args = [(str(self.work), self.cfg.output, i, spans, CAPTION_SCHEMA, meta) for i, spans in enumerate(plan)]
        results = self._map(st.write_shard, args, key="index")
        runner.drop_shards_beyond(self.store, len(results))
        self._timed("write", t0)
        return results

    def report(self, results: list[dict[str, Any]], diversity: dict[str, Any], seconds: float) -> dict[str, Any]:
        """7b. `report.json`, `diversity.json` and the manifest (written once, complete)."""
        codes = Counter(self.status.tolist())
        reasons = {st.REASONS[c]: n for c, n in sorted(codes.items()) if c != 0}
        kept, removed = int(codes.get(0, 0)), self.n - int(codes.get(0, 0))
        report = {
            "inputs": self.n,
            "kept": kept,
            "removed": removed,
            "removed_by_reason": dict(sorted(reasons.items())),
            "duplicates_removed": reasons.get("exact_dup", 0) + reasons.get("near_dup", 0),
            "shards": len(results),
            "seconds": round(seconds, 3),
            "captions_per_s": round(self.n / seconds, 1) if seconds > 0 else None,
            "timings": self.timings,
            **self.stats,
            "chunks": len(self.chunks),
            "partitions": self.parts,
            "workers": self.cfg.workers,
            "diversity": diversity,
        }
        self.store.write_json(shards.DIVERSITY, diversity)
        self.store.write_json(shards.REPORT, {k: v for k, v in report.items() if k != "diversity"})
        self.manifest(results, removed)
        return report

    def header(self, n_shards: int | None) -> dict[str, Any]:
        """The manifest's fixed part: format, versions, the resolved config (no credentials), its digest."""
        cfg = self.cfg
        config = {k: v for k, v in asdict(cfg).items() if k not in cfg.shared_unused}
        if cfg.work_dir is None:
            config.pop("work_dir")
        config.update(inputs=[_resolved(p) for p in cfg.inputs], output=_resolved(cfg.output))
        return {
            "format": CAPTIONS_FORMAT,
            "schema_version": CAPTION_SCHEMA_VERSION,
            "stage": "build-captions",
            "code_version": shards.code_version(),
            "config": config,
            "config_digest": self.config_digest,
            "n_shards": n_shards,
        }

    def manifest(self, results: list[dict[str, Any]], removed: int) -> None:
        """The complete manifest (its `rejected` / `inputs` count the global removals, not per-shard rejects)."""
        runner.write_manifest(self.store, self.header(len(results)), results, removed)


def _resolved(spec: str) -> str:
    """A local path made absolute (links resolved), a URI without credentials."""
    return storage.public(spec) if storage.is_uri(spec) else str(Path(spec).resolve())


class CaptionsStage(Stage):
    """The registry's entry for build-captions: global phases (exact and near duplicates, clustering, selection) over
    all captions, run by `CaptionBuild` on the runner's executor rather than as per-shard units."""

    name = "build-captions"
    help = "Clean, de-duplicate and diversity-select captions into Parquet caption shards, with a diversity report."
    config = CaptionsConfig
    format = CAPTIONS_FORMAT
    schema_version = CAPTION_SCHEMA_VERSION
    schema = CAPTION_SCHEMA
    optional_options = ("inputs",)  # --shapes N makes ShapesWorld captions without inputs

    @classmethod
    def run(cls, cfg: CaptionsConfig) -> dict[str, Any]:
        """Run the stage end to end; returns the report (also in `report.json`, diversity in `diversity.json`)."""
        from pipeline.core import locks, runtime

        validate(cfg)
        with locks.hold(
            Storage(cfg.output)
        ):  # one run at a time; a refused run touches nothing, its work folder neither
            build = CaptionBuild(cfg)
            try:
                with runtime.ray_session(cfg.ray_address, enabled=cfg.workers > 0):
                    if cfg.workers > 0:
                        build.check_shared()
                    return build.run()
            finally:
                wf.remove(build.work)

    @classmethod
    def report_lines(cls, report: dict[str, Any]) -> list[str]:
        """The diversity table, then the report as JSON (the diversity figures are in the table and the file)."""
        return [format_table(report), json.dumps({k: v for k, v in report.items() if k != "diversity"})]

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """The diversity report as plots, samples per cluster and the near-duplicate groups."""
        from pipeline.inspect.captions import captions_sections

        return captions_sections(folder, rejects, limit, seed)
