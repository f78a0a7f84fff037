"""The ShapesWorld chain with every folder on object storage, as a user whose nodes share only an object store runs
it: captions -> synthesize -> encode-latents -> pretrain (2 processes) -> build-dpo-pairs -> dpo, all on `s3://`
(moto's S3 server on 127.0.0.1), `--workers 0`. It must write the shards a local run writes, byte for byte, and
train the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from train_utils import run_torchrun
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import storage

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("captions", "images", "latents", "pairs", "pairs/judgements")
TRAIN = [
    "log.sample_count=0",
    "log.progress=false",
    "log.tensorboard=false",
    "train.threads=1",
    "train.budget_minutes=null",
    "data.batch_size=8",
]


def stage(*args: str) -> None:
    """One `lightgen-data` command, in this process, without Ray (quiet where it has a progress bar)."""
    quiet = [] if args[0] == "build-captions" else ["--quiet"]
    res = CliRunner().invoke(app, [*args, "--workers", "0", *quiet])
    assert res.exit_code == 0, res.output


def torchrun(script: str, *overrides: str) -> None:
    """A 2-process run of a trainer, as the README starts it."""
    res = run_torchrun(ROOT / "training" / script, *overrides, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def publish_model(local: Path, dest: str) -> str:
    """Copy a trained model folder to `dest` (what `aws s3 cp --recursive` does for a user); returns `dest`."""
    fs, path = storage.resolve(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, pafs.LocalFileSystem(), fs)
    return dest


def chain(root: str, work: Path) -> dict[str, object]:
    """Every stage with its folders under `root` (a local folder or an `s3://` URI); checkpoints in `work`."""
    at = lambda name: storage.join(root, name)
    stage("build-captions", "--shapes", "120", "--n", "48", "--embedder", "hash", "--output", at("captions"))
    stage(
        "synthesize",
        "--input",
        at("captions"),
        "--output",
        at("images"),
        "--teacher",
        "shapes",
        "--resolution",
        "32",
        "--shard-size",
        "16",
    )
    stage("encode-latents", "--input", at("images"), "--output", at("latents"), "--resolution", "32")
    torchrun(
        "pretrain.py",
        "--config",
        str(ROOT / "conf/shapes.yaml"),
        f"data.shards=[{at('latents')}]",
        f"train.out_dir={work / 'pretrain'}",
        "train.max_steps=3",
        *TRAIN,
    )
    model = publish_model(work / "pretrain" / "model", at("models/pretrain"))
    stage(
        "build-dpo-pairs",
        "--input",
        at("images/part-00000.tar"),
        "--output",
        at("pairs"),
        "--model",
        model,
        "--judge-backend",
        "shapes",
        "--steps",
        "2",
        "--batch-size",
        "8",
    )
    torchrun(
        "dpo.py",
        "--config",
        str(ROOT / "conf/dpo_shapes.yaml"),
        f"model.init_from={model}",
        f"dpo.pairs=[{at('pairs')}]",
        f"train.out_dir={work / 'dpo'}",
        "train.max_steps=2",
        *TRAIN,
    )
    out: dict[str, object] = {}
    for name in STAGES:
        manifest = json.loads(storage.read_bytes(storage.join(at(name), "manifest.json")))
        assert manifest["complete"] and manifest["rows"] >= 1, name
        out[name] = [(s["name"], s["rows"], s["sha256"]) for s in manifest["shards"]]
    for run in ("pretrain", "dpo"):
        out[run] = (work / run / "model" / "model.safetensors").read_bytes()
    return out


@pytest.mark.slow
def test_the_shapes_chain_on_s3_writes_and_trains_what_the_local_chain_does(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("LIGHTGEN_CACHE", str(tmp_path / "cache"))  # where remote model folders are copied
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    local = chain(str(tmp_path / "local"), tmp_path / "local-runs")
    remote = chain(f"{s3_bucket}/lightgen", tmp_path / "s3-runs")
    for name in STAGES:
        assert remote[name] == local[name], name  # the same shards, byte for byte (sha256 in the manifests)
    assert remote["pretrain"] == local["pretrain"]  # the same trained weights, to the bit
    assert remote["dpo"] == local["dpo"]
    # no URI was taken for a local path (that would have made an `s3:` folder here); the model came from the store
    assert list(cwd.iterdir()) == [] and any((tmp_path / "cache").iterdir())
