"""`build-dpo-pairs` as two runner stages (judge-images, then pairs), through `PairsStage.run(PairsConfig(...))`:
the ShapesWorld chain with the shapes judge and a saved `debug` model (counts across both stages, reasons, winners,
losers = `LightGenPipeline` with the recorded seed, per-stage resume), mixed Parquet / tar / folder sources with
aesthetic filtering and a stubbed Qwen judge, the random tiny Qwen, a `text_key_mask=False` model, settings errors,
Ray."""

from __future__ import annotations

import hashlib
import io
import json
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
from conftest import wake_head
from PIL import Image
from tiny_models import make_tiny_bert, make_tiny_qwen25vl, png_bytes, write_tar

from lightgen.api import LightGenPipeline
from lightgen_model import LightGen, encoders, preset, save_pretrained
from pipeline.core.schema import (
    JUDGEMENT_SCHEMA,
    PAIR_SCHEMA,
    IncompatibleShardsError,
    moments_array,
    pair_shards,
    text_arrays,
    training_shards,
)
from pipeline.io.decode import center_crop_resize, decode_image
from pipeline.models.judges import TransformersJudge
from pipeline.stages.dpo_pairs.pairs import PairsConfig, PairsStage, loser_seed
from shapesworld.render import ShapesTeacher
from shapesworld.world import CATEGORIES, enumerate_scenes, mirror_relation

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def noise_png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    """A random RGB PNG of size (w, h)."""
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def read_judgements(out: Path) -> pa.Table:
    """All judgement shards of a run, in manifest order."""
    return read_rows(out / "judgements")


def read_rows(out: Path) -> pa.Table:
    """All shards of a run (pairs, or judgements), in manifest order, with plain pyarrow."""
    manifest = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])


def rejects(out: Path) -> dict[str, tuple[str, str]]:
    """{id: (reason, detail)} of a run's merged rejects file."""
    return {r["id"]: (r["reason"], r["detail"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def loser_pixels(t: pa.Table) -> np.ndarray:
    """The losers of pixel-tokenizer pair rows as (B, H, W, 3) uint8 images."""
    x = moments_array(t, "loser_moments")[:, :3].astype(np.float32)
    return ((x + 1.0) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def pipeline_alone(pipe: LightGenPipeline, caption: str, seed: int, steps: int, resolution: int = 32) -> np.ndarray:
    """What `LightGenPipeline` (and so `lightgen generate --seed`) draws for one caption: (H, W, 3) uint8."""
    out = pipe(
        caption,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_schedule="linear",
        temperature=1.0,
        resolution=resolution,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(out.images[0])


def assert_same_image(batched: np.ndarray, alone: np.ndarray) -> None:
    """Images drawn in a batch and alone agree up to float rounding: at most one 8-bit step, in under 1% of pixels."""
    diff = np.abs(batched.astype(np.int16) - alone)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def pairs_config(inputs: list[str], out: Path, model: str, **settings: object) -> PairsConfig:
    """The `PairsConfig` of a run into `out` in this process (workers 0) with no progress bar; `settings` add to it."""
    return PairsConfig(inputs, str(out), model=model, **{"workers": 0, "progress": False, **settings})


@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory) -> Path:
    """10 ShapesWorld teacher renders at 32 px with their captions and metadata, as synthesize writes them."""
    root = tmp_path_factory.mktemp("shapes") / "imgs"
    root.mkdir()
    teacher = ShapesTeacher(32)
    metas = [enumerate_scenes(tag)[i] for tag in CATEGORIES for i in (0, 3)][:10]
    members = []
    for k, meta in enumerate(metas):
        caption = json.dumps({"caption": meta["prompt"], "metadata": meta}).encode()
        members += [(f"s{k:02d}.png", png_bytes(teacher(meta, k))), (f"s{k:02d}.json", caption)]
    write_tar(root / "part-00000.tar", members)
    return root


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory) -> str:
    """The `debug` preset (pixel tokens, MiniLM text), random weights (the head awake: images depend on the text)."""
    torch.manual_seed(0)
    return str(save_pretrained(wake_head(LightGen(preset("debug"))), tmp_path_factory.mktemp("ckpt") / "debug"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def bert_model(root: Path, bert: Path, text_key_mask: bool) -> str:
    """The `debug` preset reading a tiny local BERT (32-dim states) named in its config: a fast text encoder."""
    torch.manual_seed(1)
    cfg = preset("debug", text_dim=32, text_encoder=str(bert), max_text_len=16, text_key_mask=text_key_mask)
    model = wake_head(LightGen(cfg))
    return str(save_pretrained(model, root / f"debug-bert-{text_key_mask}"))


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory, tiny_bert) -> str:
    return bert_model(tmp_path_factory.mktemp("bert-ckpt"), tiny_bert, True)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return str(make_tiny_qwen25vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen25vl"))


def test_schema_module_needs_only_pyarrow_and_numpy():
    code = "import sys; sys.modules['torch'] = sys.modules['PIL'] = None; from pipeline.core.schema import pair_shards"
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
            ("noise.png", noise_png(1, (32, 32))),
            ("noise.json", js(single["prompt"], single)),
            ("mirror.png", png_bytes(teacher(mirror_relation(pos), 7))),
            ("mirror.json", js(pos["prompt"], pos)),
            ("nometa.png", png_bytes(teacher(single, 1))),
            ("nometa.json", js(single["prompt"])),
            ("broken.png", b"not an image at all"),
            ("broken.json", js(single["prompt"], single)),
            ("badmeta.png", png_bytes(teacher(single, 2))),
            ("badmeta.json", js("x", {"tag": "bogus", "include": []})),
        ],
    )
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


def check_shapes_pairs(out: Path, shapes_images: Path, debug_ckpt: str) -> pa.Table:
    """The contract and contents of the shapes run's pair shards."""
    manifest, paths = pair_shards(out, vae="pixel", text_encoder="minilm")
    assert manifest["judge"] == "shapes" and manifest["moments_shape"] == [6, 32, 32] and len(paths) == 2
    weights, sha = manifest["loser_model"].split("@")[0].split(":")  # the checkpoint by content, not by path
    assert hashlib.sha256((Path(debug_ckpt) / weights).read_bytes()).hexdigest()[:16] == sha
    assert manifest["sampling"]["steps"] == 3 and manifest["complete"] and manifest["inputs"] == 15
    assert manifest["rows_per_shard"] == [0, 10]  # extra.tar's inputs are all rejected
    assert "BYTE_STREAM_SPLIT" in pq.ParquetFile(paths[1]).metadata.row_group(0).column(4).encodings
    with pytest.raises(IncompatibleShardsError, match="format 'lightgen-dpo-pairs', expected 'lightgen-latents'"):
        training_shards(out)
    t = read_rows(out)
    assert t.schema.equals(PAIR_SCHEMA)
    ids = t.column("id").to_pylist()
    pixels = teacher_pixels(shapes_images)
    assert sorted(ids) == sorted(f"imgs/part-00000/{k}" for k in pixels)
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
    assert json.loads(t.column("sampling")[0].as_py()) == manifest["sampling"]
    assert t.column("loser_judge_answer").null_count == t.column("loser_judge_score").null_count == len(t)
    assert [len(x) for x in text_arrays(t)] == t.column("text_len").to_pylist()
    return t


def test_shapes_two_stages_counts_pairs_losers_and_resume(tmp_path, shapes_images, debug_ckpt):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(shapes_images, src / "imgs")
    expected = shapes_extras(src / "extra.tar")
    out = tmp_path / "pairs"
    cfg = pairs_config(
        [str(src / "imgs"), str(src / "extra.tar")], out, debug_ckpt, judge_backend="shapes", steps=3, batch_size=3
    )
    report = PairsStage.run(cfg)
    # Counts add up across both stages: every input is a pair or a reject of one of them, with its reason.
    judge = report["judge"]
    assert (report["inputs"], report["written"], report["rejected"], report["shards"]) == (15, 10, 5, 2)
    assert (judge["inputs"], judge["written"], judge["rejected"]) == (15, 12, 3)  # 12 images reached the judge
    assert judge["rejected_by_reason"] == {"bad_metadata": 1, "missing_metadata": 1, "undecodable": 1}
    assert report["rejected_by_reason"] == {**judge["rejected_by_reason"], "judge_rejected": 2}
    rej = rejects(out)
    assert {k: v[0] for k, v in rej.items()} == expected
    assert rej["extra/noise"][1].startswith("score 0 < --min-judge-score 0.8; answer: Score: 0\n")
    assert "expected" in rej["extra/mirror"][1]  # the scorer's reason: the relation is mirrored
    t = check_shapes_pairs(out, shapes_images, debug_ckpt)
    # The judgement shards: every judged image, kept or not, with its bytes and the raw answer.
    judged = read_judgements(out)
    assert judged.schema.equals(JUDGEMENT_SCHEMA) and judged.num_rows == 12
    assert judged.column("kept").to_pylist().count(True) == 10
    noise = judged.filter(pa.compute.equal(judged["id"], "extra/noise")).to_pylist()[0]
    assert (noise["kept"], noise["reason"], noise["judge_score"]) == (False, "judge_rejected", 0.0)
    assert noise["image"] == noise_png(1, (32, 32)) and noise["judge_answer"].startswith("Score: 0\n")
    # A loser is what LightGenPipeline (so `lightgen generate --seed`) draws alone for the caption and recorded seed.
    pipe = LightGenPipeline.from_pretrained(debug_ckpt, device="cpu", dtype="float32")
    losers = loser_pixels(t)
    for i in (0, 4, 9):
        alone = pipeline_alone(pipe, t.column("caption")[i].as_py(), t.column("loser_seed")[i].as_py(), steps=3)
        assert_same_image(losers[i], alone)

    # Resume per stage: a rerun judges and draws nothing.
    stamp = {p: p.stat().st_mtime_ns for p in [*out.glob("part-*"), *out.glob("judgements/part-*")]}
    again = PairsStage.run(cfg)
    assert (again["judge"]["shards_skipped"], again["shards_skipped"], again["written"]) == (2, 2, 10)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # A lost pair shard is remade from its judgements (not judged again); a lost judgement shard is judged again.
    (out / "part-00001.parquet").unlink()
    again = PairsStage.run(cfg)
    assert (again["judge"]["shards_run"], again["shards_run"], again["written"]) == (0, 1, 10)
    (out / "judgements" / "part-00000.parquet").unlink()
    again = PairsStage.run(cfg)
    assert (again["judge"]["shards_run"], again["shards_run"], again["inputs"]) == (1, 1, 15)
    assert read_rows(out).equals(t)
    # Other loser settings are refused without --overwrite (the judge stage resumes: its settings did not change).
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        PairsStage.run(PairsConfig(**{**vars(cfg), "steps": 2}))
    redone = PairsStage.run(PairsConfig(**{**vars(cfg), "steps": 2, "overwrite": True}))
    assert redone["written"] == 10 and pair_shards(out)[0]["sampling"]["steps"] == 2


def test_judge_losers_keeps_only_pairs_the_judge_prefers(tmp_path, shapes_images, debug_ckpt, monkeypatch):
    """With --judge-losers a loser the judge finds as good as its winner makes no pair (`loser_not_worse`), one it
    refuses neither (`loser_judge_error`, the rest of its batch judged one by one); the kept pairs record the judge on
    their loser; counts still add up."""
    from pipeline.models.judges import ShapesJudge
    from pipeline.stages.dpo_pairs.pairs import PairsStage

    pixels, key_of = teacher_pixels(shapes_images), {}
    with tarfile.open(shapes_images / "part-00000.tar") as tf:
        for m in tf:
            if m.name.endswith(".json"):
                key_of[json.loads(tf.extractfile(m).read())["caption"]] = m.name[:-5]
    perfect = set(sorted(key_of)[::3])  # these captions get the teacher's own render as their "loser"
    refused = sorted(set(key_of) - perfect)[0]  # this one a black "loser" the judge refuses
    draw, answers = PairsStage.draw_losers, ShapesJudge.answers

    def some_perfect(self, captions, seeds):
        drawn = draw(self, captions, seeds)
        drawn = [pixels[key_of[c]] if c in perfect else im for c, im in zip(captions, drawn, strict=True)]
        return [np.zeros_like(im) if c == refused else im for c, im in zip(captions, drawn, strict=True)]

    def refuse_black(self, images, captions, metadata):
        if any(np.asarray(im).max() == 0 for im in images):
            raise ValueError("a black image")
        return answers(self, images, captions, metadata)

    monkeypatch.setattr(PairsStage, "draw_losers", some_perfect)
    monkeypatch.setattr(ShapesJudge, "answers", refuse_black)
    out = tmp_path / "pairs"
    cfg = pairs_config(
        [str(shapes_images)], out, debug_ckpt, judge_backend="shapes", steps=2, batch_size=4, judge_losers=True
    )
    report = PairsStage.run(cfg)
    n_bad = len(perfect) + 1
    assert (report["inputs"], report["written"], report["rejected"]) == (10, 10 - n_bad, n_bad)
    assert report["rejected_by_reason"] == {"loser_not_worse": len(perfect), "loser_judge_error": 1}
    rej = {rid.rsplit("/", 1)[1]: v for rid, v in rejects(out).items()}
    assert rej.pop(key_of[refused]) == ("loser_judge_error", "ValueError: a black image")
    assert set(rej) == {key_of[c] for c in perfect}
    assert all(d.startswith("the judge scores the loser 1, the winner 1; answer: Score: 10") for _, d in rej.values())
    t = read_rows(out)
    assert t.schema.equals(PAIR_SCHEMA) and set(t.column("caption").to_pylist()) == set(key_of) - perfect - {refused}
    assert set(t.column("loser_judge_score").to_pylist()) == {0.0}  # random-weight losers: wrong scenes
    assert all(a.startswith("Score: 0\n") for a in t.column("loser_judge_answer").to_pylist())
    # The judgements keep each input's metadata, which the shapes judge needs to score the losers.
    judged = read_judgements(out)
    metas = [json.loads(m) for m in judged["metadata"].to_pylist()]
    assert [m["prompt"] for m in metas] == judged["caption"].to_pylist()
    # `inspect` shows the judge's answer on each loser beside the pair.
    from pipeline.inspect.page import inspect_dataset

    page = inspect_dataset(out, out=tmp_path / "pairs.html", limit=20).read_text()
    assert page.count("judge on the loser: score 0") == len(t)
    # Other --judge-losers settings are other pairs: refused without --overwrite.
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        PairsStage.run(PairsConfig(**{**vars(cfg), "judge_losers": False}))


# ------------------------------------------------------------------------------ Parquet / tar / folder sources


def mixed_sources(root: Path) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """Parquet (LAION-style and HF-style), tar and folder inputs -> ([(id, expected reason or 'kept')], images)."""
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
            "image": [
                {"bytes": img["e"], "path": "e.png"},
                {"bytes": img["f"], "path": "f.png"},
                {"bytes": b"junk", "path": "g.png"},
            ],
            "caption": ["two stars", "a green cross", "three squares"],
            "aesthetic": [6.9, 9.0, 7.0],
            "id": ["hf-a", "hf-b", "hf-a"],  # the third repeats the first's id
        }
    )
    pq.write_table(hf, root / "hf.parquet")
    write_tar(
        root / "t.tar",
        [
            ("k0.png", img["h"]),
            ("k0.json", json.dumps({"caption": "a star above a cross", "aesthetic": 7.5}).encode()),
            ("k1.png", img["i"]),
            ("k1.json", json.dumps({"caption": "a star", "aesthetic": "high"}).encode()),
        ],
    )
    folder = root / "imgs"
    folder.mkdir()
    (folder / "x.png").write_bytes(img["j"])
    (folder / "y.png").write_bytes(img["a"])
    (folder / "captions.jsonl").write_text(
        json.dumps({"file_name": "x.png", "caption": "three circles", "aesthetic_score": 8.1}) + "\n"
    )
    (folder / "y.txt").write_text("a cross")
    expected = [
        ("laion/000000", "kept"),
        ("laion/000001", "below_min_aesthetic"),
        ("laion/000002", "missing_aesthetic"),
        ("laion/000003", "missing_image"),
        ("laion/000004", "judge_rejected"),
        ("hf-a", "kept"),
        ("hf-b", "judge_unparseable"),
        ("hf-a", "duplicate_id"),
        ("t/k0", "kept"),
        ("t/k1", "bad_aesthetic"),
        ("imgs/x.png", "kept"),
        ("imgs/y.png", "missing_aesthetic"),
    ]
    sources = {"laion/000000": img["a"], "hf-a": img["e"], "t/k0": img["h"], "imgs/x.png": img["j"]}
    return expected, sources


STUB_REPLIES = {"a blue square": "Score: 5", "a green cross": "It looks fine to me."}


def stub_generate(self, texts, images):
    """Fixed answers by caption ("Score: 9" for captions not listed)."""
    return [next((v for k, v in STUB_REPLIES.items() if f'"{k}"' in t), "Score: 9") for t in texts]


def test_mixed_sources_aesthetic_filter_and_stubbed_qwen_judge(tmp_path, bert_ckpt, qwen_dir, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    expected, images = mixed_sources(src)
    monkeypatch.setattr(TransformersJudge, "generate", stub_generate)
    out = tmp_path / "out"
    cfg = pairs_config(
        [str(src)],
        out,
        bert_ckpt,
        judge_model=qwen_dir,
        min_aesthetic=6.5,
        steps=2,
        shard_size=8,
        batch_size=2,
        device="cpu",
    )
    report = PairsStage.run(cfg)
    kept = sorted(k for k, v in expected if v == "kept")
    assert (report["inputs"], report["written"], report["rejected"]) == (12, 4, 8)
    assert report["judge"]["inputs"] == 12 and report["judge"]["written"] == 6  # 4 kept + 2 the judge did not keep
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    assert sorted((r["id"], r["reason"]) for r in rows) == sorted((k, v) for k, v in expected if v != "kept")
    rej = rejects(out)
    assert rej["hf-b"][1] == "It looks fine to me."  # the raw answer, unchanged
    assert rej["laion/000001"][1] == "aesthetic 5 < --min-aesthetic 6.5"
    assert "'high' is not a number" in rej["t/k1"][1]
    bert = json.loads((Path(bert_ckpt) / "config.json").read_text())["text_encoder"]
    manifest, _ = pair_shards(out, text_encoder=encoders.text_encoder_name(bert))
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
    cfg = pairs_config(
        [str(tmp_path / "in.tar")],
        out,
        bert_ckpt,
        judge_model=qwen_dir,
        judge_max_new_tokens=6,
        judge_max_pixels=56 * 56,
        steps=2,
        batch_size=4,
        device="cpu",
    )
    report = PairsStage.run(cfg)
    assert report["inputs"] == 4 == report["written"] + report["rejected"]
    judged = {r["id"]: r for r in read_judgements(out).to_pylist()}
    assert len(judged) == 4 and report["rejected_by_reason"].get("judge_unparseable", 0) >= 3, judged
    for rid, (reason, detail) in rejects(out).items():
        assert reason in ("judge_unparseable", "judge_rejected") and not judged[rid]["kept"]
        if reason == "judge_unparseable":
            assert detail == judged[rid]["judge_answer"] and judged[rid]["judge_score"] is None


# ------------------------------------------------------------------------------------- text_key_mask=False


def test_losers_of_a_text_key_mask_false_model_are_what_the_pipeline_draws(tmp_path, shapes_images, tiny_bert):
    """A converted reference model attends to padded text: its losers must still be `LightGenPipeline`'s images
    (text padded to max_text_len with the encoder's own states), in a batch as alone."""
    model = bert_model(tmp_path, tiny_bert, text_key_mask=False)
    out = tmp_path / "out"
    cfg = pairs_config([str(shapes_images)], out, model, judge_backend="shapes", steps=2, batch_size=4, device="cpu")
    assert PairsStage.run(cfg)["written"] == 10
    t = read_rows(out)
    pipe = LightGenPipeline.from_pretrained(model, device="cpu", dtype="float32")
    assert not pipe.model.cfg.text_key_mask
    losers = loser_pixels(t)
    for i in (0, 5):
        alone = pipeline_alone(pipe, t.column("caption")[i].as_py(), t.column("loser_seed")[i].as_py(), steps=2)
        assert_same_image(losers[i], alone)
    # The stored text is unpadded (the shard contract): the trainer pads it as the pipeline does.
    assert t.column("text_len").to_pylist() == [len(x) for x in pipe.text_encoder(t.column("caption").to_pylist())]


# ---------------------------------------------------------------------------------------------- settings


def test_settings_errors_name_the_bad_value_before_any_work(tmp_path, shapes_images, debug_ckpt, bert_ckpt):
    hub_named = save_pretrained(LightGen(preset("debug", text_encoder="google/flan-t5-xxl")), tmp_path / "hub")
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "manifest.json").write_text(json.dumps({"format": "lightgen-latents"}))
    (tmp_path / "latents" / "part-00000.parquet").write_bytes(b"")
    bert = json.loads((Path(bert_ckpt) / "config.json").read_text())["text_encoder"]
    base = dict(inputs=[str(shapes_images)], output=str(tmp_path / "o"), model=debug_ckpt, judge_backend="shapes")
    cases = [
        ({"judge_backend": "llava"}, "unknown --judge-backend 'llava'"),
        ({"judge_backend": "transformers"}, "--judge-backend transformers needs --judge-model DIR"),
        ({"judge_backend": "transformers", "judge_model": str(tmp_path)}, "is not a local model directory"),
        ({"min_judge_score": 8.0}, "--min-judge-score must be in \\[0, 1\\]"),
        ({"model": str(tmp_path)}, "is not a LightGen checkpoint directory"),
        ({"model": ""}, "--model '' is not a LightGen checkpoint directory"),
        ({"model": str(hub_named)}, "text encoder 'google/flan-t5-xxl' .*is neither one of \\['minilm'\\]"),
        ({"text_encoder": bert}, "gives 32-dim states, the --model expects 384"),
        ({"vae": "sd35"}, "image tokenizer 'sd35' is neither one of \\['pixel'\\]"),
        ({"resolution": 30}, "--resolution 30: image size 30x30 is not a positive multiple of 4"),
        ({"cfg_schedule": "cosine"}, "cfg schedule .* got 'cosine'"),
        ({"cfg": float("inf")}, "cfg .* finite number >= 0, got inf"),
        ({"steps": 0}, "steps .* integer >= 1, got 0"),
        ({"inputs": [str(tmp_path / "missing.tar")]}, "does not exist: .*missing.tar"),
        ({"inputs": [str(tmp_path / "latents")]}, "holds 'lightgen-latents' shards, not images"),
    ]
    for bad, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            PairsStage.run(PairsConfig(**{**base, **bad, "workers": 0, "progress": False}))
    assert not (tmp_path / "o").exists()  # every check runs before either stage writes (the judge's too)


# ---------------------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_worker_gives_the_same_pairs(tmp_path, shapes_images, debug_ckpt):
    import ray

    from pipeline.core import runtime

    runtime.init_ray(None, num_cpus=2)
    try:
        runs = {}
        for workers in (0, 1):
            out = tmp_path / f"w{workers}"
            cfg = pairs_config(
                [str(shapes_images)], out, debug_ckpt, judge_backend="shapes", steps=2, workers=workers, batch_size=3
            )
            report = PairsStage.run(cfg)
            assert report["written"] == 10 and report["judge"]["written"] == 10
            runs[workers] = read_rows(out)
    finally:
        ray.shutdown()
    a, b = runs[0], runs[1]
    # Other thread counts in the Ray worker may move float roundings: text states and losers are compared closely.
    for column in set(PAIR_SCHEMA.names) - {"text_emb", "loser_moments", "loser_moments_flip"}:
        assert a.column(column).equals(b.column(column)), column
    for x, y in zip(text_arrays(a), text_arrays(b), strict=True):
        np.testing.assert_allclose(x.astype(np.float32), y, rtol=1e-2, atol=1e-3)
    for x, y in zip(loser_pixels(a), loser_pixels(b), strict=True):
        assert_same_image(x, y)
