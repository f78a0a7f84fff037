"""One run at a time per output folder: an `flock` on a local folder, a lease file on object storage.

A local folder (a path, `file://`, a shared mount): an exclusive, non-blocking `flock` on `<folder>/.lock`, which
names its holder (PID, host, since when). The kernel drops it when the process dies, even by kill -9, so a file
left behind never blocks. The trainer locks its out_dir the same way (`training/rundir.py` uses `flock_exclusive`).

Object storage (`s3://`, `gs://`, ...) has no locks, so a run holds a lease: `<folder>/.lease.json` names host, PID,
start time and the last refresh; the driver refreshes it every `ttl / 6` seconds while the run goes on and deletes
it at the end, on an error too. A second run is refused while the lease is fresh (refreshed less than
`LIGHTGEN_LEASE_TTL` seconds ago, default 300); a stale one, left by a run that was killed, is taken over, and so
is at once the lease of a process of this machine that has ended (a store that was down when its run failed kept it
from deleting it). A lease is taken by writing it, waiting `SETTLE_S` and reading it back: of two runs that start
together, only the one whose lease is read back goes on. The refresher reads the lease before each write, so a run
that lost its lease (it stopped refreshing for longer than the TTL and another run took over) fails at its end
instead of overwriting it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.storage import Storage

LOCK = ".lock"
LEASE = ".lease.json"
SETTLE_S = 1.0  # between writing a lease and reading it back: longer than another run's read-then-write
_HELD: dict[str, int] = {}  # folders this process holds, with their nesting depth (build-dpo-pairs nests stages)
_TOKENS: set[str] = set()  # the leases this process is taking or holds


class OutputInUseError(OSError):
    """Another live run holds the output folder."""


def _iso(t: float) -> str:
    """`t` (seconds since the epoch) as an ISO 8601 UTC time to the second."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def holder_line() -> str:
    """Who holds a lock: `PID 123 on host since 2026-12-07T15:00:00Z`."""
    return f"PID {os.getpid()} on {socket.gethostname()} since {_iso(time.time())}"


def flock_exclusive(path: str | os.PathLike[str]) -> tuple[int | None, str]:
    """Open (create) `path` and take an exclusive, non-blocking flock, writing this process's `holder_line` into the
    file: `(fd, "")`; `(None, the holder's line)` when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip()
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, f"{holder_line()}\n".encode())
    os.fsync(fd)
    return fd, ""


def flock_release(fd: int) -> None:
    """Drop a lock of `flock_exclusive` and close its file (the file stays; its text is read only while held)."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lease_ttl() -> float:
    """Seconds after its last refresh that a lease expires: `LIGHTGEN_LEASE_TTL`, default 300."""
    from pipeline.core.storage import env_positive

    return env_positive("LIGHTGEN_LEASE_TTL", 300.0, "seconds")


def _running(pid: Any, token: Any) -> bool:
    """Whether the process `pid` of this machine that wrote lease `token` still runs (this process: if it holds it)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return token in _TOKENS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class _FolderFlock:
    """The flock on a local output folder."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        """Take the lock, or raise `OutputInUseError` naming its holder."""
        from pipeline.core.storage import public

        self.created = not os.path.isdir(self.store.root)
        self.store.makedirs()
        path = self.store.path(LOCK)
        self.fd, holder = flock_exclusive(path)
        if self.fd is None:
            raise OutputInUseError(
                f"--output {public(self.store.uri)} is in use by another run ({holder or 'PID not yet written'}; "
                f"lock file {path}): wait for it to end, stop it, or choose another --output"
            )

    def release(self) -> None:
        """Drop the lock; a folder this lock created and the run left empty (it failed before writing) goes too."""
        if self.fd is None:
            return
        root = self.store.root
        empty = self.created and os.listdir(root) == [LOCK]
        if empty:
            os.unlink(os.path.join(root, LOCK))
        flock_release(self.fd)
        self.fd = None
        if empty:
            with contextlib.suppress(OSError):
                os.rmdir(root)


class _Lease:
    """The lease on an output folder on object storage, refreshed by a daemon thread while held."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self.ttl = lease_ttl()
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _iso(self.started),
            "refreshed": _iso(now),
            "refreshed_epoch": now,
            "ttl_s": self.ttl,
            "token": self.token,
        }

    def _refused(self, lease: dict[str, Any], age: float) -> OutputInUseError:
        from pipeline.core.storage import public

        return OutputInUseError(
            f"--output {public(self.store.uri)} is in use by another run (PID {lease.get('pid')} on "
            f"{lease.get('host')} since {lease.get('started')}; its lease {public(self.store.spec(LEASE))} was "
            f"refreshed {age:.0f} s ago): wait for it to end or stop it; if that run is dead, its lease expires "
            f"{self.ttl:g} s after its last refresh (LIGHTGEN_LEASE_TTL), or delete {LEASE} to take over now"
        )

    def _fresh_other(self) -> tuple[dict[str, Any], float] | None:
        """The lease of another run and its age, if there is one that has not expired."""
        lease = self.store.read_json(LEASE)
        if not isinstance(lease, dict) or lease.get("token") == self.token:
            return None
        try:
            age = time.time() - float(lease["refreshed_epoch"])
        except (KeyError, TypeError, ValueError):
            return None  # not a lease this code wrote: taken over
        if lease.get("host") == socket.gethostname() and not _running(lease.get("pid"), lease.get("token")):
            return None  # its run, on this machine, has ended (a store that was down kept it from deleting it)
        return (lease, max(0.0, age)) if age < float(lease.get("ttl_s") or self.ttl) else None

    def acquire(self) -> None:
        """Take the lease (write, settle, read back), or raise `OutputInUseError` naming the holder; start the
        refresher."""
        self.store.makedirs()
        _TOKENS.add(self.token)
        try:
            if (other := self._fresh_other()) is not None:
                raise self._refused(*other)
            self.store.write_json(LEASE, self._record())
            time.sleep(SETTLE_S)
            if (other := self._fresh_other()) is not None:  # another run wrote its lease after ours
                raise self._refused(*other)
        except BaseException:
            _TOKENS.discard(self.token)
            raise
        self._thread = threading.Thread(target=self._refresh, name="lightgen-lease", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        """Rewrite the lease every ttl/6 s until released; stop (and note who) if another run took it over."""
        while not self._stop.wait(self.ttl / 6):
            try:
                lease = self.store.read_json(LEASE)
                if isinstance(lease, dict) and lease.get("token") not in (None, self.token):
                    self.lost = lease
                    return
                self.store.write_json(LEASE, self._record())
            except OSError:
                continue  # a store that does not answer for a while: the run's own requests will say so

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _TOKENS.discard(self.token)
        lease = self.store.read_json(LEASE)
        if isinstance(lease, dict) and lease.get("token") == self.token:
            self.store.delete(LEASE)


@contextmanager
def hold(store: Storage) -> Iterator[None]:
    """Hold `store`'s folder for the block: its flock (local) or its lease (object storage); an `OutputInUseError`
    naming the holder if another run has it. Nested holds of one folder in one process are one hold."""
    key = f"{type(store.fs).__name__}:{os.path.realpath(store.root) if store.local else store.root.rstrip('/')}"
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock: _FolderFlock | _Lease = _FolderFlock(store) if store.local else _Lease(store)
    lock.acquire()
    _HELD[key] = 1
    try:
        yield
        if isinstance(lock, _Lease) and lock.lost is not None:
            from pipeline.core.storage import public

            raise OutputInUseError(
                f"--output {public(store.uri)}: this run lost its lease to PID {lock.lost.get('pid')} on "
                f"{lock.lost.get('host')} (it did not refresh it for {lock.ttl:g} s); check the output, then rerun"
            )
    finally:
        del _HELD[key]
        lock.release()
