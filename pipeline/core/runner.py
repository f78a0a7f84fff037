"""One runner for every stage: plan, resume, run (in this process or on Ray Data), manifest, rejects, report.

1. The driver plans: `stage.validate()`, `stage.plan()` (file lists and row ranges, one unit per output shard).
2. It holds the output folder (one run at a time: an flock on a local folder, a lease on object storage;
   `pipeline/core/locks.py`) and prepares it: `--overwrite` clears it; temporaries of a killed run and shards beyond the
   plan go; a folder made with other settings is refused.
3. Every unit goes to a worker (`UnitRunner`), which keeps a finished shard only if its receipt matches the unit and
   config digests and the shard's sha256 still matches the receipt, and otherwise reads its inputs, calls
   `stage.process` batch by batch and publishes the shard, its rejects and then its receipt (atomic writes; the
   receipt last, so a shard counts as finished only when all three are there). Only the receipt, a few hundred
   bytes, goes back to the driver.
   The executor (`execute`, `pipeline/core/executors.py`) runs the units in this process without importing Ray
   (`--workers 0`), or maps them with Ray Data on an actor pool (models loaded once per actor, actors restarted and
   units retried when a worker dies). `build-captions` runs its global phases through the same executor and
   publishes its shards with the same writer (`publish_shard`, `write_manifest`).
4. The driver merges the per-shard rejects, writes `manifest.json` once (from the receipts) and `report.json`.
Counts add up: inputs = written + rejected, for each shard and in total.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import locks
from pipeline.core.executors import execute
from pipeline.core.schema import MANIFEST, REJECT_SCHEMA, with_metadata
from pipeline.core.shards import (
    DIVERSITY,
    REJECTS,
    REPORT,
    code_version,
    digest,
    parquet_writer,
    rejects_name,
    rejects_table,
    shard_name,
)
from pipeline.core.stage import Output, Reject, Stage, WorkUnit, batched
from pipeline.core.storage import TMP_MARK, Storage, public, public_values


def receipt_name(index: int) -> str:
    """`part-00007.done.json`: what shard 7 holds and what made it; written last."""
    return f"part-{index:05d}.done.json"


def _index_of(name: str) -> int | None:
    """The shard index of a file this runner writes (`part-NNNNN.*`), else None."""
    if not name.startswith("part-"):
        return None
    head = name[5:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _ours(name: str) -> bool:
    """Whether `name` is a file the runner writes."""
    return _index_of(name) is not None or name in (REJECTS, REPORT, MANIFEST, DIVERSITY)


# ------------------------------------------------------------------------------------------------ the worker side


class _ShardOut:
    """The open output of one shard: a Parquet writer or a webdataset tar writer on a storage stream."""

    def __init__(self, stage: Stage, stream: Any, meta: dict[str, Any]) -> None:
        self.rows = 0
        self.schema = stage.schema
        if self.schema is not None:
            self.writer = parquet_writer(stream, with_metadata(self.schema, meta), stage.dictionary_columns)
        else:
            import webdataset

            self.writer = webdataset.TarWriter(stream, encoder=False, mtime=1.0, user="lightgen", group="lightgen")

    def write(self, rows: pa.Table | list[dict[str, Any]] | None) -> None:
        """Append a batch of rows (one Parquet row group) or tar samples."""
        if rows is None or len(rows) == 0:
            return
        if self.schema is not None:
            self.writer.write_table(rows.cast(self.schema) if rows.schema != self.schema else rows)
        else:
            for sample in rows:
                self.writer.write(sample)
        self.rows += len(rows)

    def close(self) -> None:
        """Finish the file (footer / end-of-archive blocks)."""
        self.writer.close()


def finished(store: Storage, index: int, name: str, expect: dict[str, Any]) -> dict | None:
    """The receipt of shard `index` (file `name`) if it holds the `expect`ed digests, its rejects file is there and
    the shard's size and sha256 still match; else None (the shard is redone)."""
    receipt = store.read_json(receipt_name(index))
    if not isinstance(receipt, dict) or any(receipt.get(k) != v for k, v in expect.items()):
        return None
    if not (store.exists(name) and store.exists(rejects_name(index))):
        return None
    if store.size(name) != receipt.get("bytes") or store.sha256(name) != receipt.get("sha256"):
        return None  # changed or damaged since it was written: redo it
    return receipt


def publish_receipt(
    store: Storage,
    index: int,
    name: str,
    rows: int,
    rejects: list[Reject],
    meta: dict[str, Any],
    t0: float,
    unit_digest: str | None = None,
) -> dict[str, Any]:
    """After shard `name` is published: its rejects file, then its receipt (last: it marks the shard finished).
    `unit_digest` (where the inputs were and when they changed) goes into the receipt only, never into the files: a
    shard's bytes depend on its rows and settings, not on where its inputs lived."""
    with store.writer(rejects_name(index)) as stream:
        pq.write_table(rejects_table(map(asdict, rejects), meta), stream, compression="zstd")
    receipt = {
        "index": index,
        "name": name,
        "rows": rows,
        "rejected": len(rejects),
        "rejected_by_reason": dict(Counter(r.reason for r in rejects)),
        "bytes": store.size(name),
        "sha256": store.sha256(name),
        **meta,
        **({"unit_digest": unit_digest} if unit_digest is not None else {}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.write_json(receipt_name(index), receipt)
    return receipt


def publish_shard(
    store: Storage, index: int, schema: pa.Schema, meta: dict[str, Any], tables: Iterable[pa.Table]
) -> dict[str, Any]:
    """Parquet shard `index` from `tables` (one row group each), with no rejects, then its receipt; a shard already
    finished with the same `meta` is kept. Returns the receipt."""
    name = shard_name(index)
    done = finished(store, index, name, meta)
    if done is not None:
        return {**done, "skipped": True}
    t0, rows = time.perf_counter(), 0
    with store.writer(name) as stream:
        writer = parquet_writer(stream, with_metadata(schema, meta))
        try:
            for table in tables:
                if len(table):
                    writer.write_table(table)
                    rows += len(table)
        finally:
            writer.close()
    return {**publish_receipt(store, index, name, rows, [], meta, t0), "skipped": False}


def _items(stage: Stage, unit: WorkUnit, rejects: list[Reject]) -> Iterator[Any]:
    """The unit's readable items; the unreadable ones go to `rejects`."""
    for item in stage.read(unit):
        if isinstance(item, Reject):
            rejects.append(item)
        else:
            yield item


class UnitRunner:
    """Runs units of one stage in a worker: the stage's models are loaded on the first unit that needs them."""

    def __init__(self, stage: Stage, config_digest: str) -> None:
        self.stage = stage
        self.config_digest = config_digest
        self.store = Storage(stage.cfg.output)
        self._ready = False

    def __call__(self, unit: WorkUnit) -> dict[str, Any]:
        """Finish shard `unit.index` (or keep it, if already finished) and return its receipt."""
        unit_digest = unit.digest()
        name = shard_name(unit.index, self.stage.output_ext)
        done = finished(self.store, unit.index, name, {"unit_digest": unit_digest, "config_digest": self.config_digest})
        if done is not None:
            return {**done, "skipped": True}
        if not self._ready:
            self.stage.setup()
            self._ready = True
        t0 = time.perf_counter()
        meta = {"config_digest": self.config_digest, "shard": unit.index, **self.stage.shard_meta()}
        rejects: list[Reject] = []
        with self.store.writer(name) as stream:
            out = _ShardOut(self.stage, stream, meta)
            try:
                for batch in batched(_items(self.stage, unit, rejects), self.stage.cfg.batch_size):
                    result: Output = self.stage.process(batch)
                    out.write(result.rows)
                    rejects.extend(result.rejects)
            finally:
                out.close()  # on an error too: the temporary file is then deleted whole
        receipt = publish_receipt(self.store, unit.index, name, out.rows, rejects, meta, t0, unit_digest)
        return {**receipt, "skipped": False}


def _unit_runner(stage_cls: type[Stage], cfg: Any, config_digest: str) -> UnitRunner:
    """A `UnitRunner` built in a Ray worker (the stage is rebuilt from its class and config there)."""
    return UnitRunner(stage_cls(cfg), config_digest)


# ------------------------------------------------------------------------------------------------ the driver side


def prepare_output(store: Storage, stage_name: str, overwrite: bool, config_digest: str) -> None:
    """Clear the runner's files (`--overwrite`), or drop a killed run's temporaries and refuse a folder holding
    another stage's output or output made with other settings (its manifest's config digest)."""
    store.makedirs()
    names = store.list()
    if overwrite:
        for n in names:
            if _ours(n.split(TMP_MARK)[0]):
                store.delete(n)
        return
    store.clean_temporaries(_ours)
    old = store.read_json(MANIFEST) if MANIFEST in names else None
    where = public(store.uri)
    if isinstance(old, dict) and old.get("config_digest") not in (None, config_digest):
        raise ValueError(
            f"{where} holds {old.get('stage', 'stage')} output made with other settings "
            f"(config digest {str(old.get('config_digest'))[:12]}); pass --overwrite to replace it or choose another "
            "--output"
        )
    if isinstance(old, dict) and old.get("stage") not in (None, stage_name):
        raise ValueError(f"{where} holds {old.get('stage')} output; choose another --output")


def drop_shards_beyond(store: Storage, n_units: int) -> None:
    """Delete shard files (shards, their rejects and receipts) with index >= `n_units`: left by a larger plan."""
    for n in store.list():
        index = _index_of(n)
        if index is not None and index >= n_units:
            store.delete(n)


def _prepare(store: Storage, stage: Stage, n_units: int, config_digest: str) -> None:
    """Clear (`--overwrite`) or check the output folder; drop temporaries and shards beyond the plan."""
    prepare_output(store, stage.name, stage.cfg.overwrite, config_digest)
    if not stage.cfg.overwrite:
        drop_shards_beyond(store, n_units)


def _header(stage: Stage, config_digest: str, n_units: int) -> dict[str, Any]:
    """The manifest's fixed part."""
    return {
        "format": stage.format,
        "schema_version": stage.schema_version,
        "stage": stage.name,
        "code_version": code_version(),
        "config": public_values({**asdict(stage.cfg), **stage.content()}),  # URIs without credentials
        "config_digest": config_digest,
        "n_shards": n_units,
    }


def _receipts(stage: Stage, units: list[WorkUnit], config_digest: str) -> Iterator[dict[str, Any]]:
    """Every unit's receipt, from the executor: in this process (`workers=0`, the stage object itself) or from Ray
    Data actors (each rebuilds the stage from its class and config)."""
    cfg = stage.cfg
    if cfg.workers == 0:
        make: Callable[[], Callable[[WorkUnit], dict[str, Any]]] = lambda: UnitRunner(stage, config_digest)  # noqa: E731
    else:
        make = functools.partial(_unit_runner, type(stage), cfg, config_digest)
    yield from execute(
        make,
        units,
        workers=cfg.workers,
        ray_address=cfg.ray_address,
        cpus=cfg.cpus_per_worker,
        gpus=cfg.gpus_per_worker,
        shared=[cfg.output],
    )


def _progress(receipts: Iterator[dict[str, Any]], total: int, stage: Stage) -> Iterator[dict[str, Any]]:
    """One progress bar over shards, with rows written and rejected so far."""
    if not stage.cfg.progress:
        yield from receipts
        return
    from tqdm import tqdm

    rows = rejected = 0
    with tqdm(total=total, unit="shard", desc=stage.name) as bar:
        for r in receipts:
            rows, rejected = rows + r["rows"], rejected + r["rejected"]
            bar.update(1)
            bar.set_postfix(rows=rows, rejected=rejected)
            yield r


def _merge_rejects(store: Storage, n_units: int) -> None:
    """Concatenate the per-shard rejects, in shard order, into `rejects.parquet` (streamed, one shard at a time)."""
    with store.writer(REJECTS) as stream, pq.ParquetWriter(stream, REJECT_SCHEMA, compression="zstd") as writer:
        for i in range(n_units):
            with store.fs.open_input_file(store.path(rejects_name(i))) as f:
                writer.write_table(pq.read_table(f).cast(REJECT_SCHEMA))


def _agreed_meta(receipts: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per-shard metadata (encoder names, shapes) that every shard agrees on; an error when they disagree."""
    out = {}
    for key in keys:
        values = {json.dumps(r.get(key), sort_keys=True) for r in receipts}
        if len(values) > 1:
            raise ValueError(f"shards disagree on {key}: {sorted(values)[:3]}")
        out[key] = json.loads(values.pop()) if values else None
    return out


def run_stage(stage: Stage) -> dict[str, Any]:
    """Run `stage` end to end (resuming unless `--overwrite`); returns the report, also written to `report.json`."""
    t0 = time.perf_counter()
    # 1. Plan.
    stage.cfg.check()
    stage.validate()
    units = stage.plan()
    if not units:
        raise ValueError(f"no inputs to {stage.name} in {list(stage.cfg.inputs)}")
    config_digest = digest(stage.content())
    # 2. Hold the output folder (one run at a time: `pipeline/core/locks.py`), then prepare it; an incomplete manifest
    # marks the folder as this stage's while it runs.
    store = Storage(stage.cfg.output)
    with locks.hold(store):
        return _run_held(stage, store, units, config_digest, t0)


def _run_held(stage: Stage, store: Storage, units: list[WorkUnit], config_digest: str, t0: float) -> dict[str, Any]:
    """Steps 2-4 of `run_stage`, holding the output folder."""
    _prepare(store, stage, len(units), config_digest)
    header = _header(stage, config_digest, len(units))
    store.write_json(MANIFEST, {**header, "complete": False})
    # 3. Run every unit; only receipts come back.
    receipts: dict[int, dict[str, Any]] = {}
    for r in _progress(_receipts(stage, units, config_digest), len(units), stage):
        receipts[r["index"]] = r
    missing = sorted(set(range(len(units))) - set(receipts))
    if missing:
        raise RuntimeError(f"{len(missing)} shards did not finish (first: {shard_name(missing[0])}); rerun to resume")
    ordered = [receipts[i] for i in range(len(units))]
    # 4. Rejects, manifest, report; temporaries of workers that died in this run (a lost node) go.
    store.clean_temporaries(_ours)
    _merge_rejects(store, len(units))
    report = _report(stage, ordered, time.perf_counter() - t0)
    store.write_json(REPORT, report)
    meta_keys = sorted({k for r in ordered for k in r} - {*ENTRY_KEYS, "rejected_by_reason", "seconds", "skipped"})
    meta_keys = [k for k in meta_keys if k not in ("unit_digest", "config_digest", "shard")]
    write_manifest(store, header, ordered, report["rejected"], **_agreed_meta(ordered, meta_keys))
    return report


ENTRY_KEYS = ("index", "name", "rows", "rejected", "bytes", "sha256")  # a shard's entry in the manifest


def write_manifest(
    store: Storage, header: dict[str, Any], receipts: list[dict[str, Any]], rejected: int, **extra: Any
) -> dict[str, Any]:
    """The complete manifest from the receipts in shard order: header, totals (`inputs = rows + rejected`; a stage
    whose removals are not per shard, build-captions, gives its own `rejected`), one entry per shard; returns it."""
    entries = [{k: r[k] for k in ENTRY_KEYS} for r in receipts]
    rows = sum(e["rows"] for e in entries)
    manifest = {
        **header,
        "complete": True,
        "rows": rows,
        "rejected": rejected,
        "inputs": rows + rejected,
        "rows_per_shard": [e["rows"] for e in entries],
        "shards": entries,
        **extra,
    }
    store.write_json(MANIFEST, manifest)
    return manifest


def _report(stage: Stage, receipts: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The run's counts; `inputs = written + rejected` holds by construction."""
    written = sum(r["rows"] for r in receipts)
    rejected = sum(r["rejected"] for r in receipts)
    reasons: Counter[str] = Counter()
    for r in receipts:
        reasons.update(r["rejected_by_reason"])
    ran = [r for r in receipts if not r["skipped"]]
    rows_this_run = sum(r["rows"] + r["rejected"] for r in ran)
    counts = {
        "stage": stage.name,
        "inputs": written + rejected,
        "written": written,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "shards": len(receipts),
        "shards_skipped": len(receipts) - len(ran),
        "shards_run": len(ran),
        "inputs_this_run": rows_this_run,
        "written_this_run": sum(r["rows"] for r in ran),
        "seconds": round(seconds, 3),
        "inputs_per_s": round(rows_this_run / seconds, 3) if seconds > 0 and ran else None,
    }
    return {**counts, **stage.report(counts)}
