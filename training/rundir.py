"""The output directory of a training run: one trainer at a time, and no leftovers of a killed one.

`claim(out_dir, info)` takes an exclusive `flock` on `<out_dir>/train.lock` on the main process and writes its
PID (and host) into the file, so a second trainer on the same directory stops with an error naming the first
instead of deleting its checkpoints. The kernel drops the lock when its process dies (even by kill -9), so a lock
file left behind never blocks. Holding the lock, the main process removes what a killed run can leave: checkpoint
directories half assembled under their temporary names, a half-written exported model, and the `summary.json` of
an earlier run (so that one is there only when this run ended cleanly).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.core.locks import flock_exclusive, flock_release

from . import dist as D
from .metrics import log

LOCK = "train.lock"
SUMMARY = "summary.json"


class OutDirInUseError(OSError):
    """Another live trainer holds the lock on this output directory."""


class OutDirLock:
    """An exclusive, non-blocking `flock` on `<out_dir>/train.lock`, held until `release()` or process death."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's PID and host into the file; OutDirInUseError naming the
        holder when another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, holder = flock_exclusive(self.path)  # the pipeline's output folders are locked the same way
        if fd is None:
            raise OutDirInUseError(
                f"train.out_dir={self.path.parent} is in use by another trainer ({holder or 'PID not yet written'}; "
                f"lock file {self.path}): wait for it to end, stop it, or choose another train.out_dir"
            )
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays: its PID is only read while someone holds the lock."""
        if self.fd is not None:
            flock_release(self.fd)
            self.fd = None


def remove_leftovers(out: Path) -> list[Path]:
    """Delete what a killed run left under `out` (call it holding the lock): `checkpoints/.tmp-step-*`, the
    exported model's `.model.tmp-*` and `model/*.tmp`, and the previous `summary.json`. The paths removed."""
    out = Path(out)
    found = [*out.glob("checkpoints/.tmp-step-*"), *out.glob(".model.tmp-*"), *out.glob("model/*.tmp"), out / SUMMARY]
    gone = []
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
        else:
            continue
        gone.append(p)
    return gone


def claim(out: Path, info: D.DistInfo) -> OutDirLock | None:
    """Lock `out` on the main process and remove a killed run's leftovers; the lock (None on other ranks).

    Decided jointly: when the main process cannot take the lock it raises the error naming the holder and the
    other ranks exit with code 2 as well (quietly: the main process reports it)."""
    lock, error = (OutDirLock(out), None) if info.is_main else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except OSError as e:  # in use, or the directory cannot be created / written
            error = e
    if D.all_reduce_max(float(error is not None), info) > 0:
        if error is not None:
            raise error
        raise SystemExit(2)
    if lock is not None:
        for p in remove_leftovers(out):
            if p.name != SUMMARY:
                log(f"removed {p}: left by a run that was killed while writing it", info)
    return lock
