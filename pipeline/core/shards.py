"""Shard files: deterministic names, digests, the one Parquet writer setup, rejects tables, the code version.

Publishing (atomic writes, receipts, manifests) is the runner's (`pipeline.core.runner`, on `pipeline.core.storage`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.schema import REJECT_SCHEMA, with_metadata

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


def rejects_table(rejects: Iterable[dict[str, str]], meta: dict[str, Any] | None = None) -> pa.Table:
    """Rows of {id, source, reason, detail} as a table with `REJECT_SCHEMA` (carrying `meta`, if given)."""
    rows = list(rejects)
    schema = REJECT_SCHEMA if meta is None else with_metadata(REJECT_SCHEMA, meta)
    return pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in REJECT_SCHEMA}, schema)


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
