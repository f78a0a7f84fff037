"""The output folder of a stage: a local path or any pyarrow filesystem URI that every node of the cluster sees.

Files are published atomically: written under a temporary name beside the final one, then renamed (on a local
disk after an fsync; on object stores a move, which readers see whole). Names with `TMP_MARK` are temporaries of
a run that died; `clean_temporaries` removes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pyarrow.fs as pafs

TMP_MARK = ".tmp-"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(spec: str) -> bool:
    """Whether `spec` names a filesystem URI (`s3://`, `gs://`, `hdfs://`, `file://`, ...) rather than a local path."""
    return _SCHEME.match(str(spec)) is not None


def is_remote(spec: str) -> bool:
    """Whether `spec` is a URI of a filesystem other than the local disk (`file://` is local)."""
    return is_uri(spec) and not str(spec).lower().startswith("file://")


def public(spec: str) -> str:
    """`spec` without credentials: `user:secret@` and query options (which may hold keys) are dropped."""
    spec = str(spec)
    m = _SCHEME.match(spec)
    if m is None:
        return spec
    rest = spec[m.end() :].split("?", 1)[0]
    host, sep, path = rest.partition("/")
    return f"{m.group(0)}{host.rsplit('@', 1)[-1]}{sep}{path}"


@functools.lru_cache(maxsize=64)
def _filesystem(head: str) -> pafs.FileSystem:
    """One filesystem object per scheme + bucket (+ options): S3 clients are costly to create."""
    return pafs.FileSystem.from_uri(head)[0]


def resolve(spec: str) -> tuple[pafs.FileSystem, str]:
    """A local path or URI -> (filesystem, path on it). Credentials and endpoints come from the environment
    (`AWS_*`, incl. `AWS_ENDPOINT_URL`, Google's `GOOGLE_*`), never from files the pipeline writes."""
    spec = str(spec)
    if not is_uri(spec):
        return pafs.LocalFileSystem(), os.path.abspath(spec)
    if spec.lower().startswith("file://"):
        return pafs.FileSystem.from_uri(spec)
    m = _SCHEME.match(spec)
    rest = spec[m.end() :]
    rest, _, query = rest.partition("?")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{public(spec)}: no bucket name in the URI (expected {m.group(1)}://BUCKET/path)")
    fs = _filesystem(f"{m.group(0)}{bucket}" + (f"?{query}" if query else ""))
    if m.group(1).lower() in ("s3", "gs", "gcs"):  # object stores: the path is bucket/key (may hold glob characters)
        return fs, rest.rstrip("/")
    from urllib.parse import quote

    return fs, pafs.FileSystem.from_uri(quote(spec, safe=":/@?=&%"))[1]


def join(spec: str, *names: str) -> str:
    """`spec`/`name`/...: the same kind of location (a path or a URI) one level or more down."""
    out = str(spec)
    for name in names:
        out = f"{out.rstrip('/')}/{name}" if is_uri(out) else os.path.join(out, name)
    return out


def uri_of(fs: pafs.FileSystem, path: str, like: str) -> str:
    """The spec a user would write for `path` on `fs`: an absolute local path, or `like`'s scheme + path."""
    if isinstance(fs, pafs.LocalFileSystem) and not is_remote(like):
        return path
    return f"{_SCHEME.match(str(like)).group(0)}{path.lstrip('/')}"


def open_input(spec: str) -> pafs.NativeFile:
    """A seekable binary file on any filesystem (local path or URI)."""
    fs, path = resolve(spec)
    return fs.open_input_file(path)


def read_bytes(spec: str) -> bytes:
    """The bytes of a file on any filesystem."""
    fs, path = resolve(spec)
    with fs.open_input_stream(path) as f:
        return f.read()


def file_info(spec: str) -> pafs.FileInfo:
    """pyarrow's FileInfo of `spec` (type NotFound when it does not exist)."""
    fs, path = resolve(spec)
    return fs.get_file_info(path)


class Storage:
    """A folder on a pyarrow filesystem; `uri` is a local path, `file://...`, `s3://...`, `gs://...`, ..."""

    def __init__(self, uri: str) -> None:
        if not uri:
            raise ValueError("--output is required")
        self.uri = str(uri)
        self.fs, self.root = resolve(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        """The filesystem path of `name` inside the folder."""
        return f"{self.root.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        """Create the folder if needed."""
        self.fs.create_dir(self.root, recursive=True)

    def list(self) -> list[str]:
        """Names of the files directly in the folder (empty if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def exists(self, name: str) -> bool:
        """Whether file `name` exists."""
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        """Size of `name` in bytes."""
        return int(self.fs.get_file_info(self.path(name)).size)

    def delete(self, name: str) -> None:
        """Delete `name` if it exists."""
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        """The bytes of `name`."""
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        """`name` parsed as JSON, or None when it is missing or not valid JSON."""
        try:
            return json.loads(self.read_bytes(name))
        except (OSError, ValueError):
            return None

    def sha256(self, name: str) -> str:
        """sha256 of `name`'s bytes, read in 1 MiB chunks."""
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(name)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    @contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        """A binary stream to `name`, published atomically when the block exits without error."""
        tmp = f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        stream = self.fs.open_output_stream(self.path(tmp))
        try:
            yield stream
            if self.local:
                stream.flush()
            stream.close()
            if self.local:
                fd = os.open(self.path(tmp), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.fs.move(self.path(tmp), self.path(name))
        except BaseException:
            if not stream.closed:
                stream.close()
            self.fs.delete_file(self.path(tmp)) if self.exists(tmp) else None
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as `name` atomically."""
        with self.writer(name) as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        """Publish `obj` as indented JSON atomically."""
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode())

    def clean_temporaries(self, owned: Callable[[str], bool] = lambda _: True) -> int:
        """Delete temporaries a killed run left (of files `owned` says are ours); returns how many."""
        stale = [n for n in self.list() if TMP_MARK in n and owned(n.split(TMP_MARK)[0])]
        for n in stale:
            self.delete(n)
        return len(stale)
