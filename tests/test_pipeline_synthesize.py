"""`synthesize`: tiny random Flux on the CPU, the shapes teacher end to end, post-filter, kill + resume, the chain
build-captions -> synthesize -> encode-latents, CLI errors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import make_tiny_flux
from typer.testing import CliRunner

import pipeline.synthesize as synth
from pipeline.captions import CaptionsConfig, run_build_captions
from pipeline.cli import app
from pipeline.encode import EncodeConfig, run_encode_latents
from pipeline.schema import moments_array
from pipeline.synthesize import SynthConfig, image_seed, run_synthesize
from shapesworld.render import ShapesTeacher

REPO = Path(__file__).resolve().parents[1]


def read_tars(out: Path) -> dict[str, dict]:
    """{key: {"png": (H, W, 3) uint8, "json": dict}} of all tar shards in the manifest, read with plain tarfile."""
    samples: dict[str, dict] = {}
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                value = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if ext == "png" else json.loads(data)
                samples.setdefault(key, {})[ext] = value
    return samples


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return str(make_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux"))


@pytest.fixture(scope="module")
def shapes_captions(tmp_path_factory) -> Path:
    """24 ShapesWorld captions with metadata, as build-captions writes them."""
    out = tmp_path_factory.mktemp("caps") / "captions"
    run_build_captions(CaptionsConfig([], str(out), n=24, shapes=40, embedder="hash", clusters=6, seed=1))
    return out


@pytest.mark.slow
def test_tiny_flux_through_synthesize_reproduces_images(tmp_path, flux_dir):
    captions = ["a red circle", "two blue squares", "a green star above a cross"]
    src = tmp_path / "caps.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": c, "id": f"p{i}"}) for i, c in enumerate(captions)))
    kw = dict(teacher="flux", model=flux_dir, field="prompt", steps=2, resolution=32, batch_size=2, workers=0)
    report = run_synthesize(SynthConfig([str(src)], str(tmp_path / "out"), **kw))
    assert (report["written"], report["rejected"]) == (3, 0)
    samples = read_tars(tmp_path / "out")
    assert sorted(samples) == ["p0", "p1", "p2"]
    meta = samples["p2"]["json"]
    assert meta == {"id": "p2", "caption": captions[2], "teacher": "flux", "model": "tiny-flux",
                    "seed": image_seed(0, "p2"), "steps": 2, "guidance": 3.5, "resolution": 32}  # fmt: skip
    assert samples["p2"]["png"].shape == (32, 32, 3) and samples["p2"]["png"].std() > 2
    # The image is what FluxPipeline draws alone for this caption with the recorded seed: batching does not matter.
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32)
    alone = pipe(captions[2], height=32, width=32, num_inference_steps=2, guidance_scale=3.5, output_type="np",
                 generator=torch.Generator().manual_seed(meta["seed"]), max_sequence_length=512).images[0]  # fmt: skip
    assert np.abs(np.rint(alone * 255).astype(int) - samples["p2"]["png"].astype(int)).max() <= 1
    assert np.abs(samples["p0"]["png"].astype(int) - samples["p1"]["png"].astype(int)).mean() > 1  # seeds differ
    # The generic `diffusers` teacher loads the same directory through AutoPipelineForText2Image: same images.
    again = run_synthesize(SynthConfig([str(src)], str(tmp_path / "auto"), **{**kw, "teacher": "diffusers"}))
    assert again["written"] == 3
    auto = read_tars(tmp_path / "auto")
    assert all(np.array_equal(auto[k]["png"], samples[k]["png"]) for k in samples)


def test_shapes_teacher_end_to_end(tmp_path, shapes_captions):
    out = tmp_path / "out"
    report = run_synthesize(SynthConfig([str(shapes_captions)], str(out), resolution=32, workers=0, shard_size=10))
    assert (report["inputs"], report["written"], report["shards"]) == (24, 24, 3)
    rows = pq.read_table(shapes_captions / "part-00000.parquet").to_pylist()
    samples = read_tars(out)
    teacher = ShapesTeacher(32)
    for row in rows:
        s = samples[row["id"]]
        assert s["json"]["metadata"] == json.loads(row["metadata"]) and s["json"]["caption"] == row["caption"]
        assert s["json"]["steps"] is None and s["json"]["teacher"] == "shapes"
        np.testing.assert_array_equal(s["png"], teacher(s["json"]["metadata"], image_seed(0, row["id"])))
    # Another --seed redraws every image; the same seed reproduces the shard bytes.
    other = run_synthesize(SynthConfig([str(shapes_captions)], str(tmp_path / "s1"), resolution=32, workers=0, seed=1))
    assert other["written"] == 24
    a, b = read_tars(out), read_tars(tmp_path / "s1")
    assert all(not np.array_equal(a[k]["png"], b[k]["png"]) for k in a)


class FakeTeacher:
    """Constant images for captions with 'blank', NSFW flags for captions with 'nsfw', noise otherwise."""

    name = "fake"

    def __call__(self, captions, metadata, seeds):
        rng = np.random.default_rng(0)
        imgs = [np.full((32, 32, 3), 128, np.uint8) if "blank" in c else rng.integers(0, 256, (32, 32, 3), np.uint8)
                for c in captions]  # fmt: skip
        return np.stack(imgs), ["nsfw" in c for c in captions]


def test_post_filter_and_bad_captions_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "build_teacher", lambda *a, **k: FakeTeacher())
    src = tmp_path / "c.jsonl"
    lines = ["a red circle", "a blank one", "an nsfw one", "", "a red circle", "a blue square"]
    src.write_text("\n".join(json.dumps({"caption": c}) for c in lines) + "\n" + json.dumps({"x": 1}) + "\n")
    cfg = dict(teacher="flux", model=str(tmp_path), resolution=32, workers=0, shard_size=3)
    monkeypatch.setattr(synth, "validate", lambda c: None)  # no model directory for the fake teacher
    report = run_synthesize(SynthConfig([str(src)], str(tmp_path / "out"), **cfg))
    expected = {"blank_image": 1, "nsfw": 1, "empty_caption": 1, "duplicate_id": 1, "missing_field": 1}
    assert report["rejected_by_reason"] == expected
    assert (report["inputs"], report["written"], report["rejected"]) == (7, 2, 5)
    assert {s["json"]["caption"] for s in read_tars(tmp_path / "out").values()} == {"a red circle", "a blue square"}
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["source"] for r in rej if r["reason"] == "duplicate_id"] == ["c.jsonl:5"]
    off = run_synthesize(SynthConfig([str(src)], str(tmp_path / "off"), **cfg, post_filter="none"))
    assert off["written"] == 4 and "blank_image" not in off["rejected_by_reason"]


KILLED_RUN = """
import sys, time
from pipeline import shards
from pipeline.synthesize import SynthConfig, run_synthesize

add = shards.TarShardWriter.add
def slow_add(self, key, members):  # slow enough for the parent to kill us between and inside shards
    add(self, key, members)
    time.sleep(0.15)
shards.TarShardWriter.add = slow_add
run_synthesize(SynthConfig([sys.argv[1]], sys.argv[2], resolution=32, workers=0, shard_size=3, batch_size=1))
"""


@pytest.mark.slow
def test_kill_and_resume_gives_exactly_the_expected_samples(tmp_path, shapes_captions):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(shapes_captions), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while len(list(out.glob("part-*[0-9].tar"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("part-*[0-9].tar"))
    assert 3 <= len(finished) < 8 and not json.loads((out / "manifest.json").read_text())["complete"]
    report = run_synthesize(SynthConfig([str(shapes_captions)], str(out), resolution=32, workers=0, shard_size=3))
    assert report["shards_skipped"] == len(finished) and report["written"] == 24
    assert report["images_this_run"] == 24 - 3 * len(finished)
    clean = tmp_path / "clean"
    run_synthesize(SynthConfig([str(shapes_captions)], str(clean), resolution=32, workers=0, shard_size=3))
    names = [s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert names == [f"part-{i:05d}.tar" for i in range(8)] and not list(out.glob("*.tmp-*"))
    for name in names:  # byte-identical to an uninterrupted run: no duplicate, no loss, same images
        assert (out / name).read_bytes() == (clean / name).read_bytes()


@pytest.mark.slow
def test_chain_build_captions_synthesize_encode_latents(tmp_path):
    caps, imgs, lat = tmp_path / "caps", tmp_path / "imgs", tmp_path / "lat"
    run_build_captions(CaptionsConfig([], str(caps), n=30, shapes=80, embedder="minilm", clusters=8))
    assert run_synthesize(SynthConfig([str(caps)], str(imgs), resolution=32, workers=0, shard_size=16))["written"] == 30
    report = run_encode_latents(EncodeConfig([str(imgs)], str(lat), resolution=32, workers=0, shard_size=16))
    assert (report["inputs"], report["written"], report["rejected"]) == (30, 30, 0)
    t = pq.read_table(lat / "part-00000.parquet")
    samples = read_tars(imgs)
    for i, rid in enumerate(t.column("id").to_pylist()[:5]):
        key = rid.rsplit("/", 1)[-1]
        assert t.column("caption")[i].as_py() == samples[key]["json"]["caption"]
        pixels = samples[key]["png"].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(moments_array(t)[i, :3], pixels.astype(np.float16))


runner = CliRunner()


def test_cli_synthesize_and_errors(tmp_path, shapes_captions):
    out = tmp_path / "out"
    args = ["synthesize", "--input", str(shapes_captions), "--output", str(out), "--resolution", "32"]
    result = runner.invoke(app, [*args, "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.search(r"synthesize: 24 images in [\d.]+ s \([\d.]+ images/s\)", result.output)
    assert json.loads(result.output.strip().splitlines()[-1])["written"] == 24
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"caption": "a red circle"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    for bad, message in [
        (["--input", str(tmp_path / "missing.parquet")], "does not exist: .*missing.parquet"),
        (["--input", str(shapes_captions), "--teacher", "sdxl"], "unknown --teacher 'sdxl'"),
        (["--input", str(shapes_captions), "--field", "prompt"], "unknown --field 'prompt'"),
        (["--input", str(plain)], "--teacher shapes needs ShapesWorld captions with metadata"),
        (["--input", str(tmp_path / "empty.jsonl")], "no captions in inputs"),
        (["--input", str(plain), "--teacher", "flux"], "--teacher flux needs --model DIR"),
        (["--input", str(plain), "--teacher", "flux", "--model", str(tmp_path)], "not a local diffusers pipeline"),
        (["--input", str(plain), "--post-filter", "aesthetic"], "unknown --post-filter 'aesthetic'"),
        (["--input", str(shapes_captions), "--resolution", "16"], "--resolution 16 outside \\[32, 1024\\]"),
    ]:
        result = runner.invoke(app, ["synthesize", *bad, "--output", str(tmp_path / "o"), "--workers", "0"])
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1, result.output
    help_text = runner.invoke(app, ["synthesize", "--help"], terminal_width=200).output
    for option in ["--input", "--output", "--teacher", "--model", "--field", "--steps", "--guidance", "--resolution",
                   "--batch-size", "--shard-size", "--workers", "--gpus-per-worker", "--device", "--dtype", "--seed",
                   "--overwrite", "--post-filter", "--ray-address"]:  # fmt: skip
        assert option in help_text
    assert "[default: shapes]" in help_text and "[default: 3.5]" in help_text


@pytest.mark.slow
def test_ray_worker_gives_the_same_shards(tmp_path, shapes_captions):
    import ray

    from pipeline import runtime

    runtime.init_ray(None, num_cpus=2)
    try:
        for workers in (0, 1):
            cfg = SynthConfig([str(shapes_captions)], str(tmp_path / f"w{workers}"), resolution=32, workers=workers)
            assert run_synthesize(cfg)["written"] == 24
    finally:
        ray.shutdown()
    assert (tmp_path / "w1" / "part-00000.tar").read_bytes() == (tmp_path / "w0" / "part-00000.tar").read_bytes()
