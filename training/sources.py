"""Where the trainer reads from: shard directories and model folders as local paths or filesystem URIs (`s3://`,
`gs://`, `hdfs://`, `file://`, through `pipeline.core.storage`), and a bounded local cache of verified shard files.

A remote shard directory is validated as a local one is (`pipeline.core.schema`): its manifest's format, schema version,
encoder names and a finished run, and every listed shard present with its listed size (one listing call per
directory). Credentials and endpoints come from the environment and never appear in messages (`storage.public`).

`ShardCache` keeps shard files on a local disk under their sha256, at most `max_bytes` in all, the least recently
used evicted first; files are written under a temporary name and renamed, and the reader verifies every copy it
takes from the cache against the manifest's sha256, so a damaged copy is fetched again, never trained on.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.core.storage import is_uri  # noqa: F401 (one definition of a URI; imported from here by the trainer)

TMP = ".tmp-"
SUFFIX = ".shard"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def byte_count(value: int | str, key: str) -> int:
    """A size as an int or a string with a unit ("20GB", "512MiB") -> bytes; ValueError naming `key` and the value."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value)) if isinstance(value, (str, float)) else None
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{key} must be a byte count such as 20000000000, 20GB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def remote_listing(directory: str, kind: str, vae: str | None, text_encoder: str | None) -> tuple[dict, list, list]:
    """A shard directory on a filesystem URI, validated as `pipeline.core.schema.training_shards` / `pair_shards`
    validate a local one: (manifest, shard URIs in order, their sizes on the store)."""
    from pipeline.core import schema, storage

    fs, root = storage.resolve(directory)
    shown = storage.public(directory)
    if kind == "latents":
        manifest = schema.load_manifest(directory)
        schema.check_compatible(manifest, vae=vae, text_encoder=text_encoder)
    else:
        manifest = schema.load_pair_manifest(directory)
        schema.check_pairs_compatible(manifest, vae=vae, text_encoder=text_encoder)
    import pyarrow.fs as pafs

    with storage.named_errors(directory, "cannot list"):
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    sizes = {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}
    names = [s["name"] for s in manifest["shards"]]
    missing = [storage.join(shown, n) for n in names if n not in sizes]
    if missing:
        raise schema.IncompatibleShardsError(f"shards listed in the manifest are missing: {missing[:5]}")
    return manifest, [storage.join(directory, n) for n in names], [int(sizes[n]) for n in names]


def read_source(spec: str | Path) -> bytes:
    """The bytes of a shard file: a local path read directly, a URI through its pyarrow filesystem (an error names
    the URI without credentials, endpoint or keys: `pipeline.core.storage`)."""
    if not is_uri(spec):
        return Path(spec).read_bytes()
    from pipeline.core import storage

    try:
        return storage.read_bytes(str(spec))
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.public(str(spec))}: the shard is gone from the store") from None


class ShardCache:
    """Shard files on a local disk named by their sha256, at most `max_bytes` in all, least recently used evicted
    first (recency is the file's mtime, set on every write and hit: other processes sharing the folder see it)."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir, self.max_bytes = Path(directory), int(max_bytes)
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = time.time() - 3600  # temporaries of a killed process (live writers rename theirs within seconds)
        for p in self.dir.glob(f"{TMP}*"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < stale:
                    p.unlink()

    def path(self, digest: str) -> Path:
        """Where the shard of sha256 `digest` is kept."""
        return self.dir / f"{digest}{SUFFIX}"

    def get(self, digest: str) -> bytes | None:
        """The cached bytes (unverified: the caller checks them), or None; a hit makes the file the most recent."""
        p = self.path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # not cached, or evicted by another process sharing the folder
            return None
        self._touch(p)
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Keep `data` (verified by the caller) under `digest`, atomically; then evict down to the cap. A shard
        larger than the cap is not kept."""
        if len(data) > self.max_bytes:
            return
        tmp = self.dir / f"{TMP}{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path(digest))
        except OSError:  # a full or read-only disk costs a fetch next time, never the run
            tmp.unlink(missing_ok=True)
            return
        self._touch(self.path(digest))
        self.evict()

    def drop(self, digest: str) -> None:
        """Remove the copy of `digest` (a damaged one)."""
        self.path(digest).unlink(missing_ok=True)

    def entries(self) -> list[tuple[int, str, int]]:
        """(mtime in ns, name, bytes) of the cached files, least recently used first."""
        out = []
        for e in os.scandir(self.dir):
            if e.name.endswith(SUFFIX) and not e.name.startswith(TMP):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime_ns, e.name, st.st_size))
        return sorted(out)

    def evict(self) -> list[str]:
        """Delete the least recently used files until the rest fit `max_bytes`; their names."""
        entries = self.entries()
        total, gone = sum(e[2] for e in entries), []
        for _, name, size in entries:
            if total <= self.max_bytes:
                break
            (self.dir / name).unlink(missing_ok=True)
            total -= size
            gone.append(name)
        return gone

    @staticmethod
    def _touch(p: Path) -> None:
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(p, ns=(now, now))


MODEL_FILES = ("config.json", "model.safetensors", "model_ema.safetensors")


def local_model_dir(spec: str) -> str:
    """A model or checkpoint folder as a local path: `spec` itself when it is one, else its config and weights
    copied once into the node's model cache (`pipeline.core.storage.local_copy`, `$LIGHTGEN_CACHE`; every process may ask,
    the copy is published whole). Errors name the URI without credentials."""
    if not is_uri(spec):
        return spec
    from pipeline.core import storage

    local = storage.local_copy(spec, MODEL_FILES)
    if not (Path(local) / "config.json").is_file():
        raise FileNotFoundError(f"model.init_from={storage.public(spec)}: no config.json there (not a model folder)")
    return local


def describe(value: Any) -> str:
    """A location for a message: a URI without its credentials, a path as it is."""
    if is_uri(str(value)):
        from pipeline.core import storage

        return storage.public(str(value))
    return str(value)
