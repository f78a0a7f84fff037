"""The output folder of a stage: a local path or any pyarrow filesystem URI that every node of the cluster sees.

Files are published atomically: written under a temporary name beside the final one, then renamed (on a local
disk after an fsync; on object stores a move, which readers see whole). Names with `TMP_MARK` are temporaries of
a run that died; `clean_temporaries` removes them.

Credentials and endpoints come from the standard environment (`AWS_*` incl. `AWS_ENDPOINT_URL`, Google's) and never
appear in what the pipeline writes or says: errors name the public URI (`public`) and have the endpoint and keys
masked (`StorageError`). An S3 store that does not answer is retried a bounded number of times
(`LIGHTGEN_S3_RETRIES`, default 3 attempts; `LIGHTGEN_S3_CONNECT_TIMEOUT` 10 s, `LIGHTGEN_S3_REQUEST_TIMEOUT` 60 s).
Model folders on a remote filesystem are copied once into a local cache (`local_copy`, `$LIGHTGEN_CACHE`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
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


# The environment that decides which store a URI reaches and how: a filesystem object is made once per value set.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "LIGHTGEN_S3_RETRIES",
    "LIGHTGEN_S3_CONNECT_TIMEOUT",
    "LIGHTGEN_S3_REQUEST_TIMEOUT",
)
# Values never shown in a message (an endpoint says where a private store is; keys are secrets).
_SECRET_ENV = STORAGE_ENV[:5]


class StorageError(OSError):
    """A filesystem operation that failed: the message names the public URI, with endpoints and keys masked."""


def scrub(text: str) -> str:
    """`text` with the storage endpoint and keys of the environment masked."""
    for key in _SECRET_ENV:
        value = os.environ.get(key, "")
        if len(value) >= 4:
            text = text.replace(value, "<hidden>")
            host = value.split("://", 1)[-1].rstrip("/")
            if "://" in value and host:
                text = text.replace(host, "<endpoint>")
    return text


@contextmanager
def named_errors(spec: str, what: str = "") -> Iterator[None]:
    """Re-raise an OSError or Arrow error of the block as one `StorageError` naming `spec`'s public URI."""
    import pyarrow as pa

    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        msg = _brief(e).replace("To create buckets, enable the allow_bucket_creation option.", "Create it first.")
        if public(spec) not in msg:
            msg = f"{what or 'storage error'} {public(spec)}: {msg}"
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else StorageError)(scrub(msg)) from None


@contextmanager
def masked_errors() -> Iterator[None]:
    """Re-raise an error whose message shows the storage endpoint or keys with them masked (for the one line a
    command prints, whichever module raised it)."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException, ValueError) as e:
        text = " ".join(str(e).split())
        if scrub(text) == text:
            raise
        raise (ValueError if isinstance(e, ValueError) else StorageError)(scrub(_brief(e))) from None


def _brief(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's S3 messages carry request ids)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r" ?\(Request ID: [^)]*\)", "", text)


def env_positive(name: str, default: float, unit: str = "") -> float:
    """A positive number from the environment variable `name`, `default` when unset; an error naming it otherwise."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: expected a positive number" + (f" of {unit}" if unit else ""))
    return value


def _s3_options() -> dict[str, Any]:
    """S3FileSystem options from the environment: endpoint (`AWS_ENDPOINT_URL[_S3]`), region, bounded retries."""
    opts: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(env_positive("LIGHTGEN_S3_RETRIES", 3))),
        "connect_timeout": env_positive("LIGHTGEN_S3_CONNECT_TIMEOUT", 10.0),
        "request_timeout": env_positive("LIGHTGEN_S3_REQUEST_TIMEOUT", 60.0),
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        opts.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


@functools.lru_cache(maxsize=64)
def _filesystem(head: str, env: tuple[str | None, ...] = ()) -> pafs.FileSystem:
    """One filesystem object per scheme + bucket (+ options) and storage environment (`env`, the values of
    `STORAGE_ENV`): S3 clients are costly to create. The one place S3 options are set: `s3://BUCKET` without query
    options gets `_s3_options()`; a URI with query options gets pyarrow's reading of them."""
    if head.lower().startswith("s3://") and "?" not in head:
        opts = _s3_options()
        if "region" not in opts and "endpoint_override" not in opts:
            opts["region"] = pafs.resolve_s3_region(head[5:])
        return pafs.S3FileSystem(**opts)
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
    env = tuple(os.environ.get(k) for k in STORAGE_ENV)
    with named_errors(spec, "cannot reach"):
        fs = _filesystem(f"{m.group(0)}{bucket}" + (f"?{query}" if query else ""), env)
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


def parent(spec: str) -> str:
    """The folder holding `spec` (a path or a URI, the same kind)."""
    return posixpath.dirname(str(spec).rstrip("/")) if is_uri(spec) else os.path.dirname(spec)


def relative(spec: str, base: str) -> str:
    """`spec` relative to folder `base`, posix style (a path under `base`, or a URI under the `base` URI)."""
    spec, base = str(spec), str(base)
    if not is_uri(spec):
        return os.path.relpath(spec, base).replace(os.sep, "/")
    head = base.rstrip("/") + "/"
    if not spec.startswith(head):
        raise ValueError(f"{public(spec)} is not inside {public(base)}")
    return spec[len(head) :]


def open_input(spec: str) -> pafs.NativeFile:
    """A seekable binary file on any filesystem (local path or URI)."""
    fs, path = resolve(spec)
    with named_errors(spec, "cannot open"):
        return fs.open_input_file(path)


def open_buffered(spec: str, buffer_size: int = 4 << 20) -> IO[bytes]:
    """A seekable, buffered binary file: `open()` for a local path; for a URI a read-ahead buffer of `buffer_size`
    over ranged reads, so that many small reads (tar headers, members) cost few requests."""
    if not is_uri(spec):
        return open(spec, "rb")  # noqa: SIM115 (the caller closes it)
    return io.BufferedReader(open_input(spec), buffer_size)


def read_bytes(spec: str) -> bytes:
    """The bytes of a file on any filesystem."""
    fs, path = resolve(spec)
    with named_errors(spec, "cannot read"), fs.open_input_stream(path) as f:
        return f.read()


def file_info(spec: str) -> pafs.FileInfo:
    """pyarrow's FileInfo of `spec` (type NotFound when it does not exist)."""
    fs, path = resolve(spec)
    with named_errors(spec, "cannot read"):
        return fs.get_file_info(path)


def is_file(spec: str) -> bool:
    """Whether `spec` is an existing file (local path or URI)."""
    if not is_uri(spec):
        return os.path.isfile(spec)
    return file_info(spec).type == pafs.FileType.File


def is_dir(spec: str) -> bool:
    """Whether `spec` is an existing folder (local path or URI; on object stores: a prefix with objects below)."""
    if not is_uri(spec):
        return os.path.isdir(spec)
    return file_info(spec).type == pafs.FileType.Directory


def cache_dir() -> str:
    """Where remote model folders are copied: `$LIGHTGEN_CACHE`, else `~/.cache/lightgen/models`."""
    return os.environ.get("LIGHTGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightgen", "models")


def local_copy(spec: str, files: Sequence[str] | None = None) -> str:
    """A local path holding `spec`: a local path comes back unchanged; a remote folder (or file) is copied once into
    `cache_dir()/<hash of its public URI, files, sizes and mtimes>/<its name>` (a temporary folder, then renamed),
    and later calls (any process on this node) reuse the copy. `files`: only these relative paths (e.g. a config)."""
    spec = str(spec)
    if not is_remote(spec):
        return resolve(spec)[1] if is_uri(spec) else spec
    fs, root = resolve(spec)
    root = root.rstrip("/")
    with named_errors(spec, "cannot read model"):
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"model path does not exist: {public(spec)}")
        if info.type == pafs.FileType.File:
            found = [info]
        else:
            found = [
                i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File
            ]
        rel = lambda i: i.path[len(root) + 1 :] if i.path != root else posixpath.basename(root)
        if files is not None:
            found = [i for i in found if rel(i) in set(files)]
        listing = sorted([rel(i), i.size, i.mtime_ns] for i in found)
        key = hashlib.sha256(json.dumps([public(spec), listing]).encode()).hexdigest()[:16]
        name = posixpath.basename(root) or "model"
        dest = os.path.join(cache_dir(), key, name)
        if os.path.exists(dest):
            return dest
        tmp = os.path.join(cache_dir(), key, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            for i in found:
                target = tmp if info.type == pafs.FileType.File else os.path.join(tmp, rel(i))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with fs.open_input_stream(i.path) as src, open(target, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
            os.makedirs(tmp, exist_ok=True) if info.type != pafs.FileType.File else None
            try:
                os.rename(tmp, dest)
            except OSError:  # another process published the same copy first
                if not os.path.exists(dest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else None
            os.remove(tmp) if os.path.isfile(tmp) else None
    return dest


def public_values(obj: Any) -> Any:
    """`obj` (a config dict, list or value) with every URI string made `public` (no credentials)."""
    if isinstance(obj, dict):
        return {k: public_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [public_values(v) for v in obj]
    return public(obj) if isinstance(obj, str) and is_uri(obj) else obj


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

    def spec(self, name: str) -> str:
        """`name` inside the folder as a user would write it: an absolute local path, or a URI without credentials."""
        return uri_of(self.fs, self.path(name), self.uri)

    def makedirs(self) -> None:
        """Create the folder if needed (an error naming the URI when the store refuses or does not answer)."""
        with named_errors(self.uri, "cannot create the output folder"):
            self.fs.create_dir(self.root, recursive=True)

    def list(self) -> list[str]:
        """Names of the files directly in the folder (empty if it does not exist)."""
        with named_errors(self.uri, "cannot list"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def exists(self, name: str) -> bool:
        """Whether file `name` exists."""
        with named_errors(self.spec(name), "cannot read"):
            return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        """Size of `name` in bytes."""
        with named_errors(self.spec(name), "cannot read"):
            return int(self.fs.get_file_info(self.path(name)).size)

    def delete(self, name: str) -> None:
        """Delete `name` if it exists."""
        if self.exists(name):
            with named_errors(self.spec(name), "cannot delete"):
                self.fs.delete_file(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        """The bytes of `name`."""
        with named_errors(self.spec(name), "cannot read"), self.fs.open_input_stream(self.path(name)) as f:
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
        with named_errors(self.spec(name), "cannot read"), self.fs.open_input_stream(self.path(name)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    @contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        """A binary stream to `name`, published atomically when the block exits without error."""
        tmp = f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        with named_errors(self.spec(name), "cannot write"):
            stream = self.fs.open_output_stream(self.path(tmp))
        try:
            if self.local:
                yield stream
            else:  # the stream's own errors (a part upload that failed) name the file, endpoint and keys masked
                with named_errors(self.spec(name), "cannot write"):
                    yield stream
            with named_errors(self.spec(name), "cannot write"):
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
            self._discard(stream, tmp)
            raise

    def _discard(self, stream: Any, tmp: str) -> None:
        """Best-effort removal of a failed write's temporary (an unreachable store leaves it to the next run)."""
        try:
            if not stream.closed:
                stream.close()
            if self.exists(tmp):
                self.fs.delete_file(self.path(tmp))
        except (OSError, ValueError):
            pass

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
