"""The inspect section every stage gets unless it writes its own: seeded random rows as a table.

Parquet outputs show their scalar columns (text, numbers, booleans; `id` first); tar outputs show each sample's key
and its members with their sizes. Only the sampled rows are read.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from pipeline.inspect.html import cells, esc, table, tag
from pipeline.inspect.read import StageDir, parquet_file, read_sampled_rows, read_tar_samples, sample_positions

MAX_COLUMNS = 8  # scalar columns shown; the rest are named under the table
MAX_TEXT = 200  # characters of a text cell


def rows_section(folder: StageDir, limit: int, seed: int) -> str:
    """A table of `limit` seeded random rows of the folder's shards (each row's `data-id` is its id or key)."""
    if not folder.shards:
        return tag("h2", "Rows") + tag("p", "no shards", class_="muted")
    if folder.shards[0].endswith(".tar"):
        return _tar_rows(folder, limit, seed)
    return _parquet_rows(folder, limit, seed)


def _scalar(t: pa.DataType) -> bool:
    """A type shown as one cell: text, a number or a boolean."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or (pa.types.is_boolean(t))
    )


def _cell(value: object) -> object:
    """A value cut to `MAX_TEXT` characters when it is long text."""
    return value[:MAX_TEXT] + "..." if isinstance(value, str) and len(value) > MAX_TEXT else value


def _parquet_rows(folder: StageDir, limit: int, seed: int) -> str:
    """Sampled rows' scalar columns."""
    schema = parquet_file(folder.shards[0]).schema_arrow
    scalar = [f.name for f in schema if _scalar(f.type)]
    columns = sorted(scalar, key=lambda c: c != "id")[:MAX_COLUMNS]
    t = read_sampled_rows(folder, sample_positions(folder.rows_per_shard, limit, seed), columns)
    rows = [cells([_cell(r[c]) for c in columns], class_="row", data_id=r.get("id")) for r in t.to_pylist()]
    hidden = [f.name for f in schema if f.name not in columns]
    note = tag("p", "not shown: " + esc(", ".join(hidden)), class_="muted") if hidden else ""
    return tag("h2", f"Rows: {len(rows)} random samples") + table(columns, rows) + note


def _tar_rows(folder: StageDir, limit: int, seed: int) -> str:
    """Sampled samples' keys and members (extension and size)."""
    rows = []
    for s, picks in sorted(sample_positions(folder.rows_per_shard, limit, seed).items()):
        shard = posixpath.basename(folder.shards[s])
        for sample in read_tar_samples(folder.shards[s], picks):
            key = sample["__key__"].decode()
            members = ", ".join(f"{ext} ({len(data)} B)" for ext, data in sample.items() if ext != "__key__")
            rows.append(cells([key, shard, members], class_="row", data_id=key))
    return tag("h2", f"Samples: {len(rows)} random samples") + table(["key", "shard", "members"], rows)
