"""Faults on a cluster, on this machine: a Ray node removed in the middle of a stage (its units are redone on the
node that is left, with the same bytes as in process), and one of two torchrun launchers killed in the middle of a
training run (the other stops with one error line in bounded time; rerunning both resumes to the same weights)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import toy_stage
from s3_server import free_port
from safetensors.torch import load_file
from toy_stage import ToyConfig, ToyStage
from train_utils import STANDALONE, finish, random_shards, torchrun_cmd, torchrun_env, two_node_launch

from pipeline.core.runner import run_stage
from pipeline.core.stage import Output

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ a Ray node lost


class SlowToy(ToyStage):
    """The toy stage at 0.4 s a batch, so that a node can be removed while its unit is half done; its output is the
    toy stage's, byte for byte (same name, config and rows). Each batch leaves a marker `<node id>.<first row id>` in
    `trace` (set before the run: the class is shipped by value), telling which node worked on which unit."""

    trace = ""

    def process(self, items: Sequence[Any]) -> Output:
        import ray

        node = ray.get_runtime_context().get_node_id()
        (Path(self.trace) / f"{node}.{items[0][0].replace('/', '_')}").touch()
        time.sleep(0.4)
        return super().process(items)


def make_inputs(root: Path, n_files: int, per_file: int) -> Path:
    """`n_files` text files of integers, each with one line that is not an integer (a reject)."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        (root / f"f{k}.txt").write_text("\n".join([*(str(k * 100 + j) for j in range(per_file)), f"w{k}"]) + "\n")
    return root


def shard_shas(out: Path) -> list[str]:
    """The sha256 of every shard, in manifest order."""
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


@pytest.fixture
def two_nodes():
    """A 2-node Ray cluster on this machine (1 CPU each); this module and the toy stage shipped by value."""
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    from pipeline.core import runtime

    ray.cloudpickle.register_pickle_by_value(toy_stage)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    runtime.init_ray(cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_a_node_removed_mid_stage_has_its_units_redone_on_the_other(tmp_path, two_nodes):
    import ray

    cluster, worker = two_nodes
    src = make_inputs(tmp_path / "in", n_files=6, per_file=7)  # 6 units of 4 batches: 1.6 s each
    kw = dict(inputs=[str(src)], progress=False, batch_size=2)
    run_stage(ToyStage(ToyConfig(output=str(tmp_path / "local"), workers=0, **kw)))
    out, trace = tmp_path / "ray", tmp_path / "trace"
    trace.mkdir()
    SlowToy.trace = str(trace)
    at_removal: list[int] = []

    def busy_on_worker() -> bool:  # the worker node is in the middle of a unit (a batch done, no receipt yet)
        started = {int(m.name.split(".", 1)[1][1:].split("_")[0]) for m in trace.glob(f"{worker.node_id}.*")}
        return any(not (out / f"part-{k:05d}.done.json").exists() for k in started)

    def remove_mid_unit() -> None:
        deadline = time.time() + 120
        while not (list(out.glob("part-*.done.json")) and busy_on_worker()) and time.time() < deadline:
            time.sleep(0.02)
        cluster.remove_node(worker)  # its raylet and workers killed: as a machine that is lost
        at_removal.append(len(list(out.glob("part-*.done.json"))))

    remover = threading.Thread(target=remove_mid_unit, daemon=True)
    remover.start()
    t0 = time.time()
    report = run_stage(SlowToy(ToyConfig(output=str(out), workers=2, ray_address=cluster.address, **kw)))
    seconds = time.time() - t0
    remover.join(5)
    assert at_removal and at_removal[0] < 6 and len([n for n in ray.nodes() if n["Alive"]]) == 1
    # A unit begun on the lost node was done again on the node that is left.
    units = {
        node: {m.name.split(".", 1)[1].split("_")[0] for m in trace.glob(f"{node}.*")}
        for node in {m.name.split(".", 1)[0] for m in trace.iterdir()}
    }
    lost, left = units.pop(worker.node_id, set()), set().union(*units.values())
    assert lost & left, (sorted(lost), sorted(left))
    assert report["written"] == 42 and report["shards"] == 6 and report["shards_run"] == 6
    assert shard_shas(out) == shard_shas(tmp_path / "local")  # the same bytes as in process
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the lost worker's half-written shard is gone
    print(f"node removed after {at_removal[0]} of 6 shards; the stage took {seconds:.1f} s")


# ------------------------------------------------------------------------------------------------ a launcher lost


def test_a_collective_that_lost_its_peer_is_one_error_line_and_other_errors_stay(monkeypatch):
    from training import dist as D

    two, one = D.DistInfo(rank=1, world=2), D.DistInfo()
    gloo = "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:40132. This is typically ..."
    lost = r"^rank 1 of 2: .* gone .*\(Connection closed by peer \[127.0.0.1\]:40132\)"
    with pytest.raises(D.PeerLostError, match=lost), D.peer_failures(two):
        raise RuntimeError(gloo)
    for info, error in [(two, RuntimeError("mat1 and mat2 shapes cannot be multiplied")), (one, RuntimeError(gloo))]:
        with pytest.raises(RuntimeError) as e, D.peer_failures(info):
            raise error
        assert type(e.value) is RuntimeError  # a bug, or one process: the traceback stays
    monkeypatch.setenv("LIGHTGEN_DIST_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="LIGHTGEN_DIST_TIMEOUT_S='0'"):
        D.collective_timeout_s()
    monkeypatch.setenv("LIGHTGEN_DIST_TIMEOUT_S", "20")
    assert D.collective_timeout_s() == 20.0


TRAIN = [
    "--config",
    str(REPO / "conf/debug.yaml"),
    "log.sample_count=0",
    "log.progress=false",
    "data.batch_size=4",
    "train.threads=1",
    "train.max_steps=40",
    "checkpoint.every_steps=5",
]


def torchrun(out: Path, shards: Path, node_rank: int | None = None, port: int = 0, **env: str) -> subprocess.Popen:
    """One node of two of one process each at a c10d rendezvous on 127.0.0.1:`port` (`node_rank` None: one launcher
    of two processes), in a session of its own so that a launcher can be killed as a machine dies."""
    where = STANDALONE if node_rank is None else two_node_launch(node_rank, port, "lightgen-fault")
    cmd = torchrun_cmd(
        REPO / "training/pretrain.py", *TRAIN, f"data.shards=[{shards}]", f"train.out_dir={out}", launch=where
    )
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env(**env), start_new_session=True
    )


def two_launchers_at_step_10(out: Path, shards: Path, **env: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Both launchers of a 2-node run, returned once its step-10 checkpoint is there (the run goes on to 40)."""
    port = free_port()
    node0 = torchrun(out, shards, 0, port, **env)
    time.sleep(1)  # node 0 hosts the rendezvous store
    node1 = torchrun(out, shards, 1, port, **env)
    deadline = time.time() + 240
    while not (out / "checkpoints/step-00000010").exists() and time.time() < deadline and node0.poll() is None:
        time.sleep(0.02)
    return node0, node1


def stops_alone(node: subprocess.Popen, within: float) -> tuple[float, str]:
    """Seconds until `node` exits by itself (killed after `within` s: a hang) and its stderr."""
    t0 = time.time()
    try:
        _, err = node.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        kill_group(node)
        raise
    return time.time() - t0, err


def assert_one_error_line(node: subprocess.Popen, err: str, cause: str) -> None:
    """The trainer said why it stopped in one line, with no traceback of its own (torchrun adds its report)."""
    errors = [line for line in err.splitlines() if "error: " in line]
    assert node.returncode != 0 and len(errors) == 1, err[-3000:]
    assert re.search(
        rf"error: rank 0 of 2: another process of this run is gone or does not answer \(.*{cause}", errors[0]
    ), errors
    assert "training/trainer.py" not in err, err[-3000:]


def kill_group(launcher: subprocess.Popen) -> None:
    """SIGKILL a launcher's process group (it runs in a session of its own)."""
    os.killpg(launcher.pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """The PIDs of the processes whose parent is `pid` (torchrun starts its workers in sessions of their own)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def weights(model: Path) -> dict[str, torch.Tensor]:
    """The exported model's weights and its EMA's."""
    return load_file(str(model / "model.safetensors")) | {
        f"ema.{k}": v for k, v in load_file(str(model / "model_ema.safetensors")).items()
    }


@pytest.mark.slow
def test_a_launcher_killed_mid_run_stops_the_other_in_one_line_and_both_rerun_resume_exactly(tmp_path):
    shards = random_shards(tmp_path / "shards", n=48, rows_per_shard=16)
    finish([torchrun(tmp_path / "straight", shards)], kill_group)  # the uninterrupted run: 2 processes, 40 steps
    out = tmp_path / "two"
    node0, node1 = two_launchers_at_step_10(out, shards)
    # Node 1 dies as a machine does: its launcher and its training process, kill -9.
    workers = children(node1.pid)
    assert node0.poll() is None and node1.poll() is None and workers, "the run ended before the kill"
    for pid in [node1.pid, *workers]:
        os.killpg(pid, signal.SIGKILL)
    seconds, err = stops_alone(node0, within=120)  # gloo sees the closed connection at the next collective
    node1.wait()
    assert seconds < 60
    assert_one_error_line(node0, err, "peer")
    assert not (out / "model").exists()  # stopped mid-run
    # Both launchers again: they resume from the last checkpoint and end with the uninterrupted run's weights.
    port = free_port()
    outs = finish([torchrun(out, shards, r, port) for r in (0, 1)], kill_group)
    resumed = [int(m) for o in outs for m in re.findall(r"resuming from .*\(step (\d+)\)", o)]
    assert len(resumed) == 1 and 10 <= resumed[0] < 40, outs
    a, b = weights(tmp_path / "straight/model"), weights(out / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"the surviving launcher stopped {seconds:.1f} s after the kill; resumed from step {resumed[0]}")


@pytest.mark.slow
def test_a_frozen_peer_stops_the_other_after_the_collective_timeout(tmp_path):
    """A peer that stops answering without closing its connections (a frozen machine, a network partition): the
    other waits `LIGHTGEN_DIST_TIMEOUT_S` (10 s here, 1800 by default), then stops in one line."""
    shards = random_shards(tmp_path / "shards", n=48, rows_per_shard=16)
    node0, node1 = two_launchers_at_step_10(tmp_path / "two", shards, LIGHTGEN_DIST_TIMEOUT_S="10")
    workers = children(node1.pid)
    assert node0.poll() is None and workers, "the run ended before the freeze"
    try:
        for pid in workers:
            os.killpg(pid, signal.SIGSTOP)
        seconds, err = stops_alone(node0, within=120)
    finally:
        for pid in [node1.pid, *workers]:
            os.killpg(pid, signal.SIGKILL)
        node1.wait()
    assert seconds < 60, seconds  # 10 s from the collective it was in (which may have begun before the freeze)
    assert_one_error_line(node0, err, "Timed out")
    print(f"the other launcher stopped {seconds:.1f} s after its peer froze (timeout 10 s)")
