"""The one input expander: files, folders and globs -> input files; and the shard plan over them.

`expand` turns `--input` specs into sorted, unique files (folders recursively, without dot files, without the
pipeline's own bookkeeping files). `plan_units` cuts the files into `WorkUnit`s, one per output shard, looking
only at file names and Parquet footers (never at rows): a tar shard is one unit (webdataset shards are the unit
of work already), image files are grouped `shard_size` at a time, a Parquet file is split into row ranges of
`shard_size`, and any other file (JSONL, CSV, ...) is one unit.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.stage import WorkUnit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Files the pipeline writes beside its shards: never inputs.
BOOKKEEPING = ("manifest.json", "report.json", "diversity.json", "rejects.parquet")


def _bookkeeping(p: Path) -> bool:
    """The pipeline's own non-shard files (manifests, reports, rejects, receipts)."""
    n = p.name
    return n in BOOKKEEPING or n.endswith((".rejects.parquet", ".done.json")) or ".tmp-" in n


def _hidden(p: Path, root: Path) -> bool:
    """Dot files and files inside dot folders below `root`."""
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _matches(spec: str) -> list[Path]:
    """A file, folder or glob -> existing paths; a clear error when nothing is there."""
    if any(c in spec for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not found:
            raise FileNotFoundError(f"input glob matches nothing: {spec}")
        return found
    if not Path(spec).exists():
        raise FileNotFoundError(f"input path does not exist: {spec}")
    return [Path(spec)]


def expand(inputs: Sequence[str | Path], keep: Callable[[Path], bool] = lambda _: True) -> list[Path]:
    """Input specs -> absolute files (folders recursively), sorted and unique, filtered by `keep`."""
    if not inputs:
        raise ValueError("no --input given")
    files: set[Path] = set()
    for spec in inputs:
        for path in _matches(str(spec)):
            path = path.resolve()
            if path.is_file():
                files.add(path)
                continue
            for p in path.rglob("*"):
                if p.is_file() and not _hidden(p, path) and not _bookkeeping(p):
                    files.add(p)
    return sorted(f for f in files if keep(f))


def ext(path: Path | str) -> str:
    """Lower-case suffix without the dot."""
    return Path(path).suffix.lower().lstrip(".")


def common_base(files: Sequence[Path]) -> str:
    """The common parent folder of `files` (ids are relative to it)."""
    return os.path.commonpath([str(f.parent) for f in files]) if files else ""


def _parquet_rows(path: Path) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def plan_units(files: Sequence[Path], shard_size: int, base: str | None = None) -> list[WorkUnit]:
    """One unit per output shard, in a fixed order: tars, Parquet row ranges, other files, then image groups."""
    base = common_base(files) if base is None else base
    units: list[tuple[str, tuple[str, ...], int, int]] = []
    images = [str(f) for f in files if ext(f) in IMAGE_EXTS]
    for f in files:
        kind = ext(f)
        if kind in IMAGE_EXTS:
            continue
        if kind == "parquet":
            n = _parquet_rows(f)
            units += [("parquet", (str(f),), s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
        else:
            units.append((kind, (str(f),), 0, -1))
    units += [("images", tuple(images[s : s + shard_size]), 0, -1) for s in range(0, len(images), shard_size)]
    return [WorkUnit(i, kind, paths, start, stop, base) for i, (kind, paths, start, stop) in enumerate(units)]
