"""The runner, through a toy stage: counts and rejects, resume (kill -9, damaged shards), the same output in
process, on a 2-worker Ray pool and on a 2-node Ray cluster, a lost worker retried, the options of a command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import toy_stage
from toy_stage import ToyConfig, ToyStage

from pipeline.core.runner import run_stage
from pipeline.core.stage import WorkUnit
from pipeline.io import inputs

REPO = Path(__file__).resolve().parents[1]


def make_inputs(root: Path, n_files: int = 5, per_file: int = 6, extra: dict[str, str] | None = None) -> Path:
    """`n_files` text files of integers, each with one line that is not an integer (a reject)."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        lines = [str(k * 100 + j) for j in range(per_file)] + [f"word{k}"]
        (root / f"f{k}.txt").write_text("\n".join(lines) + "\n")
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def run(src: Path, out: Path, **kw) -> dict:
    """Run the toy stage quietly, in process unless `workers` is given."""
    cfg = ToyConfig(inputs=[str(src)], output=str(out), **{"workers": 0, "progress": False, **kw})
    return run_stage(ToyStage(cfg))


def rows(out: Path) -> pa.Table:
    """All rows, in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])


def test_counts_rejects_manifest_and_no_ray(tmp_path):
    src = make_inputs(tmp_path / "in", extra={"notes.md": "not an input"})
    report = run(src, tmp_path / "out", offset=1)
    assert (report["inputs"], report["written"], report["rejected"], report["shards"]) == (35, 30, 5, 5)
    assert report["rejected_by_reason"] == {"not_an_int": 5}
    t = rows(tmp_path / "out")
    assert t.column("value").to_pylist() == [k * 100 + j + 1 for k in range(5) for j in range(6)]
    assert t.column("square").to_pylist() == [v * v for v in t.column("value").to_pylist()]
    assert t.column("id").to_pylist()[:2] == ["f0/0", "f0/1"]
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet")
    assert rej.column("id").to_pylist() == [f"f{k}/6" for k in range(5)] and all(rej.column("detail").to_pylist())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"] == 35 and manifest["rows_per_shard"] == [6] * 5
    assert manifest["stage"] == "toy" and manifest["config"]["offset"] == 1
    for s in manifest["shards"]:  # the manifest's checksums are the files'
        import hashlib

        assert hashlib.sha256((tmp_path / "out" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_in_process_never_imports_ray(tmp_path):
    src = make_inputs(tmp_path / "in", n_files=2)
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from toy_stage import ToyConfig, ToyStage
from pipeline.core.runner import run_stage
run_stage(ToyStage(ToyConfig(inputs=[{str(src)!r}], output={str(tmp_path / "out")!r}, workers=0, progress=False)))
assert "ray" not in sys.modules, "ray was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_resume_keeps_good_shards_and_redoes_damaged_ones(tmp_path):
    src, out = make_inputs(tmp_path / "in"), tmp_path / "out"
    run(src, out)
    clean = rows(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    data = bytearray((out / "part-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01  # a flipped bit: same size, still a readable file
    (out / "part-00001.parquet").write_bytes(bytes(data))
    (out / "part-00003.done.json").unlink()  # a shard whose receipt never landed
    (out / "part-00004.parquet.tmp-abc").write_bytes(b"half")
    (out / "part-00042.parquet").write_bytes(b"beyond the plan")
    report = run(src, out)
    assert (report["shards_skipped"], report["shards_run"], report["written"]) == (3, 2, 30)
    assert rows(out).equals(clean)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name[5:10] in ("00000", "00002", "00004")}
    assert kept == {k: v for k, v in stamps.items() if k[5:10] in ("00000", "00002", "00004")}
    assert not list(out.glob("*.tmp-*")) and not (out / "part-00042.parquet").exists()
    # Changing an input redoes only its shard.
    (src / "f2.txt").write_text("7\n")
    report = run(src, out)
    assert (report["shards_run"], report["written"]) == (1, 25)
    # Other settings are refused; --overwrite replaces.
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        run(src, out, offset=5)
    assert run(src, out, offset=5, overwrite=True)["shards_run"] == 5


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from toy_stage import ToyConfig, ToyStage
from pipeline.core.runner import run_stage
run_stage(ToyStage(ToyConfig(inputs=[{src!r}], output={out!r}, workers=0, progress=False, batch_size=1)))
"""


@pytest.mark.slow
def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    src, out = make_inputs(tmp_path / "in", n_files=6, per_file=3), tmp_path / "out"
    (src / "f3.txt").write_text("300\nsleep\n301\n")  # the run hangs in shard 3, inside a shard
    code = textwrap.dedent(KILLED.format(tests=str(REPO / "tests"), src=str(src), out=str(out)))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(out.glob("part-*.done.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("part-*.done.json"))) == 3 and list(out.glob("*.tmp-*"))  # shard 3 half written
    (src / "f3.txt").write_text("300\n301\n")
    report = run(src, out)
    assert (report["shards_skipped"], report["shards_run"]) == (3, 3)
    fresh = tmp_path / "fresh"
    run(src, fresh)
    assert rows(out).equals(rows(fresh)) and not list(out.glob("*.tmp-*"))
    ids = rows(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == report["written"]


def test_a_failing_stage_leaves_finished_shards_for_the_rerun(tmp_path, monkeypatch):
    src, out = make_inputs(tmp_path / "in", extra={"g.txt": "1\nboom\n2\n"}), tmp_path / "out"
    monkeypatch.setenv("TOY_BOOM", "1")
    with pytest.raises(RuntimeError, match="boom"):
        run(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(list(out.glob("part-*.done.json"))) == 5
    monkeypatch.delenv("TOY_BOOM")
    report = run(src, out)
    assert report["shards_skipped"] == 5 and report["rejected_by_reason"] == {"not_an_int": 5, "special": 1}


def test_plan_units_by_kind(tmp_path):
    (tmp_path / "a").mkdir()
    for n in ("x.tar", "y.jsonl", "a/1.png", "a/2.jpg", "a/3.png", "manifest.json", ".hidden.tar", "p.rejects.parquet"):
        (tmp_path / n).write_bytes(b"")
    pq.write_table(pa.table({"c": list(range(5))}), tmp_path / "t.parquet")
    files = inputs.expand([str(tmp_path)])
    assert [Path(f).name for f in files] == ["1.png", "2.jpg", "3.png", "t.parquet", "x.tar", "y.jsonl"]
    assert all(isinstance(f, str) and Path(f).is_absolute() for f in files)
    units = inputs.plan_units(files, shard_size=2)
    got = [(u.index, u.kind, [Path(p).name for p in u.paths], u.start, u.stop) for u in units]
    assert got == [
        (0, "parquet", ["t.parquet"], 0, 2),
        (1, "parquet", ["t.parquet"], 2, 4),
        (2, "parquet", ["t.parquet"], 4, 5),
        (3, "tar", ["x.tar"], 0, -1),
        (4, "jsonl", ["y.jsonl"], 0, -1),
        (5, "images", ["1.png", "2.jpg"], 0, -1),
        (6, "images", ["3.png"], 0, -1),
    ]
    assert WorkUnit.from_json(json.loads(json.dumps(units[0].to_json()))) == units[0]
    with pytest.raises(FileNotFoundError, match="does not exist: .*nope"):
        inputs.expand([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="glob matches nothing"):
        inputs.expand([str(tmp_path / "*.zip")])


@pytest.fixture
def ray_cluster():
    """A 2-node Ray cluster on this machine (1 CPU each), with the toy stage shipped to the workers by value."""
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    from pipeline.core import runtime

    ray.cloudpickle.register_pickle_by_value(toy_stage)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    runtime.init_ray(cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_same_output_in_process_2_workers_and_2_nodes_and_a_lost_worker_is_retried(tmp_path, ray_cluster):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    src = make_inputs(tmp_path / "in", n_files=6)
    run(src, tmp_path / "local")
    expected = rows(tmp_path / "local")
    report = run(src, tmp_path / "ray", workers=2, ray_address=ray_cluster.address)
    assert report["written"] == 36 and rows(tmp_path / "ray").equals(expected)
    # 2 actors of 1 CPU each on nodes of 1 CPU: one actor per node.
    # A worker that dies mid-shard is restarted and the shard redone: nothing lost, nothing doubled.
    (src / "f9.txt").write_text("1\ndie\n2\n")
    out = tmp_path / "died"
    report = run(src, out, workers=2, ray_address=ray_cluster.address)
    assert (out / "died").exists()  # the worker did die once
    assert report["written"] == 38 and report["rejected_by_reason"] == {"not_an_int": 6, "died_once": 1}
    ids = rows(out).column("id").to_pylist()
    assert len(ids) == len(set(ids))


def test_storage_must_be_shared_on_a_cluster(monkeypatch, tmp_path):
    from pipeline.core import runtime

    nodes = [
        {"Alive": True, "NodeID": c * 56, "NodeManagerAddress": f"10.0.0.{i}", "Resources": {"CPU": 2}}
        for i, c in enumerate("ab")
    ]
    monkeypatch.setattr(runtime, "_alive_nodes", lambda: nodes)
    calls = []

    class FakeRemote:
        def options(self, **kw):
            return self

        def remote(self, uri, name):
            calls.append(name)
            return len(calls) == 1  # the first node sees the probe, the second does not

    import ray

    monkeypatch.setattr(ray, "remote", lambda **kw: lambda fn: FakeRemote())
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    with pytest.raises(ValueError, match="not visible from node.*shared"):
        runtime.check_shared_storage(str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob(".probe-*"))  # the probe is cleaned up


def test_stage_command_options_come_from_the_config(tmp_path):
    import typer
    from typer.testing import CliRunner

    from pipeline.core.options import command

    app = typer.Typer()
    seen = []
    app.command("toy")(command(ToyConfig, seen.append, "Square integers."))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["toy", "--help"], terminal_width=200)
    assert "--offset" in result.output and "Added to every value." in result.output and "--quiet" in result.output
    assert "[default: 2]" in result.output  # the stage's own batch-size default, not the shared one
    src = make_inputs(tmp_path / "in", n_files=1)
    result = CliRunner().invoke(
        app, ["toy", "--input", str(src), "--output", str(tmp_path / "o"), "--offset", "3", "--quiet", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [ToyConfig(inputs=[str(src)], output=str(tmp_path / "o"), offset=3, progress=False, overwrite=True)]
