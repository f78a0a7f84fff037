"""`synthesize` on the runner: tiny random Flux on the CPU, the shapes teacher end to end, seeds and sidecars,
post-filters and bad captions as rejects, Parquet row ranges, settings checks, the chain build-captions ->
synthesize -> encode-latents, and in-process vs Ray workers. Resume, kill and manifest mechanics are the runner's
and are tested with the runner."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import make_tiny_flux

import pipeline.stages.synthesize as synth
from pipeline.core.schema import moments_array
from pipeline.core.stage import Reject, WorkUnit
from pipeline.models.teachers import DiffusersTeacher, build_teacher
from pipeline.stages.captions.build import CaptionsConfig, CaptionsStage
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage
from pipeline.stages.synthesize import SynthConfig, SynthStage, image_seed, sample_key
from shapesworld.render import ShapesTeacher


def config(inputs: list, output: Path, **kw) -> SynthConfig:
    """A quiet in-process config at 32 px (the tests' defaults)."""
    return SynthConfig(
        [str(p) for p in inputs], str(output), **{"resolution": 32, "workers": 0, "progress": False, **kw}
    )


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


def rejects(out: Path) -> list[dict]:
    """The merged rejects of a run."""
    return pq.read_table(out / "rejects.parquet").to_pylist()


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return str(make_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux"))


@pytest.fixture(scope="module")
def shapes_captions(tmp_path_factory) -> Path:
    """24 ShapesWorld captions with metadata, as build-captions writes them."""
    out = tmp_path_factory.mktemp("caps") / "captions"
    CaptionsStage.run(CaptionsConfig([], str(out), n=24, shapes=40, embedder="hash", clusters=6, seed=1))
    return out


def test_seeds_and_keys_are_pinned():
    # The same captions must give the same images as earlier releases: the seed hash and the key rule are fixed.
    assert image_seed(0, "p2") == 1436085033 and image_seed(7, "c0123456789abcdef") == 1983982078
    assert image_seed(1, "p2") != image_seed(0, "p2") and sample_key("shapes/a.b c") == "shapes_a_b_c"


@pytest.mark.slow
def test_tiny_flux_through_synthesize_reproduces_images(tmp_path, flux_dir):
    captions = ["a red circle", "two blue squares", "a green star above a cross"]
    src = tmp_path / "caps.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": c, "id": f"p{i}"}) for i, c in enumerate(captions)))
    kw = dict(teacher="flux", model=flux_dir, field="prompt", steps=2, batch_size=2)
    report = SynthStage.run(config([src], tmp_path / "out", **kw))
    assert (report["written"], report["rejected"], report["images_this_run"]) == (3, 0, 3)
    samples = read_tars(tmp_path / "out")
    assert sorted(samples) == ["p0", "p1", "p2"]
    meta = samples["p2"]["json"]
    assert meta == {
        "id": "p2",
        "caption": captions[2],
        "teacher": "flux",
        "model": "tiny-flux",
        "seed": image_seed(0, "p2"),
        "steps": 2,
        "guidance": 3.5,
        "resolution": 32,
    }
    assert samples["p2"]["png"].shape == (32, 32, 3) and samples["p2"]["png"].std() > 2
    # The image is what FluxPipeline draws alone for this caption with the recorded seed: batching does not matter.
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32)
    alone = pipe(
        captions[2],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.5,
        output_type="np",
        generator=torch.Generator().manual_seed(meta["seed"]),
        max_sequence_length=512,
    ).images[0]
    assert np.abs(np.rint(alone * 255).astype(int) - samples["p2"]["png"].astype(int)).max() <= 1
    assert np.abs(samples["p0"]["png"].astype(int) - samples["p1"]["png"].astype(int)).mean() > 1  # seeds differ
    # The generic `diffusers` teacher loads the same directory through AutoPipelineForText2Image: same images.
    again = SynthStage.run(config([src], tmp_path / "auto", **{**kw, "teacher": "diffusers"}))
    assert again["written"] == 3
    auto = read_tars(tmp_path / "auto")
    assert all(np.array_equal(auto[k]["png"], samples[k]["png"]) for k in samples)


def test_teacher_loading_resolves_device_and_dtype(tmp_path, flux_dir):
    teacher = build_teacher("flux", model=flux_dir, device="auto", dtype="auto", resolution=32)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert teacher.device == expected and teacher.name == "tiny-flux"
    assert teacher.dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    assert teacher.pipe.transformer.dtype == teacher.dtype
    half = DiffusersTeacher(flux_dir, device="cpu", dtype="bfloat16", resolution=32)
    assert half.dtype == torch.bfloat16 and half.pipe.transformer.dtype == torch.bfloat16
    assert half.extra == {"max_sequence_length": 512}  # FluxPipeline takes a T5 length
    with pytest.raises(ValueError, match="not a local diffusers pipeline"):
        DiffusersTeacher(str(tmp_path))
    with pytest.raises(ValueError, match="unknown --teacher 'sdxl'"):
        build_teacher("sdxl", resolution=32)


def test_shapes_teacher_end_to_end(tmp_path, shapes_captions):
    out = tmp_path / "out"
    report = SynthStage.run(config([shapes_captions], out, shard_size=10))
    assert (report["inputs"], report["written"], report["shards"], report["images_this_run"]) == (24, 24, 3, 24)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_per_shard"] == [10, 10, 4]  # the caption shard's row ranges [0, 10), [10, 20), [20, 24)
    assert (manifest["format"], manifest["teacher"], manifest["teacher_model"], manifest["resolution"]) == (
        "lightgen-images",
        "shapes",
        "shapes",
        32,
    )
    rows = pq.read_table(shapes_captions / "part-00000.parquet").to_pylist()
    samples = read_tars(out)
    teacher = ShapesTeacher(32)
    for row in rows:
        s = samples[row["id"]]
        assert s["json"] == {
            "id": row["id"],
            "caption": row["caption"],
            "teacher": "shapes",
            "model": "shapes",
            "seed": image_seed(0, row["id"]),
            "steps": None,
            "guidance": None,
            "resolution": 32,
            "metadata": json.loads(row["metadata"]),
        }
        np.testing.assert_array_equal(s["png"], teacher(s["json"]["metadata"], image_seed(0, row["id"])))
    # Another --seed redraws every image.
    assert SynthStage.run(config([shapes_captions], tmp_path / "s1", seed=1))["written"] == 24
    other = read_tars(tmp_path / "s1")
    assert all(not np.array_equal(samples[k]["png"], other[k]["png"]) for k in samples)


class FakeTeacher:
    """Constant images for captions with 'blank', NSFW flags for captions with 'nsfw', noise otherwise."""

    name = "fake"

    def __call__(self, captions, metadata, seeds):
        rng = np.random.default_rng(0)
        imgs = [
            np.full((32, 32, 3), 128, np.uint8) if "blank" in c else rng.integers(0, 256, (32, 32, 3), np.uint8)
            for c in captions
        ]
        return np.stack(imgs), ["nsfw" in c for c in captions]


@pytest.fixture
def fake_teacher(tmp_path, monkeypatch) -> dict:
    """Settings for the fake teacher (in-process only): a 'flux' model directory that is never loaded."""
    monkeypatch.setattr(synth, "build_teacher", lambda *a, **k: FakeTeacher())
    (tmp_path / "fake-model").mkdir()
    (tmp_path / "fake-model" / "model_index.json").write_text("{}")
    return dict(teacher="flux", model=str(tmp_path / "fake-model"))


def test_post_filter_and_bad_captions_are_counted(tmp_path, fake_teacher):
    src = tmp_path / "c.jsonl"
    lines = ["a red circle", "a blank one", "an nsfw one", "", "a red circle", "a blue square"]
    tail = json.dumps({"x": 1}) + "\n{bad\n" + '{"caption": "a \\ud800 surrogate"}\n'
    src.write_text("\n".join(json.dumps({"caption": c}) for c in lines) + "\n" + tail)
    report = SynthStage.run(config([src], tmp_path / "out", **fake_teacher, batch_size=2))
    expected = {"blank_image": 1, "nsfw": 1, "empty_caption": 1, "duplicate_id": 1, "missing_field": 1, "bad_json": 1}
    assert report["rejected_by_reason"] == {**expected, "bad_caption_encoding": 1}
    assert (report["inputs"], report["written"], report["rejected"]) == (9, 2, 7)
    samples = read_tars(tmp_path / "out")
    assert {s["json"]["caption"] for s in samples.values()} == {"a red circle", "a blue square"}
    assert all(s["json"]["model"] == "fake" and s["json"]["steps"] == 28 for s in samples.values())
    got = {r["reason"]: (r["source"], r["detail"]) for r in rejects(tmp_path / "out")}
    assert got["duplicate_id"] == ("c.jsonl:5", "a red circle") and got["empty_caption"] == ("c.jsonl:4", "")
    assert got["blank_image"] == ("c.jsonl:2", "pixel std 0.00 < 2") and got["nsfw"][0] == "c.jsonl:3"
    assert got["missing_field"][0] == "c.jsonl:7" and got["bad_json"][0] == "c.jsonl:8"
    off = SynthStage.run(config([src], tmp_path / "off", **fake_teacher, post_filter="none"))
    assert off["written"] == 4 and off["inputs"] == 9 and "blank_image" not in off["rejected_by_reason"]


def write_captions_parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> Path:
    """A caption Parquet file (id, caption, metadata) in small row groups."""
    schema = pa.schema([("id", pa.string()), ("caption", pa.string()), ("metadata", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def test_parquet_row_ranges_and_unit_rejects(tmp_path, fake_teacher):
    meta = json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}]})
    rows = [{"id": f"r{i}", "caption": f"caption {i}", "metadata": meta} for i in range(10)]
    rows[5]["id"] = rows[6]["id"] = "dup"  # within the unit [4, 9)
    rows[7]["caption"], rows[8]["metadata"] = None, None
    rows[2]["id"] = "dup"  # in another unit: not seen by [4, 9)
    path = write_captions_parquet(tmp_path / "caps.parquet", rows)
    stage = SynthStage(config([path], tmp_path / "o", teacher="shapes"))
    got = list(stage.read(WorkUnit(0, "parquet", (str(path),), 4, 9, str(tmp_path))))
    assert [g["id"] for g in got if not isinstance(g, Reject)] == ["r4", "dup"]
    sources = [g.source if isinstance(g, Reject) else g["source"] for g in got]
    assert sources == [f"caps.parquet:{i}" for i in range(4, 9)]  # row groups 1-2, sliced
    assert [(g.reason, g.id) for g in got if isinstance(g, Reject)] == [
        ("duplicate_id", "dup"),
        ("missing_field", "r7"),
        ("missing_metadata", "r8"),
    ]
    gone = list(stage.read(WorkUnit(1, "parquet", (str(tmp_path / "gone.parquet"),), 3, 6, str(tmp_path))))
    assert [(r.id, r.reason) for r in gone] == [(f"gone.parquet:{i}", "unreadable") for i in (3, 4, 5)]
    # End to end with --shard-size 4: units [0, 4), [4, 8), [8, 10); counts add up per shard and in total.
    report = SynthStage.run(config([path], tmp_path / "out", **fake_teacher, shard_size=4))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["rows"], s["rejected"]) for s in manifest["shards"]] == [(4, 0), (2, 2), (2, 0)]
    assert (report["inputs"], report["written"], report["rejected_by_reason"]) == (
        10,
        8,
        {"duplicate_id": 1, "missing_field": 1},
    )
    assert sorted(read_tars(tmp_path / "out")) == ["dup", "r0", "r1", "r3", "r4", "r8", "r9"]  # "dup" twice, 2 units


def test_settings_are_checked_up_front(tmp_path, shapes_captions):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"caption": "a red circle"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "c.csv").write_text("text,id\na red circle,1\n")
    no_meta = write_captions_parquet(tmp_path / "nometa.parquet", [{"id": "a", "caption": "x", "metadata": None}])
    pq.write_table(pq.read_table(no_meta).drop(["metadata"]), no_meta)
    for inputs, kw, message in [
        ([tmp_path / "missing.parquet"], {}, "does not exist: .*missing.parquet"),
        ([shapes_captions], {"teacher": "sdxl"}, "unknown --teacher 'sdxl'"),
        ([shapes_captions], {"field": "prompt"}, "unknown --field 'prompt'"),
        ([tmp_path / "c.csv"], {"field": "caption"}, "unknown --field 'caption'"),
        ([plain], {"field": "prompt"}, "unknown --field 'prompt'"),  # JSONL: found when the unit is read
        ([no_meta], {}, "--teacher shapes needs ShapesWorld captions with metadata"),
        ([tmp_path / "empty.jsonl"], {}, "no captions in inputs"),
        ([plain], {"teacher": "flux"}, "--teacher flux needs --model DIR"),
        ([plain], {"teacher": "flux", "model": str(tmp_path)}, "not a local diffusers pipeline"),
        ([plain], {"post_filter": "aesthetic"}, "unknown --post-filter 'aesthetic'"),
        ([shapes_captions], {"resolution": 16}, r"--resolution 16 outside \[32, 1024\]"),
        ([shapes_captions], {"dtype": "float64"}, "unknown --dtype 'float64'"),
        ([shapes_captions], {"steps": 0}, "--steps must be >= 1"),
        ([shapes_captions], {"batch_size": 0}, "--batch-size must be >= 1"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            SynthStage.run(config(inputs, tmp_path / "o", **kw, overwrite=True))


def test_resume_depends_on_the_image_settings_only(tmp_path, shapes_captions):
    out = tmp_path / "out"
    first = SynthStage.run(config([shapes_captions], out, shard_size=12))
    before = read_tars(out)
    # The device does not name the images: a rerun on another device keeps every shard.
    again = SynthStage.run(config([shapes_captions], out, shard_size=12, device="cpu"))
    assert (again["shards_skipped"], again["written"], again["images_this_run"]) == (2, 24, 0)
    with pytest.raises(ValueError, match="other settings"):  # another seed draws other images
        SynthStage.run(config([shapes_captions], out, shard_size=12, seed=3))
    redo = SynthStage.run(config([shapes_captions], out, shard_size=12, seed=3, overwrite=True))
    assert (first["shards_skipped"], redo["shards_skipped"], redo["images_this_run"]) == (0, 0, 24)
    assert all(not np.array_equal(before[k]["png"], s["png"]) for k, s in read_tars(out).items())


@pytest.mark.slow
def test_chain_build_captions_synthesize_encode_latents(tmp_path):
    caps, imgs, lat = tmp_path / "caps", tmp_path / "imgs", tmp_path / "lat"
    CaptionsStage.run(CaptionsConfig([], str(caps), n=30, shapes=80, embedder="hash", clusters=8))
    assert SynthStage.run(config([caps], imgs, shard_size=16))["written"] == 30
    report = EncodeStage.run(EncodeConfig([str(imgs)], str(lat), resolution=32, workers=0, shard_size=16))
    assert (report["inputs"], report["written"], report["rejected"]) == (30, 30, 0)
    t = pq.read_table(lat / "part-00000.parquet")
    samples = read_tars(imgs)
    for i, rid in enumerate(t.column("id").to_pylist()[:5]):
        key = rid.rsplit("/", 1)[-1]
        assert t.column("caption")[i].as_py() == samples[key]["json"]["caption"]
        pixels = samples[key]["png"].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(moments_array(t)[i, :3], pixels.astype(np.float16))


@pytest.mark.slow
def test_ray_worker_gives_the_same_samples(tmp_path, shapes_captions):
    import ray

    from pipeline.core import runtime

    extra = tmp_path / "extra.jsonl"  # rejects too: no metadata, empty caption
    extra.write_text(json.dumps({"caption": "no metadata"}) + "\n" + json.dumps({"caption": " "}) + "\n")
    runtime.init_ray(None, num_cpus=2)
    try:
        reports = [SynthStage.run(config([shapes_captions, extra], tmp_path / f"w{w}", workers=w)) for w in (0, 1)]
    finally:
        ray.shutdown()
    assert [(r["written"], r["rejected"], r["shards"]) for r in reports] == [(24, 2, 2)] * 2
    a, b = read_tars(tmp_path / "w0"), read_tars(tmp_path / "w1")
    assert sorted(a) == sorted(b) and len(a) == 24
    for key in a:
        assert a[key]["json"] == b[key]["json"] and np.array_equal(a[key]["png"], b[key]["png"])
    assert rejects(tmp_path / "w0") == rejects(tmp_path / "w1")
