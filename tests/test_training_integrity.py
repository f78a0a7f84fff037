"""The trainer against hostile input and hard stops: changed shards, two trainers on one out_dir, edited
state.json, kill -9 during and between checkpoints, SIGTERM under torchrun, runs of non-finite values, and one
`error:` line with exit code 2 for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from train_utils import random_shards, user_error, write_pair_shards

from training import checkpoint as ckpt_io
from training import dpo, pretrain, rundir
from training.data import ShardSet

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--config", str(ROOT / "conf/debug.yaml"), "log.sample_count=0"]
RUN = ["train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=3"]


def argv(out: Path, shards: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.shards=[{shards}]", f"train.out_dir={out}", *extra]


def train(out: Path, shards: Path, *extra: str) -> dict:
    return pretrain.main(argv(out, shards, *extra))


def steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors")) | load_file(str(ckpt / "optimizer.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def killed_at(out: Path, shards: Path, when: str, *extra: str) -> None:
    """Run the trainer in a subprocess that SIGKILLs itself at `when`: 'after_step <n>' (a step's metrics row
    recorded, its checkpoint if due written) or 'in_checkpoint' (the optimizer file of the first checkpoint about
    to be written into its temporary directory)."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from training import checkpoint, pretrain
when = {when!r}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if when == "in_checkpoint":
    checkpoint.save_file = lambda *a, **k: die()
else:
    real = pretrain.Trainer.after_step
    def after_step(self, r):
        real(self, r)
        if self.state.step == int(when.split()[1]):
            die()
    pretrain.Trainer.after_step = after_step
pretrain.main({argv(out, shards, *extra)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return random_shards(tmp_path_factory.mktemp("data") / "shards", n=48, rows_per_shard=16)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards) -> Path:
    """An uninterrupted 8-step run with checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out, shards, *RUN)
    return out


# -- shards that changed after they were written -------------------------------------------------------------
def flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_changed_byte_in_a_shard_stops_the_run_naming_it(tmp_path, capsys):
    d = random_shards(tmp_path / "shards", n=48, rows_per_shard=16)
    before = pq.read_table(d / "part-00001.parquet")
    flip_middle_byte(d / "part-00001.parquet")
    after = pq.read_table(d / "part-00001.parquet")  # still a valid Parquet file: unnoticed without the sha256
    assert after.schema == before.schema and not after.equals(before)
    s = ShardSet([d])
    s.decoded(0)
    with pytest.raises(ValueError, match=r"part-00001\.parquet: sha256 [0-9a-f]{64} does not match the manifest"):
        s.decoded(1)
    line = user_error(
        capsys,
        lambda: train(tmp_path / "run", d, "train.max_steps=20"),
        r"part-00001\.parquet: sha256 [0-9a-f]{64} does not match the manifest",
    )
    assert "changed after it was written" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_shard_of_another_size_is_refused_at_start(tmp_path, capsys):
    d = random_shards(tmp_path / "shards", n=32, rows_per_shard=16)
    with open(d / "part-00001.parquet", "ab") as f:
        f.write(b"\0")
    user_error(
        capsys,
        lambda: train(tmp_path / "run", d, "train.max_steps=2"),
        r"part-00001\.parquet: \d+ bytes, the manifest lists \d+",
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


# -- one trainer per out_dir ---------------------------------------------------------------------------------
HOLD = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from training.rundir import OutDirLock
OutDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_the_same_out_dir_is_refused_naming_the_first(tmp_path, shards, capsys):
    out = tmp_path / "run"
    train(out, shards, "train.max_steps=4", "checkpoint.every_steps=2")
    leftover = out / "checkpoints" / ".tmp-step-00000006-1"  # as if the holder were writing it right now
    leftover.mkdir()
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = user_error(
            capsys,
            lambda: train(out, shards, "train.max_steps=8", "checkpoint.keep_last=1"),
            rf"train.out_dir=.* is in use by another trainer \(PID {holder.pid} on ",
        )
        assert "train.lock" in line
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted
    finally:
        holder.kill()  # kill -9: the kernel drops the flock; the lock file with its PID stays behind
        holder.wait()
    assert f"PID {holder.pid} " in (out / rundir.LOCK).read_text()
    assert train(out, shards, "train.max_steps=6", "checkpoint.every_steps=2")["step"] == 6  # a stale file: no block
    assert not leftover.exists()
    assert f"PID {os.getpid()} " in (out / rundir.LOCK).read_text()


def test_the_script_refuses_a_locked_out_dir_with_exit_code_2(tmp_path, shards):
    lock = rundir.OutDirLock(tmp_path / "run")
    lock.acquire()
    try:
        cmd = [sys.executable, str(ROOT / "training/pretrain.py"), *argv(tmp_path / "run", shards, "train.max_steps=2")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and f"(PID {os.getpid()} on " in errors[0], r.stderr


# -- state.json ----------------------------------------------------------------------------------------------
def _edit(doc: dict, how: str) -> object:
    if how == "not an object":
        return [doc]
    if how == "step edited":
        return doc | {"step": 12}
    if how == "no checksum":
        return {k: v for k, v in doc.items() if k != ckpt_io.CHECKSUM}
    escape = {"files": doc["files"] | {"../x": doc["files"]["config.json"]}}
    bad = {
        "loader types": {"loader": {"epoch": "0", "index": 3}},
        "step resealed": {"step": 12},
        "missing field": {"nonfinite": None},
        "file name": escape,
    }
    edited = {k: v for k, v in (doc | bad[how]).items() if v is not None}
    return edited | {ckpt_io.CHECKSUM: ckpt_io.state_checksum(edited)}  # a checksum made to match: still refused


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("not an object", "is not a JSON object"),
        ("step edited", "does not match its checksum"),
        ("no checksum", "has no checksum"),
        ("loader types", "loader missing or of the wrong type"),
        ("missing field", "nonfinite missing or of the wrong type"),
        ("file name", "files missing or of the wrong type"),
        ("step resealed", "says step 12, the directory is step-00000008"),
    ],
)
def test_a_bad_state_json_falls_back_to_the_previous_checkpoint(tmp_path, shards, straight, how, why, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    c8 = out / "checkpoints/step-00000008"
    (c8 / "state.json").write_text(json.dumps(_edit(json.loads((c8 / "state.json").read_text()), how)))
    assert why in ckpt_io.verify(c8)
    capsys.readouterr()
    assert train(out, shards, *RUN)["step"] == 8
    text = capsys.readouterr().out
    assert f"warning: skipping damaged checkpoint {c8}: " in text and why in text
    assert "resuming from" in text and "step-00000004 (step 4)" in text
    assert_same(weights(c8), weights(straight / "checkpoints/step-00000008"))  # resumed at 4, bit-exact
    assert steps(out) == list(range(1, 9))


def test_a_named_bad_checkpoint_is_an_error(tmp_path, shards, straight, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    c4 = out / "checkpoints/step-00000004"
    doc = json.loads((c4 / "state.json").read_text())
    (c4 / "state.json").write_text(json.dumps(doc | {"elapsed_s": -1.0}))
    user_error(
        capsys,
        lambda: train(tmp_path / "other", shards, f"checkpoint.resume={c4}"),
        r"checkpoint.resume=.*step-00000004: state.json does not match its checksum",
    )


# -- kill -9 -------------------------------------------------------------------------------------------------
def test_kill_during_a_checkpoint_leaves_nothing_behind(tmp_path, shards, straight, capsys):
    out = tmp_path / "run"
    killed_at(out, shards, "in_checkpoint", *RUN)
    (tmp,) = (out / "checkpoints").glob(".tmp-step-00000004-*")
    assert (tmp / "model.safetensors").is_file() and not ckpt_io.checkpoint_dirs(out / "checkpoints")
    assert train(out, shards, *RUN)["step"] == 8
    assert f"removed {tmp}" in capsys.readouterr().out
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert steps(out) == list(range(1, 9))
    assert_same(weights(out / "checkpoints/step-00000008"), weights(straight / "checkpoints/step-00000008"))


@pytest.mark.parametrize("log_every", [1000, 1])  # rows before the checkpoint unflushed / rows after it on disk
def test_kill_between_checkpoints_then_resume_logs_every_step_once(tmp_path, shards, straight, log_every):
    out = tmp_path / "run"
    killed_at(out, shards, "after_step 6", *RUN, f"log.every={log_every}")
    assert [d.name for d in ckpt_io.checkpoint_dirs(out / "checkpoints")] == ["step-00000004"]
    on_disk = steps(out)
    assert on_disk == list(range(1, 5 if log_every > 1 else 7))  # flushed at the checkpoint / every step
    train(out, shards, *RUN, f"log.every={log_every}")
    assert steps(out) == list(range(1, 9))
    rows = lambda p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(out) == rows(straight)


# -- SIGTERM under torchrun ----------------------------------------------------------------------------------
def _torchrun_until_signal(out: Path, shards: Path, target: str) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(ROOT / "training/pretrain.py"),
        *argv(out, shards, "data.batch_size=4", "train.max_steps=100000", "checkpoint.every_steps=0", "log.every=1"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    start = len(steps(out)) if (out / "metrics.jsonl").is_file() else 0
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(steps(out)) >= start + 3:
            break
        time.sleep(0.2)
    if target == "torchrun":
        proc.send_signal(signal.SIGTERM)
    else:  # the workers: torchrun's children
        for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGTERM)
    text, _ = proc.communicate(timeout=240)
    return proc.returncode, text


@pytest.mark.slow
def test_sigterm_under_torchrun_writes_a_checkpoint_and_says_so(tmp_path, shards):
    out = tmp_path / "run"
    for target, code in (("torchrun", 1), ("workers", 0)):
        rc, text = _torchrun_until_signal(out, shards, target)
        # torchrun re-raises a signal it received itself (SignalException: exit 1) whatever its workers did;
        # signalled directly, the workers stop cleanly and torchrun exits 0 (docs/training.md)
        assert rc == code, text[-3000:]
        summary = json.loads((out / "summary.json").read_text())  # a clean stop, whatever torchrun returned
        assert summary["stopped_by"] == "signal"
        newest = ckpt_io.checkpoint_dirs(out / "checkpoints")[-1]
        assert newest.name == f"step-{summary['step']:08d}" and ckpt_io.verify(newest) is None
        assert f"stopped by signal at step {summary['step']}: checkpoint written" in text
        tracebacks = text.count("Traceback")
        assert tracebacks == 0 if target == "workers" else tracebacks == text.count("SignalException: Process") == 1
        assert steps(out) == list(range(1, summary["step"] + 1))


# -- runs of non-finite values, and every other bad input: one line, exit code 2 --------------------------------
def test_a_run_of_nonfinite_steps_is_one_error_line(tmp_path, shards, monkeypatch, capsys):
    real = pretrain.PretrainTrainer.loss
    monkeypatch.setattr(pretrain.PretrainTrainer, "loss", lambda self, m, b: (real(self, m, b)[0] * float("nan"), {}))
    monkeypatch.setattr(pretrain.Trainer, "_flops_per_image", lambda *a: None)
    user_error(
        capsys,
        lambda: train(tmp_path / "run", shards, "train.max_steps=10", "train.max_nonfinite=4"),
        r"4 consecutive steps with a non-finite loss or gradient .*lower optim.blr",
    )


@pytest.fixture(scope="module")
def init_model(tmp_path_factory) -> Path:
    from lightgen_model import LightGen, preset, save_pretrained

    return save_pretrained(LightGen(preset("debug")), tmp_path_factory.mktemp("init") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.uniform(-1, 1, (8, 3, 32, 32)), np.full((8, 3, 32, 32), -30.0)], 1).astype(np.float32)
    texts = [rng.standard_normal((4, 384)).astype(np.float32) for _ in range(8)]
    return write_pair_shards(tmp_path_factory.mktemp("pairs") / "pairs", m, m[::-1].copy(), texts, ["c"] * 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.bacth_size=3"], r"unknown key\(s\) \['bacth_size'\]"),
        (["--resume"], r"unknown option\(s\) \['--resume'\]"),
        (["data.shards=[/nonexistent/shards]"], "no manifest.json in /nonexistent/shards"),
        (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume=/nonexistent/ckpt: no state.json"),
        (["model.init_from=/nonexistent/model"], "no config.json in model directory /nonexistent/model"),
        (["train.device=tpu"], "train.device"),
    ],
)
@pytest.mark.parametrize("entry", ["pretrain", "dpo"])
def test_bad_input_is_one_error_line(tmp_path, shards, pairs, init_model, entry, extra, message, capsys):
    if entry == "pretrain":
        run = lambda: pretrain.main(argv(tmp_path / "run", shards, *extra))
    else:
        args = [*BASE, f"model.init_from={init_model}", f"dpo.pairs=[{pairs}]", f"train.out_dir={tmp_path / 'run'}"]
        run = lambda: dpo.main([*args, *(x.replace("data.shards", "dpo.pairs") for x in extra)])
    user_error(capsys, run, message)
