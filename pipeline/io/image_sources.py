"""Reading inputs: webdataset `.tar` shards and folders of images with captions, as records with stable ids.

Listing (`list_records`) only reads tar headers and directory entries and returns lightweight `Record`s that
point at byte ranges (`Blob`); the bytes are read later, by whichever worker encodes the record
(`BlobReader`), and captions are parsed there too (`parse_caption`), so a bad caption becomes a reject with
a reason instead of an error at listing time.

- tar: members grouped by key (the member path up to the first dot of its base name, the webdataset
  convention); the image is the first of .jpg/.jpeg/.png/.webp, the caption the `.json` member's "caption"
  (or "prompt", "text") field, else a `.txt` member. Keys with neither an image nor a caption are not samples.
- folder (recursive) or image file: the caption comes from a `captions.jsonl` / `metadata.jsonl` line
  ({"file_name": ..., "caption": ...}, paths relative to the jsonl) in the image's folder or an input folder,
  else a sidecar `<stem>.txt`, else `<stem>.json`.
Ids are `<path relative to the common parent of all sources>` (tars: without `.tar`, then `/<key>`).

Every file is read through `pipeline.core.storage`: sources may be local paths or URIs (`s3://...`); on a remote store a
read error other than a missing file ends the run (rerun to resume) instead of rejecting the input.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core import storage
from pipeline.core.stage import Reject, WorkUnit
from pipeline.io.decode import RejectError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "prompt", "text")
# The largest input member read into memory (an image file or caption): a tar header can declare any size.
MAX_MEMBER_BYTES = 256 << 20
JSONL_NAMES = ("captions.jsonl", "metadata.jsonl")
FILE_KEYS = ("file_name", "file", "image")


@dataclass(frozen=True)
class Blob:
    """A byte range of a file (`size=-1`: the whole file)."""

    path: str
    offset: int = 0
    size: int = -1


@dataclass(frozen=True)
class Record:
    """One input sample: stable id, its source file, where its image and caption bytes are.

    `caption_kind` is "json" (an object with a caption field) or "txt"; `error` is a reason found while
    listing (e.g. an unreadable tar), which makes the record a reject.
    """

    id: str
    source: str
    image: Blob | None
    caption: Blob | None
    caption_kind: str = ""
    error: str = ""

    def to_json(self) -> dict:
        """A JSON-ready dict (records travel to workers as JSON, never pickled)."""
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Record:
        """Inverse of `to_json`."""
        blob = lambda b: Blob(**b) if b else None
        return Record(d["id"], d["source"], blob(d["image"]), blob(d["caption"]), d["caption_kind"], d["error"])


def _member_ext(name: str) -> str:
    """Lower-case extension after the first dot of the base name ('a/b.x.json' -> 'x.json')."""
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def input_folders(inputs: Sequence[str | Path]) -> list[str]:
    """The inputs that are folders (resolved local paths or URIs): where `captions.jsonl` files are looked up."""
    return [folder_of(str(i)) for i in inputs if storage.is_dir(str(i))]


def folder_of(spec: str) -> str:
    """A folder's canonical spelling: a resolved local path, or the URI without a trailing slash."""
    return str(spec).rstrip("/") if storage.is_uri(spec) else str(Path(spec).resolve())


def list_records(inputs: Sequence[str | Path]) -> list[Record]:
    """All input records in a deterministic order: tar shards (sorted) by member order, then images (sorted).

    For small inputs and tests; stages read per work unit (`unit_records`) so that no process lists everything.
    """
    from pipeline.io import inputs as inputs_mod

    files = inputs_mod.expand(inputs, keep=inputs_mod.is_tar_or_image)
    if not files:
        raise ValueError(
            f"no .tar shards or images ({', '.join(inputs_mod.IMAGE_EXTS)}) found in inputs: {list(inputs)}"
        )
    folders = input_folders(inputs)
    units = inputs_mod.plan_units(files, shard_size=max(1, len(files)))
    return [rec for unit in units for rec in unit_records(unit, folders)]


def unit_records(unit: WorkUnit, folders: Sequence[str] = (), index: JsonlIndex | None = None) -> list[Record]:
    """The records of one work unit: a tar's samples, or a group of image files with their captions."""
    if unit.kind == "tar":
        return _tar_records(unit.paths[0], unit.base)
    if unit.kind == "images":
        return _image_records(list(unit.paths), unit.base, [str(f) for f in folders], index or JsonlIndex())
    raise ValueError(f"not an image input: {unit.paths[0]} (expected .tar shards or image files)")


class JsonlIndex:
    """Image path -> caption line of the `captions.jsonl` / `metadata.jsonl` files read so far (one read each)."""

    def __init__(self) -> None:
        self.read: set[str] = set()
        self.lines: dict[str, Blob] = {}

    def lookup(self, folders: Sequence[str], image: str) -> Blob | None:
        """The caption line naming `image` in a jsonl of its folder or of `folders`, if any."""
        for d in (*folders, storage.parent(image)):
            for name in JSONL_NAMES:
                path = storage.join(d, name)
                if path not in self.read:
                    self.read.add(path)
                    if storage.is_file(path):
                        for target, blob in _jsonl_lines(path):
                            self.lines.setdefault(target, blob)
        return self.lines.get(image)


def _rel(path: str, base: str) -> str:
    """`path` relative to `base`, posix style."""
    return storage.relative(path, base) if storage.is_uri(path) else Path(path).relative_to(base).as_posix()


def _normalize(spec: str) -> str:
    """A file's canonical spelling, as inputs are listed: a resolved local path, or a URI without `.` / `..`."""
    if not storage.is_uri(spec):
        return str(Path(spec).resolve())
    head, _, rest = spec.partition("://")
    return f"{head}://{posixpath.normpath(rest)}"


def _tar_records(tar: str, base: str) -> list[Record]:
    """Group a tar's members by key; a tar that cannot be listed to its end adds a `bad_tar` record."""
    prefix = _rel(tar[: -len(".tar")], base)
    tar_name = posixpath.basename(tar)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    error = ""
    try:
        with storage.open_buffered(tar) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for member in tf:
                base_name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and not base_name.startswith("."):
                    key = member.name[: len(member.name) - len(base_name)] + base_name.split(".", 1)[0]
                    groups.setdefault(key, {}).setdefault(_member_ext(member.name), member)
            end = tf.offset
        # tarfile stops quietly at a header cut short; anything but zero padding after the last member means
        # samples were lost there.
        if _has_data_after(tar, end):
            error = f"bad_tar: {tar_name} has unreadable bytes after offset {end} (truncated or corrupt)"
    except (tarfile.TarError, OSError, EOFError) as e:
        raise_if_store_failed(tar, e)
        error = f"bad_tar: cannot list {tar_name} past {len(groups)} keys: {type(e).__name__}: {e}"
    records = [r for key, members in groups.items() if (r := _tar_record(f"{prefix}/{key}", tar, members))]
    if error:
        records.append(Record(f"{prefix}/<unreadable>", str(tar), None, None, "", error))
    return records


def _has_data_after(path: str, offset: int) -> bool:
    """Whether `path` holds a non-zero byte after `offset` (looks at the first MiB past it)."""
    with storage.open_buffered(path, 1 << 20) as f:
        f.seek(offset)
        return any(f.read(1 << 20))


def raise_if_store_failed(source: str, e: BaseException) -> None:
    """On a remote store an OSError (but a missing file) means the store failed, not the input: raise it, naming
    the URI, so that the run stops and a rerun redoes the unit instead of rejecting what it could not read."""
    if storage.is_remote(source) and isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        with storage.named_errors(source, "cannot read"):
            raise e


def _tar_record(rid: str, source: str, members: dict[str, tarfile.TarInfo]) -> Record | None:
    """The record of one key, or None if the key has neither an image nor a caption member.

    Members are typed by their last suffix ("v2.png" is a png); the first image type in `IMAGE_EXTS` order wins,
    and a json caption wins over a txt one.
    """
    by_type: dict[str, tarfile.TarInfo] = {}
    for ext, member in members.items():
        by_type.setdefault(ext.rsplit(".", 1)[-1], member)
    image = next((by_type[e] for e in IMAGE_EXTS if e in by_type), None)
    kind = next((e for e in ("json", "txt") if e in by_type), "")
    if image is None and not kind:
        return None
    blob = lambda m: Blob(source, m.offset_data, m.size) if m is not None else None
    return Record(rid, source, blob(image), blob(by_type.get(kind)), kind)


def _image_records(images: list[str], base: str, folders: list[str], index: JsonlIndex) -> list[Record]:
    """One record per image file with its caption from a jsonl line or a sidecar file."""
    records = []
    for img in images:
        caption, kind = index.lookup(folders, img), "json"
        if caption is None:
            stem = posixpath.splitext(img)[0] if storage.is_uri(img) else os.path.splitext(img)[0]
            ext = next((e for e in ("txt", "json") if storage.is_file(f"{stem}.{e}")), None)
            caption, kind = (Blob(f"{stem}.{ext}"), ext) if ext else (None, "")
        records.append(Record(_rel(img, base), img, Blob(img), caption, kind))
    return records


def _jsonl_lines(path: str) -> Iterator[tuple[str, Blob]]:
    """(image path, byte range of its line) for each line of a captions jsonl that names a file."""
    offset = 0
    folder = storage.parent(path)
    with storage.open_buffered(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
                name = next(obj[k] for k in FILE_KEYS if isinstance(obj.get(k), str))
            except (ValueError, StopIteration, AttributeError):
                name = None  # unparseable lines name no image; such an image falls back to sidecars
            if name:
                yield _normalize(storage.join(folder, name)), Blob(path, offset, len(line))
            offset += len(line)


@dataclass(frozen=True)
class Raw:
    """One input as read: id, source file, caption, image bytes and the caption JSON's other fields."""

    id: str
    source: str
    caption: str
    image: bytes
    fields: dict


def read_raws(records: Sequence[Record], reader: BlobReader) -> Iterator[Raw | Reject]:
    """Each record's caption and image bytes, or a `Reject` with the first problem found."""
    for rec in records:
        try:
            yield _raw(rec, reader)
        except RejectError as e:
            yield Reject(rec.id, rec.source, e.reason, str(e))
        except OSError as e:  # an input vanished or cannot be read: that input is lost, not the run
            raise_if_store_failed(rec.source, e)
            yield Reject(rec.id, rec.source, "read_error", f"{type(e).__name__}: {e}")


def _raw(rec: Record, reader: BlobReader) -> Raw:
    """A record read; `RejectError` if it has no image or caption, or they cannot be read."""
    if rec.error:
        reason, _, detail = rec.error.partition(": ")
        raise RejectError(reason, detail)
    if rec.image is None:
        raise RejectError("missing_image", "no image member for this key")
    if rec.caption is None:
        raise RejectError("missing_caption", "no .json/.txt caption for this image")
    data = reader.read(rec.caption)
    caption = parse_caption(data, rec.caption_kind)
    fields = json.loads(data) if rec.caption_kind == "json" else {}
    return Raw(rec.id, rec.source, caption, reader.read(rec.image), fields if isinstance(fields, dict) else {})


class BlobReader:
    """Reads blobs, keeping files open while records of the same tar are read; use as a context manager."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}

    def read(self, blob: Blob) -> bytes:
        """The bytes of `blob`; `RejectError("truncated")` if the file ends before the range does."""
        if blob.size < 0:
            local = not storage.is_uri(blob.path)
            size = Path(blob.path).stat().st_size if local else storage.file_info(blob.path).size
            if size is None:
                raise FileNotFoundError(f"input file does not exist: {storage.public(blob.path)}")
            if size > MAX_MEMBER_BYTES:
                raise RejectError("too_large", f"{blob.path}: {size} bytes > {MAX_MEMBER_BYTES}")
            return Path(blob.path).read_bytes() if local else storage.read_bytes(blob.path)
        if blob.size > MAX_MEMBER_BYTES:  # judged by the declared size, before anything is read
            raise RejectError("too_large", f"{blob.path}: member declares {blob.size} bytes > {MAX_MEMBER_BYTES}")
        f = self._files.get(blob.path)
        if f is None:
            if len(self._files) >= 8:
                self.close()
            f = self._files[blob.path] = storage.open_buffered(blob.path)
        f.seek(blob.offset)
        data = f.read(blob.size)
        if len(data) < blob.size:
            raise RejectError("truncated", f"{blob.path}: member ends after {len(data)} of {blob.size} bytes")
        return data

    def close(self) -> None:
        """Close all open files."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_caption(data: bytes, kind: str) -> str:
    """A caption from a `.txt` or `.json` payload, stripped; `RejectError` if non-UTF-8, malformed or empty."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RejectError("bad_caption_encoding", f"caption is not UTF-8: {e}") from e
    if kind == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RejectError("bad_caption_json", f"caption JSON does not parse: {e}") from e
        value = next((obj[k] for k in CAPTION_KEYS if isinstance(obj, dict) and k in obj), None)
        if not isinstance(value, str):
            raise RejectError("missing_caption", f"caption JSON has no string field among {list(CAPTION_KEYS)}")
        text = value
    return check_caption(text)


def check_caption(text: str) -> str:
    """`text` stripped; `RejectError` if it is empty or holds what UTF-8 cannot encode (a lone surrogate, which
    JSON's `\\ud800` escapes produce and tokenizers fail on)."""
    caption = text.strip()
    if not caption:
        raise RejectError("empty_caption", "caption is empty or only whitespace")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RejectError("bad_caption_encoding", f"caption cannot be encoded as UTF-8: {e.reason} at {e.start}") from e
    return caption
