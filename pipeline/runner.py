"""One runner for every stage: plan, resume, run (in this process or on Ray Data), manifest, rejects, report.

1. The driver plans: `stage.validate()`, `stage.plan()` (file lists and row ranges, one unit per output shard).
2. It prepares the output: `--overwrite` clears it; temporaries of a killed run and shards beyond the plan go; a
   folder made with other settings is refused.
3. Every unit goes to a worker (`run_unit`), which keeps a finished shard only if its receipt matches the unit and
   config digests and the shard's sha256 still matches the receipt, and otherwise reads its inputs, calls
   `stage.process` batch by batch and publishes the shard, its rejects and then its receipt (atomic writes; the
   receipt last, so a shard counts as finished only when all three are there). Only the receipt, a few hundred
   bytes, goes back to the driver.
   `--workers 0` runs the units in this process without importing Ray; otherwise Ray Data maps them on an actor
   pool (models loaded once per actor, actors restarted and units retried when a worker dies).
4. The driver merges the per-shard rejects, writes `manifest.json` once (from the receipts) and `report.json`.
Counts add up: inputs = written + rejected, for each shard and in total.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import MANIFEST, REJECT_SCHEMA, with_metadata
from pipeline.shards import REJECTS, REPORT, code_version, digest, parquet_writer, rejects_name, shard_name
from pipeline.stage import Output, Reject, Stage, WorkUnit, batched
from pipeline.storage import TMP_MARK, Storage


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
    return _index_of(name) is not None or name in (REJECTS, REPORT, MANIFEST)


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


def _rejects_table(rejects: list[Reject], meta: dict[str, Any]) -> pa.Table:
    """Rejects as a table with `REJECT_SCHEMA` carrying the shard metadata."""
    cols = {f.name: pa.array([getattr(r, f.name) for r in rejects], f.type) for f in REJECT_SCHEMA}
    return pa.table(cols, schema=with_metadata(REJECT_SCHEMA, meta))


def _finished(store: Storage, stage: Stage, unit: WorkUnit, unit_digest: str, config_digest: str) -> dict | None:
    """The receipt of shard `unit.index` if it is finished for these inputs and settings and its bytes check out."""
    receipt = store.read_json(receipt_name(unit.index))
    if not isinstance(receipt, dict):
        return None
    if receipt.get("unit_digest") != unit_digest or receipt.get("config_digest") != config_digest:
        return None
    name = shard_name(unit.index, stage.output_ext)
    if not (store.exists(name) and store.exists(rejects_name(unit.index))):
        return None
    if store.size(name) != receipt.get("bytes") or store.sha256(name) != receipt.get("sha256"):
        return None  # changed or damaged since it was written: redo it
    return receipt


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
        done = _finished(self.store, self.stage, unit, unit_digest, self.config_digest)
        if done is not None:
            return {**done, "skipped": True}
        if not self._ready:
            self.stage.setup()
            self._ready = True
        t0 = time.perf_counter()
        meta = {"unit_digest": unit_digest, "config_digest": self.config_digest, "shard": unit.index}
        meta.update(self.stage.shard_meta())
        name = shard_name(unit.index, self.stage.output_ext)
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
        with self.store.writer(rejects_name(unit.index)) as stream:
            pq.write_table(_rejects_table(rejects, meta), stream, compression="zstd")
        receipt = {
            "index": unit.index,
            "name": name,
            "rows": out.rows,
            "rejected": len(rejects),
            "rejected_by_reason": dict(Counter(r.reason for r in rejects)),
            "bytes": self.store.size(name),
            "sha256": self.store.sha256(name),
            **meta,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.store.write_json(receipt_name(unit.index), receipt)
        return {**receipt, "skipped": False}


class _RayUnitActor:
    """The Ray Data actor: one `UnitRunner` per actor; a batch of serialized units in, their receipts out."""

    def __init__(self, stage_cls: type[Stage], cfg: Any, config_digest: str) -> None:
        self.run = UnitRunner(stage_cls(cfg), config_digest)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        receipts = [self.run(WorkUnit.from_json(json.loads(str(u)))) for u in batch["unit"]]
        return {"receipt": [json.dumps(r) for r in receipts]}


# ------------------------------------------------------------------------------------------------ the driver side


def _prepare(store: Storage, stage: Stage, n_units: int, config_digest: str) -> None:
    """Clear (`--overwrite`) or check the output folder; drop temporaries and shards beyond the plan."""
    store.makedirs()
    names = store.list()
    if stage.cfg.overwrite:
        for n in names:
            if _ours(n.split(TMP_MARK)[0]):
                store.delete(n)
        return
    store.clean_temporaries(_ours)
    old = store.read_json(MANIFEST) if MANIFEST in names else None
    if isinstance(old, dict) and old.get("config_digest") not in (None, config_digest):
        raise ValueError(
            f"{stage.cfg.output} holds {old.get('stage', 'stage')} output made with other settings "
            f"(config digest {str(old.get('config_digest'))[:12]}); pass --overwrite to replace it or choose another "
            "--output"
        )
    if isinstance(old, dict) and old.get("stage") not in (None, stage.name):
        raise ValueError(f"{stage.cfg.output} holds {old.get('stage')} output; choose another --output")
    for n in names:
        index = _index_of(n)
        if index is not None and index >= n_units:
            store.delete(n)


def _header(stage: Stage, config_digest: str, n_units: int) -> dict[str, Any]:
    """The manifest's fixed part."""
    return {
        "format": stage.format,
        "schema_version": stage.schema_version,
        "stage": stage.name,
        "code_version": code_version(),
        "config": {**asdict(stage.cfg), **stage.content()},
        "config_digest": config_digest,
        "n_shards": n_units,
    }


def _ray_receipts(stage: Stage, units: list[WorkUnit], config_digest: str) -> Iterator[dict[str, Any]]:
    """Map the units over a Ray Data actor pool; yield receipts as shards finish."""

    from pipeline import runtime

    cfg = stage.cfg
    with runtime.ray_session(cfg.ray_address):  # shut down after the run if this run started it
        yield from _ray_map(stage, units, config_digest)


def _ray_map(stage: Stage, units: list[WorkUnit], config_digest: str) -> Iterator[dict[str, Any]]:
    """The Ray Data job: units -> actor pool -> receipts."""
    import ray.data

    from pipeline import runtime

    cfg = stage.cfg
    runtime.check_shared_storage(cfg.output)
    cpus, gpus = runtime.worker_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)
    ds = ray.data.from_items([{"unit": json.dumps(u.to_json())} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        _RayUnitActor,
        fn_constructor_kwargs={"stage_cls": type(stage), "cfg": cfg, "config_digest": config_digest},
        compute=ray.data.ActorPoolStrategy(size=min(cfg.workers, len(units)), max_tasks_in_flight_per_actor=1),
        batch_size=1,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus,
        # Ray Data's actor-pool defaults restart a dead actor and retry its unit (units are idempotent).
    )
    for row in ds.iter_rows():
        yield json.loads(str(row["receipt"]))


def _receipts(stage: Stage, units: list[WorkUnit], config_digest: str) -> Iterator[dict[str, Any]]:
    """Every unit's receipt: in this process (`workers=0`, no Ray import) or from Ray."""
    if stage.cfg.workers == 0:
        run = UnitRunner(stage, config_digest)
        for unit in units:
            yield run(unit)
    elif units:
        yield from _ray_receipts(stage, units, config_digest)


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
    # 2. Prepare the output; an incomplete manifest marks the folder as this stage's while it runs.
    store = Storage(stage.cfg.output)
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
    # 4. Rejects, manifest, report.
    _merge_rejects(store, len(units))
    report = _report(stage, ordered, time.perf_counter() - t0)
    store.write_json(REPORT, report)
    entries = [{k: r[k] for k in ("index", "name", "rows", "rejected", "bytes", "sha256")} for r in ordered]
    meta_keys = sorted({k for r in ordered for k in r} - {*entries[0], "rejected_by_reason", "seconds", "skipped"})
    meta_keys = [k for k in meta_keys if k not in ("unit_digest", "config_digest", "shard")]
    manifest = {
        **header,
        "complete": True,
        "rows": report["written"],
        "rejected": report["rejected"],
        "inputs": report["inputs"],
        "rows_per_shard": [e["rows"] for e in entries],
        "shards": entries,
        **_agreed_meta(ordered, meta_keys),
    }
    store.write_json(MANIFEST, manifest)
    return report


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
