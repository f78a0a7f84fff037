"""`build-dpo-pairs`: pair-shard contract, the ShapesWorld chain through the CLI with the shapes judge and a saved
`debug` model (counts, seeds, resume), mixed Parquet / tar / folder sources with aesthetic filtering and a stubbed
Qwen judge, the random tiny Qwen through the stage, CLI errors, Ray."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import make_tiny_bert, make_tiny_qwen25vl, write_tar
from typer.testing import CliRunner

from lightgen_model import LightGen, encoders, from_pretrained, generate, preset, save_pretrained
from pipeline import shards
from pipeline.captions import CaptionsConfig, run_build_captions
from pipeline.cli import app
from pipeline.dpo_pairs import PairsConfig, PairShardWriter, loser_seed, run_build_dpo_pairs
from pipeline.images import center_crop_resize, decode_image
from pipeline.judge import TransformersJudge
from pipeline.schema import (
    PAIR_FORMAT,
    PAIR_MOMENTS_COLUMNS,
    PAIR_SCHEMA,
    PAIR_SCHEMA_VERSION,
    IncompatibleShardsError,
    moments_array,
    pair_shards,
    text_arrays,
    training_shards,
)
from pipeline.synthesize import SynthConfig, run_synthesize
from shapesworld.render import ShapesTeacher
from shapesworld.world import enumerate_scenes, mirror_relation

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
QUANT = 1.0 / 127.5 + 1e-3  # one uint8 step in [-1, 1] units (thread counts may move a rounding by one step)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two cores are shared with other jobs: more torch threads only add contention to these tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A random RGB PNG of size (w, h)."""
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def read_rows(out: Path) -> pa.Table:
    """All pair shards of a run, in manifest order, with plain pyarrow."""
    manifest = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])


def rejects(out: Path) -> dict[str, tuple[str, str]]:
    """{id: (reason, detail)} of a run's merged rejects file."""
    return {r["id"]: (r["reason"], r["detail"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}


@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory) -> Path:
    """10 ShapesWorld teacher renders at 32 px (build-captions --shapes -> synthesize --teacher shapes)."""
    root = tmp_path_factory.mktemp("shapes")
    run_build_captions(CaptionsConfig([], str(root / "caps"), n=10, shapes=40, embedder="hash", clusters=4, seed=3))
    report = run_synthesize(SynthConfig([str(root / "caps")], str(root / "imgs"), resolution=32, workers=0))
    assert report["written"] == 10
    return root / "imgs"


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory) -> str:
    """The `debug` preset (pixel tokens, MiniLM text), random weights, saved with save_pretrained."""
    torch.manual_seed(0)
    return str(save_pretrained(LightGen(preset("debug")), tmp_path_factory.mktemp("ckpt") / "debug"))


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory) -> str:
    """The `debug` preset reading a tiny local BERT (32-dim states) named in its config: a fast text encoder."""
    root = tmp_path_factory.mktemp("bert")
    bert = make_tiny_bert(root / "tiny-bert")
    torch.manual_seed(1)
    model = LightGen(preset("debug", text_dim=32, text_encoder=str(bert), max_text_len=16))
    return str(save_pretrained(model, root / "debug-bert"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return str(make_tiny_qwen25vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen25vl"))


# ------------------------------------------------------------------------------------------- the contract


def fake_pairs(n: int, shape=(6, 4, 4), dim: int = 8, seed: int = 0) -> tuple[pa.Table, dict]:
    """A pair table of `n` random rows and its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {c: rng.standard_normal((n, *shape)).astype(np.float16) for c in PAIR_MOMENTS_COLUMNS}
    texts = [rng.standard_normal((int(k), dim)).astype(np.float16) for k in rng.integers(1, 6, n)]
    flat = lambda xs: pa.array([x.reshape(-1) for x in xs], pa.large_list(pa.float16()))
    columns = {
        "id": [f"r{i}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)], "resolution": [32] * n,
        "moments_shape": [list(shape)] * n, **{c: flat(a) for c, a in arrays.items()},
        "text_len": [t.shape[0] for t in texts], "text_emb": flat(texts), "vae": ["pixel"] * n,
        "text_encoder": ["minilm"] * n, "judge": ["shapes"] * n, "judge_answer": ["Score: 10"] * n,
        "judge_score": [1.0] * n, "loser_model": ["/m@abc"] * n, "loser_seed": list(range(n)),
        "sampling": ['{"steps": 4}'] * n,
    }  # fmt: skip
    return pa.table(columns, schema=PAIR_SCHEMA), {**arrays, "text": texts}


def test_pair_shard_roundtrip_and_validator(tmp_path):
    table, arrays = fake_pairs(5)
    with PairShardWriter(tmp_path, 0, {"format": PAIR_FORMAT}) as writer:
        writer.write(table.slice(0, 3))
        writer.write(table.slice(3))
        result = writer.commit(shards.rejects_table([]))
    header = {"format": PAIR_FORMAT, "schema_version": PAIR_SCHEMA_VERSION, "vae": "pixel", "text_encoder": "minilm"}
    manifest = shards.ManifestWriter(tmp_path, header)
    manifest.add(result)
    with pytest.raises(IncompatibleShardsError, match="not finished \\(rerun build-dpo-pairs"):
        pair_shards(tmp_path)
    manifest.write(complete=True)
    got, paths = pair_shards(tmp_path, vae="pixel", text_encoder="minilm")
    assert got["rows"] == 5 and [p.name for p in paths] == ["part-00000.parquet"]
    back = pq.read_table(paths[0])
    assert back.schema.equals(PAIR_SCHEMA) and back.equals(table)
    for column in PAIR_MOMENTS_COLUMNS:
        np.testing.assert_array_equal(moments_array(back, column), arrays[column])
    assert all(np.array_equal(a, b) for a, b in zip(text_arrays(back), arrays["text"], strict=True))
    encodings = pq.ParquetFile(paths[0]).metadata.row_group(0).column(4).encodings
    assert "BYTE_STREAM_SPLIT" in encodings  # winner_moments' float16 values
    with pytest.raises(IncompatibleShardsError, match="vae 'pixel' != expected 'sd35'"):
        pair_shards(tmp_path, vae="sd35")
    with pytest.raises(IncompatibleShardsError, match="format 'lightgen-dpo-pairs', expected 'lightgen-latents'"):
        training_shards(tmp_path)
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(IncompatibleShardsError, match="missing"):
        pair_shards(tmp_path)
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"format": "lightgen-latents"}))
    with pytest.raises(IncompatibleShardsError, match="expected 'lightgen-dpo-pairs'"):
        pair_shards(latents)
    with pytest.raises(FileNotFoundError, match="not a DPO pair-shard directory"):
        pair_shards(tmp_path / "nowhere")


def test_schema_module_needs_only_pyarrow_and_numpy():
    code = "import sys; sys.modules['torch'] = sys.modules['PIL'] = None; from pipeline.schema import pair_shards"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------- ShapesWorld, end to end


def shapes_extras(path: Path) -> dict[str, str]:
    """A tar of bad ShapesWorld samples -> {id: expected reject reason}."""
    teacher = ShapesTeacher(32)
    single = enumerate_scenes("colors")[0]
    pos = enumerate_scenes("position")[5]
    js = lambda caption, meta=None: json.dumps({"caption": caption, **({"metadata": meta} if meta else {})}).encode()
    write_tar(
        path,
        [
            ("noise.png", noise_png(1, (32, 32))), ("noise.json", js(single["prompt"], single)),
            ("mirror.png", png_bytes(teacher(mirror_relation(pos), 7))), ("mirror.json", js(pos["prompt"], pos)),
            ("nometa.png", png_bytes(teacher(single, 1))), ("nometa.json", js(single["prompt"])),
            ("broken.png", b"not an image at all"), ("broken.json", js(single["prompt"], single)),
            ("badmeta.png", png_bytes(teacher(single, 2))), ("badmeta.json", js("x", {"tag": "bogus", "include": []})),
        ],
    )  # fmt: skip
    reasons = ("judge_rejected", "judge_rejected", "missing_metadata", "undecodable", "bad_metadata")
    return {f"extra/{k}": r for k, r in zip(("noise", "mirror", "nometa", "broken", "badmeta"), reasons, strict=True)}


def teacher_pixels(images: Path) -> dict[str, np.ndarray]:
    """{sample key: (32, 32, 3) uint8} of synthesize's tar shards."""
    out = {}
    for tar in sorted(images.glob("part-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".png"):
                    out[m.name[:-4]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    return out


def test_cli_shapes_end_to_end_counts_seeds_and_resume(tmp_path, shapes_images, debug_ckpt):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(shapes_images, src / "imgs")
    expected = shapes_extras(src / "extra.tar")
    out = tmp_path / "pairs"
    args = ["build-dpo-pairs", "--input", str(src / "imgs"), "--input", str(src / "extra.tar"), "--output", str(out)]
    args += ["--model", debug_ckpt, "--judge-backend", "shapes", "--steps", "3", "--workers", "0", "--quiet"]
    args += ["--shard-size", "4", "--batch-size", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"build-dpo-pairs: 10 pairs of 15 inputs \(5 rejected\), 10 made in [\d.]+ s", result.output)
    report = json.loads(result.output.strip().splitlines()[-1])
    assert (report["inputs"], report["written"], report["rejected"], report["shards"]) == (15, 10, 5, 4)
    assert report["rejected_by_reason"] == {"bad_metadata": 1, "judge_rejected": 2, "missing_metadata": 1,
                                            "undecodable": 1}  # fmt: skip
    rej = rejects(out)
    assert {k: v[0] for k, v in rej.items()} == expected
    assert rej["extra/noise"][1].startswith("score 0 < --min-judge-score 0.8; answer: Score: 0\n")
    assert "expected" in rej["extra/mirror"][1]  # the scorer's reason: the relation is mirrored
    # The contract: a validated pair directory, names of encoders, judge, model, sampling.
    manifest, paths = pair_shards(out, vae="pixel", text_encoder="minilm")
    assert manifest["judge"] == "shapes" and manifest["moments_shape"] == [6, 32, 32] and len(paths) == 4
    assert manifest["loser_model"].startswith(str(Path(debug_ckpt).resolve()) + "@")
    assert manifest["sampling"]["steps"] == 3 and manifest["complete"] and manifest["inputs"] == 15
    t = read_rows(out)
    ids = t.column("id").to_pylist()
    assert sorted(ids) == sorted(f"imgs/part-00000/{k}" for k in teacher_pixels(shapes_images))
    pixels = teacher_pixels(shapes_images)
    winners, losers = moments_array(t, "winner_moments"), moments_array(t, "loser_moments")
    for i, rid in enumerate(ids):  # winners: exactly encode-latents' pixel moments of the teacher render
        x = pixels[rid.rsplit("/", 1)[1]].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_array_equal(winners[i, :3], x.astype(np.float16))
    np.testing.assert_array_equal(moments_array(t, "winner_moments_flip"), winners[..., ::-1])
    np.testing.assert_array_equal(moments_array(t, "loser_moments_flip"), losers[..., ::-1])
    assert np.all(losers[:, 3:] == np.float16(encoders.PIXEL_LOGVAR))
    assert np.abs(winners[:, :3].astype(np.float32) - losers[:, :3]).mean() > 0.1
    assert t.column("loser_seed").to_pylist() == [loser_seed(0, rid) for rid in ids]
    assert set(t.column("judge_score").to_pylist()) == {1.0} and set(t.column("judge").to_pylist()) == {"shapes"}
    assert all(a.startswith("Score: 10\ncorrect\n") for a in t.column("judge_answer").to_pylist())
    sampling = json.loads(t.column("sampling")[0].as_py())
    assert sampling == manifest["sampling"] and (sampling["cfg"], sampling["temperature"]) == (4.0, 1.0)
    # A loser is what the checkpoint draws alone for the stored text states with the recorded seed.
    model = from_pretrained(debug_ckpt)
    text = torch.from_numpy(text_arrays(t)[2].astype(np.float32))[None]
    seed = t.column("loser_seed")[2].as_py()
    lat = generate(model, text, torch.ones(text.shape[:2], dtype=torch.bool), resolution=32, num_iter=3,
                   generator=torch.Generator().manual_seed(seed))  # fmt: skip
    alone = ((lat.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0
    np.testing.assert_allclose(losers[2, :3].astype(np.float32), alone[0].numpy(), atol=QUANT)
    # Judgements of every input are kept beside the shards.
    judged = pa.concat_tables([pq.read_table(p) for p in sorted((out / "judgements").glob("part-*.parquet"))])
    assert judged.num_rows == 15 and judged.column("status").to_pylist().count("kept") == 10

    # Resume: a rerun skips everything.
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    again = json.loads(runner.invoke(app, args).output.strip().splitlines()[-1])
    assert (again["shards_skipped"], again["shards_judged"], again["pairs_this_run"]) == (4, 0, 0)
    assert again["written"] == 10 and {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == stamp
    # A lost pair shard is remade from its judgements; a lost judgements file is judged again.
    (out / "part-00001.parquet").unlink()
    (out / "part-00002.parquet").unlink()
    (out / "judgements" / "part-00002.parquet").unlink()
    (out / "part-00003.parquet.tmp-99").write_bytes(b"half")
    again = json.loads(runner.invoke(app, args).output.strip().splitlines()[-1])
    assert (again["shards_skipped"], again["shards_judged"], again["shards_paired"]) == (2, 1, 2)
    assert (again["inputs"], again["written"]) == (15, 10) and read_rows(out).equals(t)
    assert not list(out.glob("*.tmp-*"))
    # Other settings are refused without --overwrite.
    changed = runner.invoke(app, [*args, "--steps", "2"])
    assert changed.exit_code == 2 and "other settings" in changed.output and "--overwrite" in changed.output
    redone = runner.invoke(app, [*args, "--steps", "2", "--overwrite"])
    assert redone.exit_code == 0, redone.output
    assert json.loads(redone.output.strip().splitlines()[-1])["written"] == 10
    assert pair_shards(out)[0]["sampling"]["steps"] == 2


# ------------------------------------------------------------------------------ Parquet / tar / folder sources


def mixed_sources(root: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """Parquet (LAION-style and HF-style), tar and folder inputs -> ({id: expected reason or 'kept'}, images)."""
    img = {k: noise_png(i, (40 + 8 * i, 36)) for i, k in enumerate("abcdefghij")}
    laion = pa.table(
        {
            "jpg": pa.array([img["a"], img["b"], img["c"], None, img["d"]], pa.binary()),
            "TEXT": ["a red circle", "a red square", "a blue star", "a green cross", "a blue square"],
            "AESTHETIC_SCORE": [7.0, 5.0, None, 8.0, 8.0],
        }
    )
    pq.write_table(laion, root / "laion.parquet", row_group_size=2)
    hf = pa.table(
        {
            "image": [{"bytes": img["e"], "path": "e.png"}, {"bytes": img["f"], "path": "f.png"},
                      {"bytes": b"junk", "path": "g.png"}],
            "caption": ["two stars", "a green cross", "three squares"],
            "aesthetic": [6.9, 9.0, 7.0],
            "id": ["hf-a", "hf-b", "hf-a"],  # the third repeats the first's id
        }
    )  # fmt: skip
    pq.write_table(hf, root / "hf.parquet")
    write_tar(
        root / "t.tar",
        [("k0.png", img["h"]), ("k0.json", json.dumps({"caption": "a star above a cross", "aesthetic": 7.5}).encode()),
         ("k1.png", img["i"]), ("k1.json", json.dumps({"caption": "a star", "aesthetic": "high"}).encode())],
    )  # fmt: skip
    folder = root / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(img["j"])
    (folder / "y.png").write_bytes(img["a"])
    (folder / "captions.jsonl").write_text(
        json.dumps({"file_name": "x.png", "caption": "three circles", "aesthetic_score": 8.1}) + "\n"
    )
    (folder / "y.txt").write_text("a cross")
    expected = [
        ("laion/000000", "kept"), ("laion/000001", "below_min_aesthetic"), ("laion/000002", "missing_aesthetic"),
        ("laion/000003", "missing_image"), ("laion/000004", "judge_rejected"), ("hf-a", "kept"),
        ("hf-b", "judge_unparseable"), ("hf-a", "duplicate_id"), ("t/k0", "kept"), ("t/k1", "bad_aesthetic"),
        ("imgs/x.png", "kept"), ("imgs/y.png", "missing_aesthetic"),
    ]  # fmt: skip
    sources = {"laion/000000": img["a"], "hf-a": img["e"], "t/k0": img["h"], "imgs/x.png": img["j"]}
    return expected, sources


STUB_REPLIES = {"a blue square": "Score: 5", "a green cross": "It looks fine to me."}


def stub_generate(self, texts, images):
    """Fixed answers by caption ("yes" for captions not listed)."""
    return [next((v for k, v in STUB_REPLIES.items() if f'"{k}"' in t), "Score: 9") for t in texts]


def test_mixed_sources_aesthetic_filter_and_stubbed_qwen_judge(tmp_path, bert_ckpt, qwen_dir, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    expected, images = mixed_sources(src)
    monkeypatch.setattr(TransformersJudge, "generate", stub_generate)
    out = tmp_path / "out"
    cfg = PairsConfig([str(src)], str(out), bert_ckpt, judge_model=qwen_dir, min_aesthetic=6.5, steps=2,
                      workers=0, shard_size=8, batch_size=2, device="cpu")  # fmt: skip
    report = run_build_dpo_pairs(cfg)
    kept = sorted(k for k, v in expected if v == "kept")
    assert (report["inputs"], report["written"], report["rejected"]) == (12, 4, 8)
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    assert sorted((r["id"], r["reason"]) for r in rows) == sorted((k, v) for k, v in expected if v != "kept")
    rej = rejects(out)
    assert rej["hf-b"][1] == "It looks fine to me."  # the raw answer, unchanged
    assert rej["laion/000001"][1] == "aesthetic 5 < --min-aesthetic 6.5"
    assert "'high' is not a number" in rej["t/k1"][1]
    manifest, _ = pair_shards(out, text_encoder=encoders.text_encoder_name(json.loads(
        (Path(bert_ckpt) / "config.json").read_text())["text_encoder"]))  # fmt: skip
    assert manifest["judge"].startswith("transformers:tiny-qwen25vl-")
    t = read_rows(out)
    assert sorted(t.column("id").to_pylist()) == kept
    assert set(t.column("judge_answer").to_pylist()) == {"Score: 9"}
    np.testing.assert_allclose(t.column("judge_score").to_numpy(), 0.9, rtol=1e-6)
    assert set(t.column("text_len").to_pylist()) <= set(range(1, 17)) and text_arrays(t)[0].shape[1] == 32
    winners = moments_array(t, "winner_moments")
    for i, rid in enumerate(t.column("id").to_pylist()):  # center-cropped exactly as encode-latents does
        crop = center_crop_resize(decode_image(images[rid]), 32).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(winners[i, :3], crop.astype(np.float16))


def test_random_tiny_qwen_through_the_stage_keeps_raw_answers(tmp_path, bert_ckpt, qwen_dir):
    members = []
    for i in range(4):
        members += [(f"s{i}.png", noise_png(i)), (f"s{i}.json", json.dumps({"caption": f"a red circle {i}"}).encode())]
    write_tar(tmp_path / "in.tar", members)
    out = tmp_path / "out"
    cfg = PairsConfig([str(tmp_path / "in.tar")], str(out), bert_ckpt, judge_model=qwen_dir, judge_max_new_tokens=6,
                      judge_max_pixels=56 * 56, steps=2, workers=0, batch_size=4, device="cpu")  # fmt: skip
    report = run_build_dpo_pairs(cfg)
    assert report["inputs"] == 4 == report["written"] + report["rejected"]
    judged = {r["id"]: r for r in pq.read_table(out / "judgements" / "part-00000.parquet").to_pylist()}
    rej = rejects(out)
    assert report["rejected_by_reason"].get("judge_unparseable", 0) >= 3, judged
    for rid, (reason, detail) in rej.items():
        assert reason in ("judge_unparseable", "judge_rejected")
        if reason == "judge_unparseable":
            assert detail == judged[rid]["judge_answer"] and judged[rid]["judge_score"] is None


# ----------------------------------------------------------------------------------------------- CLI errors


def test_cli_errors_name_the_bad_value_and_help_lists_defaults(tmp_path, shapes_images, debug_ckpt, bert_ckpt):
    hub_named = save_pretrained(LightGen(preset("debug", text_encoder="google/flan-t5-xxl")), tmp_path / "hub")
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "manifest.json").write_text(json.dumps({"format": "lightgen-latents"}))
    (tmp_path / "latents" / "part-00000.parquet").write_bytes(b"")
    bert = json.loads((Path(bert_ckpt) / "config.json").read_text())["text_encoder"]
    base = ["--input", str(shapes_images), "--model", debug_ckpt, "--judge-backend", "shapes"]
    cases = [
        (["--judge-backend", "llava"], "unknown --judge-backend 'llava'"),
        (["--judge-backend", "transformers"], "--judge-backend transformers needs --judge-model DIR"),
        (["--judge-backend", "transformers", "--judge-model", str(tmp_path)], "is not a local model directory"),
        (["--min-judge-score", "8"], "--min-judge-score must be in \\[0, 1\\]"),
        (["--model", str(tmp_path)], "is not a LightGen checkpoint directory"),
        (["--model", str(hub_named)], "config's text_encoder 'google/flan-t5-xxl' is neither 'minilm' nor a local"),
        (["--text-encoder", bert], "gives 32-dim states, the --model expects 384"),
        (["--vae", "sd35"], "--vae 'sd35' is neither 'pixel' nor a local directory"),
        (["--resolution", "30"], "--resolution 30: image size 30x30 is not a positive multiple of 4"),
        (["--cfg-schedule", "cosine"], "unknown --cfg-schedule 'cosine'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--input", str(tmp_path / "missing.tar")], "does not exist: .*missing.tar"),
        (["--input", str(tmp_path / "latents")], "holds 'lightgen-latents' shards, not images"),
    ]
    try:
        import vllm  # noqa: F401
    except ImportError:
        cases.append((["--judge-backend", "vllm", "--judge-model", str(tmp_path / "hub")], "optional vllm extra"))
    for bad, message in cases:
        result = runner.invoke(app, ["build-dpo-pairs", *base, *bad, "--output", str(tmp_path / "o"), "--workers", "0"])
        assert result.exit_code == 2 and result.output.startswith("error: "), (bad, result.output)
        assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1, result.output
    help_text = runner.invoke(app, ["build-dpo-pairs", "--help"], env={"COLUMNS": "200"}).output
    for option in ["--input", "--output", "--model", "--judge-backend", "--judge-model", "--min-judge-score",
                   "--min-aesthetic", "--vae", "--text-encoder", "--resolution", "--steps", "--cfg", "--temperature",
                   "--batch-size", "--shard-size", "--workers", "--gpus-per-worker", "--ray-address", "--seed",
                   "--overwrite", "--quiet"]:  # fmt: skip
        assert option in help_text
    for default in ["[default: transformers]", "[default: 0.8]", "[default: 64]", "[default: 4.0]", "[default: 1000]"]:
        assert default in help_text


# ---------------------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_worker_gives_the_same_pairs(tmp_path, shapes_images, debug_ckpt):
    import ray

    from pipeline import runtime

    runtime.init_ray(None, num_cpus=2)
    try:
        runs = {}
        for workers in (0, 1):
            out = tmp_path / f"w{workers}"
            cfg = PairsConfig([str(shapes_images)], str(out), debug_ckpt, judge_backend="shapes", steps=2,
                              workers=workers, shard_size=4, batch_size=3)  # fmt: skip
            assert run_build_dpo_pairs(cfg)["written"] == 10
            runs[workers] = read_rows(out)
    finally:
        ray.shutdown()
    a, b = runs[0], runs[1]
    for column in ("id", "caption", "loser_seed", "judge_answer", "text_len", "sampling"):
        assert a.column(column).equals(b.column(column)), column
    np.testing.assert_array_equal(moments_array(a, "winner_moments"), moments_array(b, "winner_moments"))
    np.testing.assert_allclose(
        moments_array(a, "loser_moments").astype(np.float32), moments_array(b, "loser_moments"), atol=QUANT
    )
