"""The one input expander: files, folders and globs -> input files; and the shard plan over them.

`expand` turns `--input` specs into sorted, unique files (folders recursively, without dot files, without the
pipeline's own bookkeeping files). `plan_units` cuts the files into `WorkUnit`s, one per output shard, looking
only at file names and Parquet footers (never at rows): a tar shard is one unit (webdataset shards are the unit
of work already), image files are grouped `shard_size` at a time, a Parquet file is split into row ranges of
`shard_size`, and any other file (JSONL, CSV, ...) is one unit.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.core.stage import WorkUnit

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Files the pipeline writes beside its shards: never inputs.
BOOKKEEPING = ("manifest.json", "report.json", "diversity.json", "rejects.parquet")
_GLOB = "*?["


def _bookkeeping(name: str) -> bool:
    """The pipeline's own non-shard files (manifests, reports, rejects, receipts)."""
    return name in BOOKKEEPING or name.endswith((".rejects.parquet", ".done.json")) or storage.TMP_MARK in name


def _hidden(path: str, root: str) -> bool:
    """Dot files and files inside dot folders below `root`."""
    return any(part.startswith(".") for part in posixpath.relpath(path, root).split("/"))


def _files_below(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file below folder `root` (recursively) but dot files and the pipeline's bookkeeping files."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [
        i for i in infos if i.type == pafs.FileType.File and not _hidden(i.path, root) and not _bookkeeping(i.base_name)
    ]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as `glob.glob(recursive=True)` reads it: `*` and `?` stay inside one folder, `**/` spans any depth."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : j]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _glob(fs: pafs.FileSystem, pattern: str, spec: str) -> list[pafs.FileInfo]:
    """Entries of `fs` matching `pattern`, listed from the deepest folder without wildcards."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB))
    root = "/".join(parts[:fixed]) or "/"
    recursive = "**" in pattern or len(parts) - fixed > 1
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise FileNotFoundError(f"cannot list {storage.public(spec)}: {e}") from None
    regex = _glob_regex(pattern)
    # as glob.glob: wildcards do not match dot files or dot folders
    return sorted((i for i in infos if regex.match(i.path) and not _hidden(i.path, root)), key=lambda i: i.path)


def _matches(spec: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """A file, folder or glob (local or URI) -> its filesystem and the existing entries; a clear error when none."""
    fs, path = storage.resolve(spec)
    if any(c in path for c in _GLOB):
        found = _glob(fs, path, spec)
        if not found:
            raise FileNotFoundError(f"input glob matches nothing: {storage.public(spec)}")
        return fs, found
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise FileNotFoundError(f"cannot read input {storage.public(spec)}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input path does not exist: {storage.public(spec)}")
    return fs, [info]


def expand(
    inputs: Sequence[str | os.PathLike],
    keep: Callable[[PurePosixPath], bool] = lambda _: True,
    nonempty: bool = False,
) -> list[str]:
    """Input specs (paths, folders, globs; local or any pyarrow filesystem URI) -> files, sorted and unique, filtered
    by `keep` (given the file's path) and, with `nonempty`, without empty files (sizes come with the listing). Local
    files come back as absolute paths with symbolic links of the matched paths resolved, others as URIs."""
    if not inputs:
        raise ValueError("no --input given")
    files: set[str] = set()
    for spec in map(str, inputs):
        fs, infos = _matches(spec)
        with storage.named_errors(spec, "cannot list input"):
            for info in infos:
                if isinstance(fs, pafs.LocalFileSystem):
                    info = fs.get_file_info(os.path.realpath(info.path))
                found = [info] if info.type == pafs.FileType.File else _files_below(fs, info.path)
                files.update(storage.uri_of(fs, i.path, spec) for i in found if not (nonempty and i.size == 0))
    return sorted(f for f in files if keep(PurePosixPath(f)))


def ext(path: str | os.PathLike) -> str:
    """Lower-case suffix without the dot."""
    return PurePosixPath(str(path)).suffix.lower().lstrip(".")


def is_tar_or_image(path: str | os.PathLike) -> bool:
    """Tar shards and image files: the inputs of the stages that read images."""
    return ext(path) == "tar" or ext(path) in IMAGE_EXTS


def common_base(files: Sequence[str]) -> str:
    """The common parent folder of `files` (ids are relative to it); URIs keep their scheme."""
    if not files:
        return ""
    parents = [posixpath.dirname(str(f)) for f in files]
    head = next((p[: p.index("://") + 3] for p in parents if storage.is_uri(p)), "")
    base = posixpath.commonpath([p[len(head) :] for p in parents]) if head else os.path.commonpath(parents)
    return head + base


def _parquet_rows(path: str) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    with storage.open_input(path) as f, storage.named_errors(path, "cannot read"):
        return pq.read_metadata(f).num_rows


def plan_units(files: Sequence[str], shard_size: int, base: str | None = None) -> list[WorkUnit]:
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
