"""Reading captions: JSONL / JSON / Parquet / CSV files, webdataset `.json` members, caption-shard folders, ShapesWorld.

Every reader yields `CaptionRecord`s in a deterministic order (files sorted, rows in file order). A record whose
caption cannot be read (missing field, not a string, a line that does not parse) keeps `caption=None` and an
`error` reason, so the stage can count it as removed instead of failing. A field that no record of a file has is
an error up front (a misspelt `--field`).

Records that carry GenEval metadata (`tag` + `include`, as ShapesWorld's generator and `lightgen shapes prompts`
write them) keep it as a JSON string in `metadata`; a `metadata` column (caption shards) is passed through.
"""

from __future__ import annotations

import csv
import glob
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

CAPTIONS_FORMAT = "lightgen-captions"
CAPTION_EXTS = ("jsonl", "json", "parquet", "csv", "tar")
SHAPES = "shapes"  # the built-in source name in reports
_NOT_INPUTS = ("manifest.json", "report.json", "diversity.json", "rejects.parquet")


@dataclass
class CaptionRecord:
    """One input caption: where it came from (`source` file, `ref` = file:row), its text and optional metadata."""

    source: str
    ref: str
    caption: str | None
    metadata: str | None = None
    id: str | None = None
    error: str = ""


def expand_caption_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders and globs -> caption files, sorted and unique; caption-shard folders give their shards."""
    files: set[Path] = set()
    for raw in inputs:
        spec = str(raw)
        matches = [Path(p) for p in glob.glob(spec, recursive=True)] if any(c in spec for c in "*?[") else [Path(spec)]
        if not matches or not matches[0].exists():
            raise FileNotFoundError(f"input path does not exist: {spec}")
        for path in matches:
            files.update(_caption_files(path.resolve()))
    if not files:
        raise ValueError(f"no caption files ({', '.join(CAPTION_EXTS)}) found in inputs: {list(inputs)}")
    return sorted(files)


def _caption_files(path: Path) -> list[Path]:
    """A file itself, the shards listed in a caption-shard manifest, or every caption file below a folder."""
    if path.is_file():
        return [path]
    manifest = path / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta.get("format") == CAPTIONS_FORMAT:
            return [path / s["name"] for s in meta["shards"]]
    found = []
    for p in path.rglob("*"):
        ext = p.name.rsplit(".", 1)[-1].lower()
        skip = p.name in _NOT_INPUTS or p.name.endswith(".rejects.parquet") or p.name.startswith(".")
        if p.is_file() and ext in CAPTION_EXTS and not skip:
            found.append(p)
    return found


def read_captions(inputs: Sequence[str | Path], field: str = "caption") -> list[CaptionRecord]:
    """All caption records of `inputs`, in order; `ValueError` if a file has no `field` at all."""
    records: list[CaptionRecord] = []
    for path in expand_caption_inputs(inputs):
        ext = path.name.rsplit(".", 1)[-1].lower()
        reader = {"parquet": _parquet, "csv": _csv, "tar": _tar}.get(ext, _json_lines)
        rows = list(reader(path, field))
        if any(r.error == "missing_field" for r in rows) and all(
            r.error in ("missing_field", "bad_json") for r in rows
        ):
            raise ValueError(f"unknown --field {field!r}: no record of {path} has it")
        records.extend(rows)
    return records


def _record(obj: Any, field: str, source: Path, ref: str) -> CaptionRecord:
    """A record from one parsed object (dict) of any format."""
    if not isinstance(obj, dict):
        return CaptionRecord(str(source), ref, None, error="bad_record")
    value = obj.get(field)
    if field not in obj or value is None:
        return CaptionRecord(str(source), ref, None, error="missing_field")
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta = json.dumps(meta)
    elif meta is None and "tag" in obj and "include" in obj:  # a GenEval / ShapesWorld metadata record
        meta = json.dumps({k: v for k, v in obj.items() if k != field})
    rid = obj.get("id")
    caption = value if isinstance(value, str) else None
    error = "" if caption is not None else "bad_record"
    return CaptionRecord(str(source), ref, caption, meta, str(rid) if rid is not None else None, error)


def _json_lines(path: Path, field: str) -> Iterator[CaptionRecord]:
    """JSON lines (`.jsonl`, or a `.json` that is not one JSON document), a JSON list, or a single object."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(raw)
            for i, obj in enumerate(doc if isinstance(doc, list) else [doc]):
                yield _record(obj, field, path, f"{path.name}:{i}")
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # fall through: JSON lines
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            yield CaptionRecord(str(path), f"{path.name}:{i + 1}", None, error="bad_json")
            continue
        yield _record(obj, field, path, f"{path.name}:{i + 1}")


def _parquet(path: Path, field: str) -> Iterator[CaptionRecord]:
    """One record per row; only the caption, `id` and `metadata` columns are read."""
    names = pq.read_schema(path).names
    if field not in names:
        raise ValueError(f"unknown --field {field!r}: {path} has columns {names}")
    table = pq.read_table(path, columns=[c for c in (field, "id", "metadata") if c in names])
    for i, row in enumerate(table.to_pylist()):
        yield _record(row, field, path, f"{path.name}:{i}")


def _csv(path: Path, field: str) -> Iterator[CaptionRecord]:
    """One record per CSV row (header row names the fields)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if field not in (reader.fieldnames or []):
            raise ValueError(f"unknown --field {field!r}: {path} has columns {reader.fieldnames}")
        for i, row in enumerate(reader):
            yield _record(row, field, path, f"{path.name}:{i + 2}")  # +2: 1-based, after the header


def _tar(path: Path, field: str) -> Iterator[CaptionRecord]:
    """The `.json` members of a webdataset tar, one record per sample key."""
    with tarfile.open(path, mode="r:") as tf:
        for member in tf:
            base = member.name.rsplit("/", 1)[-1]
            if not (member.isfile() and base.split(".", 1)[-1].lower() == "json"):
                continue
            ref = f"{path.name}:{member.name[: -len('.json')]}"
            try:
                obj = json.loads(tf.extractfile(member).read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield CaptionRecord(str(path), ref, None, error="bad_json")
                continue
            yield _record(obj, field, path, ref)


def shapes_captions(n: int, seed: int, diversity: float = 1.0, scenes: int | None = None) -> list[CaptionRecord]:
    """`n` ShapesWorld captions with their GenEval metadata (the built-in source)."""
    from shapesworld.world import generate_prompts

    out = []
    for i, rec in enumerate(generate_prompts(n, seed, diversity=diversity, scenes=scenes)):
        meta = {k: v for k, v in rec.items() if k != "caption"}
        out.append(CaptionRecord(SHAPES, f"{SHAPES}:{i}", rec["caption"], json.dumps(meta)))
    return out
