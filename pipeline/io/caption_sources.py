"""Reading captions: JSONL / JSON / Parquet / CSV files, webdataset `.json` members, caption-shard folders, ShapesWorld.

Inputs are split into `ReadTask`s (a byte range of a JSONL file, row groups of a Parquet file, a whole CSV / JSON /
tar file, the ShapesWorld generator) that `read_task` streams in batches of records, so no stage holds all inputs
in memory and tasks can run on different workers. The order is deterministic: files sorted, rows in file order.

A record whose caption cannot be read (missing field, not a string, a line that does not parse, bytes that are not
UTF-8) keeps `caption=None` and an `error` reason, so the stage can count it as removed instead of failing. A field
that no record of a file has is an error (a misspelt `--field`): up front for Parquet / CSV (their headers name the
columns), after reading for the other formats (`check_fields`).

Records that carry GenEval metadata (`tag` + `include`, as ShapesWorld's generator and `lightgen shapes prompts`
write them) keep it as a JSON string in `metadata`; a `metadata` column (caption shards) is passed through.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.io.inputs import expand, ext

CAPTIONS_FORMAT = "lightgen-captions"
CAPTION_EXTS = ("jsonl", "json", "parquet", "csv", "tar")
SHAPES = "shapes"  # the built-in source name in reports
READ_ERRORS = ("missing_field", "bad_record", "bad_json", "bad_utf8")
CHUNK_BYTES = 16 << 20  # JSONL bytes per read task
CHUNK_ROWS = 100_000  # Parquet rows per read task (whole row groups)


@dataclass
class CaptionRecord:
    """One input caption: where it came from (`source` file, `ref` = file:row), its text and optional metadata."""

    source: str
    ref: str
    caption: str | None
    metadata: str | None = None
    id: str | None = None
    error: str = ""


@dataclass(frozen=True)
class ReadTask:
    """A unit of reading: `kind` jsonl (bytes [start, stop), first line number `first_row`), parquet (row groups
    [start, stop), first row `first_row`), csv / json / tar (the whole file), or shapes (`stop` captions)."""

    path: str
    kind: str
    start: int = 0
    stop: int = -1
    first_row: int = 0
    seed: int = 0
    diversity: float = 1.0
    scenes: int | None = None

    @property
    def source(self) -> str:
        """The `source` column value of its rows."""
        return SHAPES if self.kind == SHAPES else self.path


def expand_caption_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files, folders and globs (local paths or URIs, `inputs.expand`) -> caption files, sorted and unique (absolute
    local paths or URIs); a caption-shard folder (its manifest says so) gives the shards its manifest lists."""
    files: set[str] = set()
    for spec in map(str, inputs):
        listed = _manifest_shards(spec)
        files.update(listed if listed is not None else expand([spec], keep=lambda p: ext(p) in CAPTION_EXTS))
    if not files:
        raise ValueError(
            f"no caption files ({', '.join(CAPTION_EXTS)}) found in inputs: {[storage.public(str(p)) for p in inputs]}"
        )
    return sorted(files)


def _manifest_shards(spec: str) -> list[str] | None:
    """The shards a caption-shard folder's manifest lists; None when `spec` is not such a folder."""
    if any(c in spec for c in "*?[") or storage.file_info(spec).type != pafs.FileType.Directory:
        return None
    try:
        meta = json.loads(storage.read_bytes(storage.join(spec, "manifest.json")))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CAPTIONS_FORMAT:
        return None
    fs, root = storage.resolve(spec)
    return [storage.join(storage.uri_of(fs, root, spec), s["name"]) for s in meta["shards"]]


def _name(path: str) -> str:
    """The file name of a local path or URI (the `ref` prefix of its rows)."""
    return posixpath.basename(path)


def plan_reads(inputs: Sequence[str | os.PathLike], field: str, chunk_bytes: int | None = None) -> list[ReadTask]:
    """The read tasks of `inputs` in input order; checks Parquet / CSV columns for `field` up front."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    tasks: list[ReadTask] = []
    for path in expand_caption_inputs(inputs) if inputs else []:
        kind = ext(path)
        if kind == "parquet":
            tasks += _plan_parquet(path, field)
        elif kind == "jsonl" or (kind == "json" and _size(path) > chunk_bytes and not _one_document(path)):
            tasks += _plan_jsonl(path, chunk_bytes)
        else:
            if kind == "csv":
                _csv_header(path, field)
            tasks.append(ReadTask(str(path), kind))
    return tasks


def _size(path: str) -> int:
    """Bytes of a file (local path or URI)."""
    return int(storage.file_info(path).size)


def _one_document(path: str) -> bool:
    """Whether a `.json` file starts like a single JSON document (a list) rather than JSON lines."""
    with storage.open_input(path) as f:
        return f.read(1024).lstrip()[:1] == b"["


def _plan_parquet(path: str, field: str) -> list[ReadTask]:
    """Consecutive row groups of about `CHUNK_ROWS` rows per task."""
    with storage.open_input(path) as f:
        pf = pq.ParquetFile(f)
        names, groups = pf.schema_arrow.names, [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    if field not in names:
        raise ValueError(f"unknown --field {field!r}: {storage.public(path)} has columns {names}")
    tasks, start, first, rows = [], 0, 0, 0
    for g, n in enumerate(groups):
        rows += n
        if rows - first >= CHUNK_ROWS or g == len(groups) - 1:
            tasks.append(ReadTask(str(path), "parquet", start, g + 1, first))
            start, first = g + 1, rows
    return tasks or [ReadTask(str(path), "parquet", 0, 0, 0)]


def _plan_jsonl(path: str, chunk_bytes: int) -> list[ReadTask]:
    """Byte ranges that start at line starts, with the line number of their first line (one scan of the file)."""
    size, tasks, start, line = _size(path), [], 0, 1
    with storage.open_input(path) as f:
        while start < size:
            f.seek(start)
            block = f.read(chunk_bytes)
            cut = block.rfind(b"\n") + 1 if start + len(block) < size else len(block)
            if not cut:  # one line longer than a chunk: read on to its end
                rest = b""
                while b"\n" not in rest and start + len(block) + len(rest) < size:
                    rest += f.read(chunk_bytes)
                cut = len(block) + (rest.find(b"\n") + 1 if b"\n" in rest else len(rest))
                block += rest
            tasks.append(ReadTask(str(path), "jsonl", start, start + cut, line))
            line += block[:cut].count(b"\n")
            start += cut
    return tasks or [ReadTask(str(path), "jsonl", 0, 0, 1)]


def read_task(task: ReadTask, field: str, batch_rows: int = 65_536) -> Iterator[list[CaptionRecord]]:
    """Stream a task's records in batches of at most `batch_rows`."""
    readers = {"jsonl": _jsonl, "json": _json, "parquet": _parquet, "csv": _csv, "tar": _tar, SHAPES: _shapes}
    batch: list[CaptionRecord] = []
    for rec in readers[task.kind](task, field):
        batch.append(rec)
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def read_captions(inputs: Sequence[str | os.PathLike], field: str = "caption") -> list[CaptionRecord]:
    """All caption records of `inputs`, in order (small inputs); `ValueError` if a file has no `field` at all."""
    records: list[CaptionRecord] = []
    counts: dict[str, dict[str, int]] = {}
    for task in plan_reads(inputs, field):
        rows = [r for batch in read_task(task, field) for r in batch]
        old = counts.get(task.path, dict.fromkeys(("rows", "missing_field", "unparsed"), 0))
        counts[task.path] = {k: old[k] + v for k, v in field_counts(rows).items()}
        records.extend(rows)
    check_fields(counts, field)
    return records


def field_counts(rows: list[CaptionRecord]) -> dict[str, int]:
    """Rows, rows without the field, and rows that did not parse."""
    missing = sum(r.error == "missing_field" for r in rows)
    return {
        "rows": len(rows),
        "missing_field": missing,
        "unparsed": sum(r.error in ("bad_json", "bad_utf8") for r in rows),
    }


def check_fields(counts: dict[str, dict[str, int]], field: str) -> None:
    """`ValueError` for a file none of whose parsed records has `field` ({path: `field_counts`}, summed)."""
    for path, c in counts.items():
        if c["missing_field"] and c["missing_field"] + c["unparsed"] == c["rows"]:
            raise ValueError(f"unknown --field {field!r}: no record of {path} has it")


def _record(obj: Any, field: str, source: str, ref: str) -> CaptionRecord:
    """A record from one parsed object (dict) of any format."""
    if not isinstance(obj, dict):
        return CaptionRecord(source, ref, None, error="bad_record")
    value = obj.get(field)
    if field not in obj or value is None:
        return CaptionRecord(source, ref, None, error="missing_field")
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta = json.dumps(meta)
    elif meta is None and "tag" in obj and "include" in obj:  # a GenEval / ShapesWorld metadata record
        meta = json.dumps({k: v for k, v in obj.items() if k != field})
    rid = obj.get("id")
    caption = value if isinstance(value, str) else None
    error = "" if caption is not None else "bad_record"
    return CaptionRecord(source, ref, caption, meta, str(rid) if rid is not None else None, error)


def _parse_line(line: bytes, field: str, source: str, ref: str) -> CaptionRecord:
    """One JSON line -> record (`bad_utf8` / `bad_json` when it does not decode / parse)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return CaptionRecord(source, ref, None, error="bad_utf8")
    try:
        return _record(json.loads(text), field, source, ref)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: brackets nested too deep to parse
        return CaptionRecord(source, ref, None, error="bad_json")


def _jsonl(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """The lines of bytes [start, stop) of a JSON-lines file; blank lines are skipped but counted."""
    name = _name(task.path)
    with storage.open_input(task.path) as f:
        f.seek(task.start)
        data = f.read(task.stop - task.start)
    for i, line in enumerate(data.split(b"\n")):
        if line.strip():
            yield _parse_line(line, field, task.path, f"{name}:{task.first_row + i}")


def _json(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """A `.json` file: a JSON list, a single object, or (if it is not one document) JSON lines."""
    raw = storage.read_bytes(task.path)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        yield from _jsonl(ReadTask(task.path, "jsonl", 0, len(raw), 1), field)
        return
    for i, obj in enumerate(doc if isinstance(doc, list) else [doc]):
        yield _record(obj, field, task.path, f"{_name(task.path)}:{i}")


def _parquet(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """Rows of row groups [start, stop); only the caption, `id` and `metadata` columns are read."""
    with storage.open_input(task.path) as f:
        yield from _parquet_rows(pq.ParquetFile(f), task, field)


def _parquet_rows(pf: pq.ParquetFile, task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """The records of `_parquet`, from an open file."""
    cols = [c for c in (field, "id", "metadata") if c in pf.schema_arrow.names]
    name, row = _name(task.path), task.first_row
    for batch in pf.iter_batches(batch_size=65_536, row_groups=range(task.start, task.stop), columns=cols):
        values = {c: batch.column(c).to_pylist() for c in cols}
        for k in range(batch.num_rows):
            obj = {c: values[c][k] for c in cols}
            ref, row = f"{name}:{row}", row + 1
            if isinstance(obj[field], bytes):  # a binary caption column
                try:
                    obj[field] = obj[field].decode("utf-8")
                except UnicodeDecodeError:
                    yield CaptionRecord(task.path, ref, None, error="bad_utf8")
                    continue
            yield _record(obj, field, task.path, ref)


def _text(path: str, errors: str) -> io.TextIOWrapper:
    """A text stream of a file on any filesystem (UTF-8, newlines as the csv module wants them)."""
    return io.TextIOWrapper(io.BufferedReader(_Raw(storage.open_input(path))), "utf-8", errors, newline="")


class _Raw(io.RawIOBase):
    """A pyarrow input file as a Python raw stream (for `io.BufferedReader`)."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _csv_header(path: str, field: str) -> list[str]:
    """The header of a CSV file; `ValueError` if `field` is not in it."""
    with _text(path, "replace") as f:
        names = next(csv.reader(f), [])
    if field not in names:
        raise ValueError(f"unknown --field {field!r}: {storage.public(path)} has columns {names}")
    return names


def _csv(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """One record per CSV row (the header names the fields); a caption that is not UTF-8 is `bad_utf8`."""
    name = _name(task.path)
    with _text(task.path, "surrogateescape") as f:
        for i, row in enumerate(_csv_rows(csv.DictReader(f))):
            ref = f"{name}:{i + 2}"  # +2: 1-based, after the header
            if isinstance(row, csv.Error):  # e.g. a field over the csv module's size limit: that row only
                yield CaptionRecord(task.path, ref, None, error="bad_record")
                continue
            value = row.get(field)
            if isinstance(value, str) and not _utf8(value):
                yield CaptionRecord(task.path, ref, None, error="bad_utf8")
            else:
                yield _record(row, field, task.path, ref)


def _csv_rows(reader: csv.DictReader) -> Iterator[dict[str, str] | csv.Error]:
    """The rows of a CSV reader; a row the csv module refuses is yielded as its error and reading goes on."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield e


def _utf8(text: str) -> bool:
    """False for text holding undecodable bytes (surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tar(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    """The `.json` members of a webdataset tar, one record per sample key."""
    name = _name(task.path)
    with storage.open_input(task.path) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
        for member in tf:
            base = member.name.rsplit("/", 1)[-1]
            if not (member.isfile() and base.split(".", 1)[-1].lower() == "json"):
                continue
            yield _parse_line(tf.extractfile(member).read(), field, task.path, f"{name}:{member.name[: -len('.json')]}")


def shapes_task(n: int, seed: int, diversity: float = 1.0, scenes: int | None = None) -> ReadTask:
    """The read task of `n` ShapesWorld captions (one task: the generator is one random stream)."""
    return ReadTask(SHAPES, SHAPES, 0, n, 0, seed, diversity, scenes)


def _shapes(task: ReadTask, field: str) -> Iterator[CaptionRecord]:
    from shapesworld.world import generate_prompts

    for i, rec in enumerate(generate_prompts(task.stop, task.seed, diversity=task.diversity, scenes=task.scenes)):
        meta = {k: v for k, v in rec.items() if k != "caption"}
        yield CaptionRecord(SHAPES, f"{SHAPES}:{i}", rec["caption"], json.dumps(meta))


def shapes_captions(n: int, seed: int, diversity: float = 1.0, scenes: int | None = None) -> list[CaptionRecord]:
    """`n` ShapesWorld captions with their GenEval metadata (the built-in source)."""
    return list(_shapes(shapes_task(n, seed, diversity, scenes), "caption"))
