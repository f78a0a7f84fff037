"""The output folder of a stage: a local path or any pyarrow filesystem URI that every node of the cluster sees.

Files are published atomically: written under a temporary name beside the final one, then renamed (on a local
disk after an fsync; on object stores a move, which readers see whole). Names with `TMP_MARK` are temporaries of
a run that died; `clean_temporaries` removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pyarrow.fs as pafs

TMP_MARK = ".tmp-"


class Storage:
    """A folder on a pyarrow filesystem; `uri` is a local path, `file://...`, `s3://...`, `gs://...`, ..."""

    def __init__(self, uri: str) -> None:
        if not uri:
            raise ValueError("--output is required")
        self.uri = str(uri)
        if "://" in self.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(self.uri)
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
