"""Reading a finished stage output for `lightgen-data inspect`: the manifest check and seeded samples.

Nothing here loads a whole folder: rows are sampled from the manifest's per-shard counts and only the Parquet row
groups / tar shards holding them are read; a whole-set statistic reads one small column of at most `SCAN_ROWS`
rows' worth of shards; the rejects file is streamed in batches, keeping a bounded sample per reason.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.core.schema import MANIFEST, IncompatibleShardsError, read_manifest
from pipeline.core.shards import DIVERSITY, REJECTS, REPORT

SCAN_ROWS = 1_000_000  # rows of one small column read for a whole-set statistic (a histogram, a cluster index)
DEDUP_REASONS = ("exact_dup", "near_dup")
DUP_DETAIL = re.compile(r"^(?P<op>[=~]) (?P<kept>\S+?)(?P<why>(?: [^:]*)?): (?P<text>.*)$", re.S)


class InspectError(ValueError):
    """A folder that is not a finished stage output of a known format."""


@dataclass
class StageDir:
    """A finished stage output: its folder (a local path or a URI), manifest, report (may be empty) and shard paths
    in manifest order."""

    path: str
    manifest: dict[str, Any]
    report: dict[str, Any]
    shards: list[str]

    @property
    def name(self) -> str:
        """The folder's name."""
        return posixpath.basename(self.path.rstrip("/")) if storage.is_uri(self.path) else Path(self.path).name

    @property
    def where(self) -> str:
        """The folder as shown: an absolute local path, or the URI without credentials."""
        return storage.public(self.path) if storage.is_uri(self.path) else str(Path(self.path).resolve())

    @property
    def rows_per_shard(self) -> list[int]:
        """Rows of each shard, from the manifest."""
        return [int(s["rows"]) for s in self.manifest["shards"]]

    def json_file(self, name: str) -> dict[str, Any]:
        """A JSON file of the folder (`report.json`, `diversity.json`), {} when absent."""
        path = storage.join(self.path, name)
        return json.loads(storage.read_bytes(path)) if storage.is_file(path) else {}


def _manifest(root: str, formats: tuple[str, ...]) -> dict[str, Any]:
    """`read_manifest` of a stage output folder, local or on a store."""
    return read_manifest(root, formats, "a stage output folder")


def open_stage(directory: str | Path, formats: tuple[str, ...]) -> StageDir:
    """The stage output in `directory` (a local folder or a URI), read through its manifest; `InspectError` when it
    is not a finished one."""
    root = str(directory) if storage.is_uri(str(directory)) else str(Path(directory))
    path = storage.public(storage.join(root, MANIFEST))
    try:
        manifest = _manifest(root, formats)
    except (FileNotFoundError, IncompatibleShardsError) as e:
        raise InspectError(str(e)) from e
    if not manifest.get("complete"):
        shown = storage.public(root)
        raise InspectError(f"{path}: the run that wrote {shown} has not finished (complete: false); rerun its stage")
    shards = [storage.join(root, s["name"]) for s in manifest.get("shards", [])]
    missing = [posixpath.basename(p) for p in shards if not storage.is_file(p)]
    if missing:
        raise InspectError(f"shards listed in {path} are missing: {missing[:5]}")
    report = (
        json.loads(storage.read_bytes(storage.join(root, REPORT)))
        if storage.is_file(storage.join(root, REPORT))
        else {}
    )
    return StageDir(root, manifest, report, shards)


def source(path: str) -> str | IO[bytes]:
    """What pyarrow's Parquet readers take for `path`: a local path, or an open file on the URI's store."""
    return storage.open_input(path) if storage.is_uri(path) else path


def diversity(stage: StageDir) -> dict[str, Any]:
    """build-captions' diversity report ({} when absent)."""
    return stage.json_file(DIVERSITY)


# ------------------------------------------------------------------------------------------------------ sampling


def sample_positions(rows_per_shard: list[int], limit: int, seed: int) -> dict[int, list[int]]:
    """`limit` rows drawn without replacement over all shards -> {shard index: sorted rows within the shard}."""
    total = sum(rows_per_shard)
    if total == 0 or limit <= 0:
        return {}
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(limit, total), replace=False))
    starts = np.cumsum([0, *rows_per_shard])
    shard = np.searchsorted(starts, picks, side="right") - 1
    out: dict[int, list[int]] = {}
    for s, p in zip(shard.tolist(), picks.tolist(), strict=True):
        out.setdefault(s, []).append(p - int(starts[s]))
    return out


def scan_shards(rows_per_shard: list[int], seed: int, budget: int | None = None) -> list[int]:
    """Shard indices (in order) of a seeded subset holding at most `budget` rows (`SCAN_ROWS`; at least one shard)."""
    budget = SCAN_ROWS if budget is None else budget
    order = np.random.default_rng(seed).permutation(len(rows_per_shard)).tolist()
    chosen, rows = [], 0
    for i in order:
        if chosen and rows + rows_per_shard[i] > budget:
            break
        chosen.append(i)
        rows += rows_per_shard[i]
    return sorted(chosen)


def parquet_file(path: str) -> pq.ParquetFile:
    """A shard opened for reading; `InspectError` naming it when it is not a readable Parquet file."""
    try:
        return pq.ParquetFile(source(path))
    except pa.ArrowInvalid as e:
        raise InspectError(f"{storage.public(path)} is not a readable Parquet shard: {e}") from e


def read_parquet_rows(path: str, rows: list[int], columns: list[str]) -> pa.Table:
    """Rows `rows` (sorted, within the file) of `columns`, reading only the row groups that hold them."""
    f = parquet_file(path)
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    parts = []
    for g in sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows}):
        local = [r - int(starts[g]) for r in rows if starts[g] <= r < starts[g + 1]]
        parts.append(f.read_row_group(g, columns=columns).take(local))
    return pa.concat_tables(parts) if parts else f.schema_arrow.empty_table().select(columns)


def read_sampled_rows(stage: StageDir, picks: dict[int, list[int]], columns: list[str]) -> pa.Table:
    """The sampled rows of a Parquet stage output, in shard order, with `columns`."""
    tables = [read_parquet_rows(stage.shards[s], rows, columns) for s, rows in sorted(picks.items())]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def scan_column(stage: StageDir, column: str, seed: int) -> tuple[pa.Table, int]:
    """One column over a seeded subset of shards (`scan_shards`): (table of shard, row, value; rows read)."""
    parts = []
    for s in scan_shards(stage.rows_per_shard, seed):
        values = pq.read_table(source(stage.shards[s]), columns=[column]).column(column)
        index = {"shard": pa.array(np.full(len(values), s, np.int32)), "row": pa.array(np.arange(len(values)))}
        parts.append(pa.table({**index, column: values}))
    if not parts:
        parts.append(pa.table({"shard": pa.array([], pa.int32()), "row": pa.array([], pa.int64()), column: []}))
    table = pa.concat_tables(parts)
    return table, table.num_rows


def read_tar_samples(path: str, rows: list[int]) -> list[dict[str, bytes]]:
    """Samples number `rows` (sorted, in member order) of a webdataset tar: {"__key__": key, ext: bytes} each."""
    try:
        with storage.open_buffered(path) as raw, tarfile.open(fileobj=raw) as tf:
            return _tar_samples(tf, set(rows), max(rows))
    except tarfile.TarError as e:
        raise InspectError(f"{storage.public(path)} is not a readable tar shard: {e}") from e


def _tar_samples(tf: tarfile.TarFile, wanted: set[int], last: int) -> list[dict[str, bytes]]:
    """Walk the members in order, grouping them by key (the path up to the first dot of the file name)."""
    out: list[dict[str, bytes]] = []
    index, key, sample = -1, None, {}
    for m in tf:
        if not m.isfile():
            continue
        base, _, ext = Path(m.name).name.partition(".")
        k = str(Path(m.name).parent / base) if "/" in m.name else base
        if k != key:
            if index in wanted:
                out.append(sample)
            index, key, sample = index + 1, k, {"__key__": k.encode()}
            if index > last:
                return out
        if index in wanted:
            sample[ext] = tf.extractfile(m).read()
    if index in wanted:
        out.append(sample)
    return out


# ------------------------------------------------------------------------------------------------------ rejects


@dataclass
class RejectSample:
    """What a streamed pass over `rejects.parquet` keeps: counts by reason, a few examples per reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def _batches(path: str, columns: list[str]):
    """Record batches of a Parquet file's `columns` (nothing when the file is absent)."""
    if storage.is_file(path):
        yield from pq.ParquetFile(source(path)).iter_batches(batch_size=65_536, columns=columns)


def sample_rejects(stage: StageDir, per_reason: int, seed: int) -> RejectSample:
    """Counts by reason and a uniform sample of `per_reason` rows of each reason, streaming the rejects file."""
    rng = np.random.default_rng(seed)
    out = RejectSample()
    keys: dict[str, np.ndarray] = {}
    for batch in _batches(storage.join(stage.path, REJECTS), ["id", "source", "reason", "detail"]):
        reasons = batch.column("reason").to_numpy(zero_copy_only=False)
        for reason in np.unique(reasons).tolist():
            rows = np.flatnonzero(reasons == reason)
            out.counts[reason] = out.counts.get(reason, 0) + len(rows)
            # Priority sampling: the per_reason smallest random keys over the whole file are a uniform sample.
            new = rng.random(len(rows))
            old = keys.get(reason, np.empty(0))
            both = np.concatenate([old, new])
            keep = np.sort(np.argsort(both, kind="stable")[:per_reason])
            taken = batch.take(pa.array(rows[keep[keep >= len(old)] - len(old)])).to_pylist()
            examples = out.examples.get(reason, [])
            out.examples[reason] = [examples[i] for i in keep[keep < len(old)]] + taken
            keys[reason] = both[keep]
    return out


def parse_dup(detail: str) -> dict[str, str] | None:
    """A dedup reject's detail (`= <kept id>: text`, `~ <kept id> (jaccard 0.917) ...: text`) as its parts."""
    m = DUP_DETAIL.match(detail)
    return {k: v.strip() for k, v in m.groupdict().items()} if m else None


def dup_groups(stage: StageDir, kept_ids: list[str], per_group: int) -> dict[str, dict[str, Any]]:
    """{kept id: {"size": removed rows, "members": up to `per_group` reject rows}} of the groups of `kept_ids`."""
    groups: dict[str, dict[str, Any]] = {k: {"size": 0, "members": []} for k in kept_ids}
    wanted = pa.array(kept_ids, pa.string())
    for batch in _batches(storage.join(stage.path, REJECTS), ["id", "source", "reason", "detail"]):
        dedup = pc.is_in(batch.column("reason"), pa.array(DEDUP_REASONS))
        batch = batch.filter(dedup)
        kept = pc.extract_regex(batch.column("detail"), r"^[=~] (?P<kept>[^\s:]+)").field("kept")
        batch = batch.filter(pc.is_in(kept, wanted))
        for row in batch.to_pylist():
            group = groups[parse_dup(row["detail"])["kept"]]
            group["size"] += 1
            if len(group["members"]) < per_group:
                group["members"].append(row)
    return groups


def lookup_captions(stage: StageDir, ids: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """{id: {"caption", "status", "cluster"}} of `ids` among the kept captions (the shards `scan_shards` picks),
    then among the other rejects (not selected after de-duplication)."""
    found: dict[str, dict[str, Any]] = {}
    wanted = pa.array(ids, pa.string())
    for s in scan_shards(stage.rows_per_shard, seed):
        for batch in _batches(stage.shards[s], ["id", "caption", "cluster"]):
            for row in batch.filter(pc.is_in(batch.column("id"), wanted)).to_pylist():
                found[row["id"]] = {**row, "status": "kept"}
        if len(found) == len(ids):
            return found
    for batch in _batches(storage.join(stage.path, REJECTS), ["id", "reason", "detail"]):
        other = pc.invert(pc.is_in(batch.column("reason"), pa.array(DEDUP_REASONS)))
        hits = pc.and_(pc.is_in(batch.column("id"), wanted), other)
        for row in batch.filter(hits).to_pylist():
            found.setdefault(row["id"], {"caption": row["detail"], "status": row["reason"], "cluster": None})
    return found
