"""The stages on object storage, against a real S3 endpoint (moto's server on 127.0.0.1, standing in for S3, GCS or
MinIO): inputs read from and outputs written to `s3://` give the shards a local run gives; remote model folders are
copied once; a store that fails mid-stage stops the run with one error line and a rerun resumes; a missing bucket,
refused credentials or an unreachable endpoint stop it before any work; no secret reaches a manifest or report."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3_server import FAKE_KEYS, free_port
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import storage
from pipeline.io.caption_sources import shapes_captions
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage
from pipeline.stages.synthesize import SynthConfig, SynthStage

SECRET = FAKE_KEYS["AWS_SECRET_ACCESS_KEY"]


# ------------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _quiet_server():
    """No line per request from moto's web server (werkzeug) in the tests' output."""
    import logging

    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def upload(local: Path, uri: str) -> str:
    """Copy a local file or folder to `uri`; returns `uri`."""
    fs, path = storage.resolve(uri)
    if local.is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, pafs.LocalFileSystem(), fs)
    return uri


def manifest(out: str) -> dict:
    """The manifest of a stage output (local folder or URI)."""
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


def shas(out: str) -> list[str]:
    """The sha256 of every shard, in manifest order."""
    return [s["sha256"] for s in manifest(out)["shards"]]


def listing(uri: str) -> list[str]:
    """Every object below `uri` (relative names)."""
    fs, path = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """12 ShapesWorld captions with metadata as a Parquet caption file, and 5 more as JSONL, in one folder."""
    root = tmp_path_factory.mktemp("s3caps") / "caps"
    root.mkdir()
    recs = shapes_captions(17, seed=3)
    rows = [{"id": f"c{i:02d}", "caption": r.caption, "metadata": r.metadata} for i, r in enumerate(recs)]
    pq.write_table(pa.Table.from_pylist(rows[:12]), root / "a.parquet")
    (root / "b.jsonl").write_text(
        "".join(json.dumps({**r, "metadata": json.loads(r["metadata"])}) + "\n" for r in rows[12:])
    )
    return root


def synth(inputs: list[str], output: str, **kw) -> dict:
    """A quiet in-process synthesize run at 32 px, 4 captions per shard."""
    cfg = SynthConfig(inputs, output, **{"resolution": 32, "shard_size": 4, "workers": 0, "progress": False, **kw})
    return SynthStage.run(cfg)


@pytest.fixture(scope="module")
def local_run(captions, tmp_path_factory) -> str:
    """The reference: synthesize from and to the local disk."""
    out = str(tmp_path_factory.mktemp("s3ref") / "images")
    assert synth([str(captions)], out)["written"] == 17
    return out


# -------------------------------------------------------------------------------------------------- the tests


def test_synthesize_and_encode_read_and_write_s3_as_local(captions, local_run, s3_bucket, tmp_path):
    caps = upload(captions, f"{s3_bucket}/captions")
    # Captions read from s3:// (a folder, and a glob) give byte-identical tar shards, locally or on s3://.
    synth([caps], str(tmp_path / "from-s3"))
    synth([f"{caps}/*.parquet", f"{caps}/b.jsonl"], f"{s3_bucket}/images")
    assert shas(local_run) == shas(str(tmp_path / "from-s3")) == shas(f"{s3_bucket}/images")
    m = manifest(f"{s3_bucket}/images")
    assert m["complete"] and m["rows"] == 17 and m["config"]["output"] == f"{s3_bucket}/images"
    assert listing(f"{s3_bucket}/images")[:3] == ["manifest.json", "part-00000.done.json", "part-00000.rejects.parquet"]
    # Nothing secret in what the run wrote: keys and the endpoint stay in the environment.
    for name in ("manifest.json", "report.json"):
        text = storage.read_bytes(storage.join(f"{s3_bucket}/images", name)).decode()
        assert SECRET not in text and os.environ["AWS_ENDPOINT_URL"] not in text and "127.0.0.1" not in text
    # A rerun resumes: every shard kept (the unit digests stat the objects on s3://).
    assert synth([f"{caps}/*.parquet", f"{caps}/b.jsonl"], f"{s3_bucket}/images")["shards_skipped"] == 4
    # encode-latents reads the tar shards on s3:// (pixel VAE, MiniLM) and writes training shards to s3://.
    kw = dict(vae="pixel", text_encoder="minilm", resolution=32, workers=0, progress=False, batch_size=8)
    EncodeStage.run(EncodeConfig(inputs=[local_run], output=str(tmp_path / "latents"), **kw))
    report = EncodeStage.run(EncodeConfig(inputs=[f"{s3_bucket}/images"], output=f"{s3_bucket}/latents", **kw))
    assert report["written"] == 17 and report["rejected"] == 0
    local = pq.read_table(tmp_path / "latents" / "part-00000.parquet")
    remote = pq.read_table(storage.open_input(f"{s3_bucket}/latents/part-00000.parquet"))
    assert remote.equals(local)  # the same rows; the files differ only in the input paths their metadata digests
    # inspect reads a stage output on s3:// as it reads a local one.
    for stage in ("images", "latents"):
        result = CliRunner().invoke(app, ["inspect", f"{s3_bucket}/{stage}", "--out", str(tmp_path / f"{stage}.html")])
        assert result.exit_code == 0, result.output
        html = (tmp_path / f"{stage}.html").read_text()
        assert re.search(r'data-field="written"[^>]*data-count="17"', html), html[:2000]
        assert f"{s3_bucket}/{stage}" in html and SECRET not in html and "127.0.0.1" not in html
    # A changed input object is noticed (its size and modification time on the store): only its unit is redone.
    (tmp_path / "b.jsonl").write_text("".join((captions / "b.jsonl").read_text().splitlines(keepends=True)[:-1]))
    upload(tmp_path / "b.jsonl", f"{caps}/b.jsonl")
    report = synth([f"{caps}/*.parquet", f"{caps}/b.jsonl"], f"{s3_bucket}/images")
    assert (report["shards_skipped"], report["shards_run"], report["written"]) == (3, 1, 16)


def test_remote_model_folder_is_copied_once(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "enc"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"d_model": 8}')
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    uri = upload(src, f"{s3_bucket}/models/enc")
    copy = storage.local_copy(uri)
    assert Path(copy).name == "enc" and Path(copy, "sub", "w.bin").read_bytes() == b"\0" * 1000
    assert storage.local_copy(uri) == copy and storage.local_copy(str(src)) == str(src)  # reused; local unchanged
    only = storage.local_copy(uri, files=("config.json",))
    assert os.listdir(only) == ["config.json"] and only != copy
    upload(src / "config.json", f"{uri}/sub/more.json")
    assert storage.local_copy(uri) != copy  # the folder changed: a new copy
    assert not [n for n in os.listdir(tmp_path / "cache") if storage.TMP_MARK in n]
    with pytest.raises(FileNotFoundError, match=f"does not exist: {s3_bucket}/models/nope"):
        storage.local_copy(f"{s3_bucket}/models/nope")


def _one_error_line(result) -> str:
    """The single `error: ...` line a failed command printed on stderr (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _synth_args(inputs: list[str], output: str) -> list[str]:
    args = ["synthesize", "--output", output, "--teacher", "shapes", "--resolution", "32", "--shard-size", "4"]
    return [*args, *(a for i in inputs for a in ("--input", i)), "--workers", "0", "--quiet"]


def test_store_down_mid_stage_one_error_line_then_rerun_resumes(
    captions, local_run, s3_server, s3_bucket, monkeypatch, tmp_path
):
    out = f"{s3_bucket}/images"
    read = SynthStage.read

    def read_then_fail(self, unit):
        if unit.index == 2:  # shards 0 and 1 are published: the store goes away during shard 2
            s3_server.stop()
        yield from read(self, unit)

    monkeypatch.setattr(SynthStage, "read", read_then_fail)
    t0 = time.monotonic()
    try:
        result = CliRunner().invoke(app, _synth_args([str(captions)], out))
    finally:
        s3_server.start()
    line = _one_error_line(result)
    assert f"{out}/part-00002.tar" in line and "127.0.0.1" not in line and SECRET not in line
    assert time.monotonic() - t0 < 60  # the retries are bounded
    assert "part-00001.done.json" in listing(out) and "part-00002.done.json" not in listing(out)
    monkeypatch.setattr(SynthStage, "read", read)
    result = CliRunner().invoke(app, _synth_args([str(captions)], out))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["shards_skipped"], report["shards_run"], report["written"]) == (2, 2, 17)
    assert shas(out) == shas(local_run)  # nothing lost, nothing doubled
    assert not [n for n in listing(out) if storage.TMP_MARK in n]
    # Reading inputs from a store that goes away: an error (never rejects of the unread inputs), then a resume.
    from pipeline.stages.encode_latents import EncodeStage

    encode_read = EncodeStage.read

    def encode_then_fail(self, unit):
        if unit.index == 1:
            s3_server.stop()
        yield from encode_read(self, unit)

    monkeypatch.setattr(EncodeStage, "read", encode_then_fail)
    latents = tmp_path / "latents"
    args = [
        "encode-latents",
        "--input",
        out,
        "--output",
        str(latents),
        "--resolution",
        "32",
        "--workers",
        "0",
        "--quiet",
    ]
    try:
        line = _one_error_line(CliRunner().invoke(app, args))
    finally:
        s3_server.start()
    assert f"{out}/part-00001.tar" in line and "127.0.0.1" not in line, line
    assert not (latents / "part-00001.done.json").exists()
    monkeypatch.setattr(EncodeStage, "read", encode_read)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["shards_skipped"], report["written"], report["rejected"]) == (1, 17, 0)


@pytest.mark.parametrize("problem", ["missing output bucket", "missing input bucket", "bad keys", "no endpoint"])
def test_store_errors_stop_before_any_work(problem, captions, s3_bucket, monkeypatch):
    monkeypatch.setattr(SynthStage, "setup", lambda self: pytest.fail("a model was loaded"))
    inputs, out = [str(captions)], f"{s3_bucket}/images"
    if problem == "missing output bucket":
        out = "s3://no-such-bucket-lightgen/images"
    elif problem == "missing input bucket":
        inputs = ["s3://no-such-bucket-lightgen/captions"]
    elif problem == "bad keys":
        import moto.settings

        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks keys: ours are unknown
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    line = _one_error_line(CliRunner().invoke(app, _synth_args(inputs, out)))
    assert time.monotonic() - t0 < 60
    shown = inputs[0] if problem == "missing input bucket" else out
    assert shown in line and "127.0.0.1" not in line and SECRET not in line, line
    monkeypatch.undo()
    assert listing(s3_bucket) == []  # nothing written


@pytest.fixture
def s3_cluster(s3_server, monkeypatch):
    """A 2-node Ray cluster (1 CPU each) whose processes start without the AWS_* environment: the workers reach the
    store only through what the driver hands them."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.core import runtime

    env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    finally:
        os.environ.update(env)
    assert runtime.storage_env()["AWS_SECRET_ACCESS_KEY"] == SECRET
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")  # as each Ray worker of 1 CPU: the same float reductions
def test_synthesize_and_encode_on_a_2_node_cluster_to_s3(captions, local_run, s3_bucket, s3_cluster, tmp_path):
    from tiny_models import make_tiny_t5

    caps = upload(captions, f"{s3_bucket}/captions")
    # synthesize: 2 Ray workers on 2 nodes, captions from s3://, shards to s3://.
    report = synth([caps], f"{s3_bucket}/images", workers=2, ray_address=s3_cluster.address)
    assert report["written"] == 17 and shas(f"{s3_bucket}/images") == shas(local_run)
    # encode-latents: the text encoder is a folder on s3:// too (each node copies it once).
    t5 = upload(make_tiny_t5(tmp_path / "t5"), f"{s3_bucket}/models/t5")
    kw = dict(vae="pixel", text_encoder=t5, resolution=32, progress=False, batch_size=8, shard_size=4)
    EncodeStage.run(EncodeConfig(inputs=[f"{s3_bucket}/images"], output=str(tmp_path / "latents"), workers=0, **kw))
    cfg = EncodeConfig(inputs=[f"{s3_bucket}/images"], output=f"{s3_bucket}/latents", workers=2, **kw)
    cfg.ray_address = s3_cluster.address
    assert EncodeStage.run(cfg)["written"] == 17
    assert shas(f"{s3_bucket}/latents") == shas(str(tmp_path / "latents"))
    assert manifest(f"{s3_bucket}/latents")["config"]["text_encoder"] == t5


def test_build_dpo_pairs_with_images_model_and_output_on_s3(local_run, s3_bucket, tmp_path, monkeypatch):
    import torch
    from conftest import wake_head

    from lightgen_model import LightGen, preset, save_pretrained
    from pipeline.stages.dpo_pairs.pairs import PairsConfig, PairsStage

    monkeypatch.setenv("LIGHTGEN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = save_pretrained(wake_head(LightGen(preset("debug"))), tmp_path / "debug")
    remote_model = upload(Path(model), f"{s3_bucket}/models/debug")
    images = upload(Path(local_run), f"{s3_bucket}/images")
    kw = dict(judge_backend="shapes", steps=2, workers=0, batch_size=4, progress=False)
    PairsStage.run(PairsConfig([f"{local_run}/part-0000[01].tar"], str(tmp_path / "pairs"), model=str(model), **kw))
    cfg = PairsConfig([f"{images}/part-0000[01].tar"], f"{s3_bucket}/pairs", model=remote_model, **kw)
    report = PairsStage.run(cfg)
    assert report["written"] == 8 and report["judge"]["inputs"] == 8
    local = pq.read_table(tmp_path / "pairs" / "part-00000.parquet")
    remote = pq.read_table(storage.open_input(f"{s3_bucket}/pairs/part-00000.parquet"))
    # The same pairs, byte for byte: rows name the loser model by its weights' sha256, not by where it lives; the
    # manifest's config names the URI (never a local cache path).
    assert remote.equals(local)
    shas = lambda m: [e["sha256"] for e in m["shards"]]
    assert shas(manifest(f"{s3_bucket}/pairs")) == shas(json.loads((tmp_path / "pairs" / "manifest.json").read_text()))
    assert manifest(f"{s3_bucket}/pairs")["config"]["model"] == remote_model
    assert PairsStage.run(cfg)["shards_skipped"] == 2  # resumes on s3://
