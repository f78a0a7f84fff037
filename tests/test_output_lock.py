"""One run at a time per output folder: a second run of a stage (or of build-captions) into a folder another live
run holds is refused with one line naming the holder; a local folder's flock goes with its process (kill -9
included); on object storage a fresh lease refuses, a stale one is taken over, and the lease goes at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from toy_stage import ToyConfig, ToyStage
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import locks, storage
from pipeline.core.runner import run_stage
from pipeline.core.storage import Storage

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_inputs(root: Path, n_files: int = 3, extra: dict[str, str] | None = None) -> Path:
    """`n_files` text files of integers."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        (root / f"f{k}.txt").write_text("".join(f"{k * 10 + j}\n" for j in range(4)))
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def run(src: Path, out: str, **kw) -> dict:
    """The toy stage, quietly, in this process."""
    return run_stage(ToyStage(ToyConfig(inputs=[str(src)], output=out, workers=0, progress=False, **kw)))


# A first run that is still going: it hangs in shard 1 ("sleep": 30 s) after finishing shard 0.
FIRST = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from toy_stage import ToyConfig, ToyStage
from pipeline.core.runner import run_stage
run_stage(ToyStage(ToyConfig(inputs=[{src!r}], output={out!r}, workers=0, progress=False, batch_size=1)))
"""

HOLD = """
import sys, time
sys.path[:0] = [{repo!r}]
from pipeline.core import locks
from pipeline.core.storage import Storage
with locks.hold(Storage(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_local_run_is_refused_while_the_first_runs_and_goes_on_after(tmp_path):
    src, out = make_inputs(tmp_path / "in", extra={"f1.txt": "10\nsleep\n11\n"}), tmp_path / "out"
    code = textwrap.dedent(FIRST.format(tests=str(REPO / "tests"), repo=str(REPO), src=str(src), out=str(out)))
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (out / "part-00000.done.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # now inside shard 1: its temporary is open
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        before = sorted(p.name for p in out.iterdir())
        assert any(storage.TMP_MARK in n for n in before)
        with pytest.raises(locks.OutputInUseError) as e:
            run(src, str(out), batch_size=1)
        line = str(e.value)
        assert f"--output {out} is in use by another run (PID {first.pid} on " in line and " since 20" in line
        assert str(out / locks.LOCK) in line and "\n" not in line
        assert sorted(p.name for p in out.iterdir()) == before  # the refused run deleted nothing, wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the flock, the lock file stays
        first.wait()
    assert f"PID {first.pid} on " in (out / locks.LOCK).read_text()
    (src / "f1.txt").write_text("10\n11\n")
    report = run(src, str(out), batch_size=1)
    assert (report["shards_skipped"], report["shards_run"], report["written"]) == (1, 2, 10)
    assert not [p for p in out.iterdir() if storage.TMP_MARK in p.name]


def test_build_captions_is_refused_while_its_output_is_held(tmp_path):
    out = tmp_path / "captions"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD.format(repo=str(REPO))), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    args = ["build-captions", "--shapes", "40", "--n", "10", "--embedder", "hash", "--output", str(out), "--workers"]
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, [*args, "0"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert f"error: --output {out} is in use by another run (PID {holder.pid} on " in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [locks.LOCK]  # no work folder, no manifest
    finally:
        holder.kill()
        holder.wait()
    result = CliRunner().invoke(app, [*args, "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["complete"]


def write_lease(uri: str, age_s: float, pid: int = 4242, host: str = "other-host") -> None:
    """A lease of another run, refreshed `age_s` seconds ago."""
    record = {
        "host": host,
        "pid": pid,
        "started": "2026-12-07T10:00:00Z",
        "refreshed_epoch": time.time() - age_s,
        "ttl_s": 300,
        "token": "theirs",
    }
    Storage(uri).write_json(locks.LEASE, record)


@pytest.fixture(autouse=True, scope="module")
def _quiet_server():
    """No line per request from moto's web server."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)


def test_on_object_storage_a_fresh_lease_refuses_a_stale_one_is_taken_over_and_it_goes_at_the_end(
    tmp_path, s3_bucket, monkeypatch
):
    src, out = make_inputs(tmp_path / "in"), f"{s3_bucket}/toy"
    write_lease(out, age_s=30)
    with pytest.raises(locks.OutputInUseError) as e:
        run(src, out)
    line = str(e.value)
    assert f"--output {out} is in use by another run (PID 4242 on other-host since 2026-12-07T10:00:00Z" in line
    assert "refreshed 30 s ago" in line and "expires 300 s after" in line and f"delete {locks.LEASE}" in line
    assert not Storage(out).exists("manifest.json")  # refused before anything was written
    write_lease(out, age_s=301)  # its run died 5 minutes ago: taken over
    assert run(src, out)["written"] == 12
    assert not Storage(out).exists(locks.LEASE)  # removed at the end
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    write_lease(out, age_s=5, pid=ended.pid, host=socket.gethostname())  # fresh, but its process here has ended
    assert run(src, out)["shards_skipped"] == 3
    # ... and on an error too.
    (src / "g.txt").write_text("1\nboom\n")
    monkeypatch.setenv("TOY_BOOM", "1")
    with pytest.raises(RuntimeError, match="boom"):
        run(src, out)
    assert not Storage(out).exists(locks.LEASE)


def test_a_held_lease_is_refreshed_and_of_two_runs_starting_together_one_goes_on(s3_bucket, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_LEASE_TTL", "1.2")  # refreshed every 0.2 s
    store = Storage(f"{s3_bucket}/held")
    with locks.hold(store):
        first = store.read_json(locks.LEASE)
        time.sleep(0.7)
        later = store.read_json(locks.LEASE)
        assert later["refreshed_epoch"] > first["refreshed_epoch"] and later["token"] == first["token"]
        assert later["pid"] == os.getpid() and later["started"] == first["started"]
        time.sleep(1.0)  # longer than the TTL: only the refresher keeps it fresh
        with pytest.raises(locks.OutputInUseError, match=f"PID {os.getpid()} on "):
            locks._Lease(store).acquire()  # another run (this process's nesting bypassed)
    assert not store.exists(locks.LEASE)
    # Two runs that start at once: both read no lease, both write theirs; only the one read back goes on.
    monkeypatch.setenv("LIGHTGEN_LEASE_TTL", "300")
    leases = [locks._Lease(store), locks._Lease(store)]
    outcome: list[str] = []

    def take(lease: locks._Lease) -> None:
        try:
            lease.acquire()
            outcome.append("held")
        except locks.OutputInUseError:
            outcome.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome) == ["held", "refused"]
    for lease in leases:
        lease.release()
    assert not store.exists(locks.LEASE)


def test_nested_holds_of_one_folder_are_one_a_failed_run_leaves_no_folder_and_a_bad_ttl_is_named(tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="bad input"), locks.hold(store):  # a run that fails before it writes
        raise ValueError("bad input")
    assert not (tmp_path / "out").exists()  # leaves no folder it made
    (tmp_path / "out").mkdir()
    with locks.hold(store), locks.hold(Storage(str(tmp_path / "out" / "."))):  # build-dpo-pairs nests its stages
        fd, holder = locks.flock_exclusive(tmp_path / "out" / locks.LOCK)
        assert fd is None and holder.startswith(f"PID {os.getpid()} on ")
    fd, _ = locks.flock_exclusive(tmp_path / "out" / locks.LOCK)  # released at the end of the outer hold
    assert fd is not None
    locks.flock_release(fd)
    monkeypatch.setenv("LIGHTGEN_LEASE_TTL", "soon")
    with pytest.raises(ValueError, match="LIGHTGEN_LEASE_TTL='soon'"):
        locks.lease_ttl()
