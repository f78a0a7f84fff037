"""Shard files on disk: deterministic names, atomic writes, completion checks, rejects, manifests.

A shard is complete exactly when its final name exists: it is written under a temporary name and renamed,
after its rejects file. So a rerun can trust every `part-NNNNN.parquet` it finds (after checking that it was
made from the same inputs and config, recorded in the file's schema metadata) and redo the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import REJECT_SCHEMA, with_metadata

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
REJECTS_RE = re.compile(r"^part-(\d{5,})\.rejects\.parquet$")
TMP_MARK = ".tmp-"
REJECTS = "rejects.parquet"
REPORT = "report.json"
DIVERSITY = "diversity.json"  # build-captions' diversity report


def shard_name(index: int, ext: str = "parquet") -> str:
    """`part-00007.parquet` for shard 7 (`ext="tar"`: `part-00007.tar`)."""
    return f"part-{index:05d}.{ext}"


def rejects_name(index: int) -> str:
    """`part-00007.rejects.parquet`: the inputs of shard 7 that were rejected."""
    return f"part-{index:05d}.rejects.parquet"


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (identifies inputs and configs across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique per process so concurrent writers never share one."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def _publish(tmp: Path, path: Path) -> None:
    """fsync `tmp` and rename it to `path` (atomic on POSIX: readers see the old file or the whole new one)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` via a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    _publish(tmp, path)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write a small table as Parquet to `path` via a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rejects_table(rejects: Iterable[dict[str, str]]) -> pa.Table:
    """Rows of {id, source, reason, detail} as a table with `REJECT_SCHEMA`."""
    rows = list(rejects)
    return pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in REJECT_SCHEMA}, REJECT_SCHEMA)


@dataclass
class ShardResult:
    """What a finished shard holds, as recorded in the manifest."""

    index: int
    name: str
    rows: int
    rejected: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _float16_leaves(schema: pa.Schema) -> list[str]:
    """Parquet leaf paths of float16 list columns (byte-stream-split makes their exponent bytes compressible)."""
    return [
        f"{f.name}.list.element"
        for f in schema
        if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and f.type.value_type == pa.float16()
    ]


def parquet_writer(sink: Any, schema: pa.Schema, dictionary_columns: Sequence[str] = ()) -> pq.ParquetWriter:
    """The one Parquet writer setup of every shard: zstd, dictionary encoding where asked, float16 lists split."""
    return pq.ParquetWriter(
        sink,
        schema,
        compression="zstd",
        use_dictionary=list(dictionary_columns) or False,
        use_byte_stream_split=_float16_leaves(schema) or False,
    )


class ShardWriter:
    """Stream row batches into `part-NNNNN.parquet` atomically; `commit(rejects)` publishes shard and rejects.

    Use as a context manager: leaving it without `commit` (an exception, a kill) leaves only a temporary file,
    which the next run deletes.
    """

    def __init__(self, out_dir: str | Path, index: int, schema: pa.Schema, meta: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.index = index
        self.path = self.out_dir / shard_name(index)
        self.tmp = _tmp_path(self.path)
        self.schema = with_metadata(schema, {**meta, "shard": index})
        self.rows = 0
        self._writer = parquet_writer(self.tmp, self.schema)

    def write(self, table: pa.Table) -> None:
        """Append `table` (one row group) to the shard."""
        if len(table):
            self._writer.write_table(table)  # row group = one encoder batch
            self.rows += len(table)

    def commit(self, rejects: pa.Table) -> ShardResult:
        """Publish the rejects file, then the shard (its final name marks the shard complete)."""
        self._writer.close()
        write_table_atomic(self.out_dir / rejects_name(self.index), rejects)
        _publish(self.tmp, self.path)
        return ShardResult(
            self.index, self.path.name, self.rows, len(rejects), self.path.stat().st_size, sha256_file(self.path)
        )

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def shard_result(out_dir: str | Path, index: int, known: dict[str, Any] | None = None) -> ShardResult:
    """The `ShardResult` of a complete shard on disk; reuses `known` (a manifest entry) if the size matches."""
    out = Path(out_dir)
    path = out / shard_name(index)
    size = path.stat().st_size
    rows = pq.read_metadata(path).num_rows
    rejected = pq.read_metadata(out / rejects_name(index)).num_rows
    if known and known.get("bytes") == size and known.get("rows") == rows and known.get("sha256"):
        return ShardResult(index, path.name, rows, rejected, size, known["sha256"])
    return ShardResult(index, path.name, rows, rejected, size, sha256_file(path))


def _ours(name: str) -> bool:
    """Whether a file name is one this module writes."""
    base = name.split(TMP_MARK)[0]
    return bool(SHARD_RE.match(base) or REJECTS_RE.match(base)) or base in (REJECTS, REPORT, "manifest.json", DIVERSITY)


def clean_temporaries(out_dir: str | Path) -> int:
    """Delete temporary files left by a killed run; returns how many."""
    out = Path(out_dir)
    stale = [p for p in out.iterdir() if TMP_MARK in p.name and _ours(p.name)] if out.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def remove_outputs(out_dir: str | Path, keep_below: int = 0) -> None:
    """Delete this module's files in `out_dir`: all of them, or only shards with index >= `keep_below`."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        m = SHARD_RE.match(p.name) or REJECTS_RE.match(p.name)
        if (m and int(m.group(1)) >= keep_below) or (keep_below == 0 and _ours(p.name)):
            p.unlink(missing_ok=True)


def code_version() -> str:
    """The installed package version plus `git describe` of the source tree when it is a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("lightgen")
    except PackageNotFoundError:
        ver = "unknown"
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return ver
    return f"{ver}+{out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else ver


class ManifestWriter:
    """Keeps `manifest.json` current: rewritten after every finished shard, marked complete at the end."""

    def __init__(self, out_dir: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(out_dir) / "manifest.json"
        self.header = header
        self.results: dict[int, ShardResult] = {}

    def add(self, result: ShardResult, write: bool = True) -> None:
        """Record a finished shard (and rewrite the manifest)."""
        self.results[result.index] = result
        if write:
            self.write()

    def write(self, complete: bool = False, **extra: Any) -> dict[str, Any]:
        """Write the manifest: header, totals, one entry per finished shard in index order; returns it."""
        shards = [self.results[i].to_dict() for i in sorted(self.results)]
        rows = sum(s["rows"] for s in shards)
        rejected = sum(s["rejected"] for s in shards)
        manifest = {
            **self.header,
            "complete": complete,
            "rows": rows,
            "rejected": rejected,
            "inputs": rows + rejected,
            "rows_per_shard": [s["rows"] for s in shards],
            "shards": shards,
            **extra,  # last: a stage whose removals are not per-shard (build-captions) states its own totals
        }
        write_json_atomic(self.path, manifest)
        return manifest
