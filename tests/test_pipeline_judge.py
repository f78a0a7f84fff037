"""The build-dpo-pairs judge: prompt, strict parser, a tiny random Qwen2.5-VL on the CPU (transformers), a stubbed
generation for the kept/rejected routing, vLLM (faked here; real where installed), the ShapesWorld judge, and the
judge stage's batch logic (rows kept or not, images the judge refuses)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_tiny_qwen25vl

from pipeline.models import judges as J
from shapesworld.render import ShapesTeacher
from shapesworld.world import CATEGORIES, enumerate_scenes, mirror_relation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    return str(make_tiny_qwen25vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen25vl"))


def noise(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A random RGB image (w, h)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------------ prompt and parser


def test_prompt_asks_for_quality_caption_match_and_spatial_relations():
    text = J.judge_prompt("a red circle left of a blue square\n")
    assert '"a red circle left of a blue square"' in text
    for phrase in ("quality", "caption", "spatial relation", "left of", "above", "Score: N", "0 to 10"):
        assert phrase in text
    assert len(J.PROMPT_VERSION) == 12
    messages = J.build_messages(noise(0), "a star", max_pixels=4096)
    assert messages[0]["role"] == "user"
    image_part, text_part = messages[0]["content"]
    assert image_part["type"] == "image" and image_part["max_pixels"] == 4096
    assert text_part == {"type": "text", "text": J.judge_prompt("a star")}


ANSWERS = [
    # (raw answer, normalised score or None = unparseable)
    ("Score: 8", 0.8),
    ("score: 10", 1.0),
    ("SCORE=0", 0.0),
    ("Score: 7.5", 0.75),
    ("**Score:** 9", 0.9),
    ("`Score: 6`", 0.6),
    ('"Score: 6."', 0.6),
    ("8", 0.8),
    ("8/10", 0.8),
    ("Score: 8 / 10", 0.8),
    ("8 out of 10", 0.8),
    ("  \n Score: 4\n", 0.4),
    ("Yes", 1.0),
    ("no.", 0.0),
    ("Answer: yes", 1.0),
    ("Score: 9\nThe circle is left of the square as stated.", 0.9),
    ("Score: 9\nScore: 9", 0.9),
    ("score : 3", 0.3),  # how a word-level tokenizer decodes "score: 3"
    ("", None),
    ("   \n  ", None),
    ("Score: 11", None),
    ("Score: -1", None),
    ("12/10", None),
    ("Score: eight", None),
    ("Score: 7 or 8", None),
    ("7-8", None),
    ("I would rate this image 7 out of 10.", None),
    ("The image shows a red circle.\nScore: 8", None),
    ("Score: 9\nScore: 2", None),
    ("Score: 9\nno", None),
    ("yes and no", None),
    ("Score:", None),
    ("circle red the above", None),
    ("score : 7 / 5", None),
]


@pytest.mark.parametrize(("answer", "expected"), ANSWERS)
def test_parser_on_real_looking_answers(answer, expected):
    parsed = J.parse_answer(answer)
    if expected is None:
        assert parsed.score is None and parsed.error, parsed
    else:
        assert parsed.error == "" and parsed.score == pytest.approx(expected)


def test_verdict_routes_kept_rejected_and_unparseable_with_raw_text():
    kept = J.verdict("Score: 8", 0.8)
    assert kept.kept and kept.score == pytest.approx(0.8) and kept.reason == "" and kept.answer == "Score: 8"
    low = J.verdict("Score: 7", 0.8)
    assert not low.kept and low.reason == "judge_rejected" and "Score: 7" in low.detail and "0.7" in low.detail
    raw = "The image shows\ntwo circles"
    bad = J.verdict(raw, 0.8)
    assert bad.reason == "judge_unparseable" and bad.detail == raw and bad.answer == raw and bad.score is None
    assert J.verdict("no", 0.0).kept  # threshold 0 keeps every parseable answer


def test_judge_modules_import_no_heavy_library():
    code = (
        "import sys; import pipeline.models.judges, pipeline.stages.dpo_pairs.judging, pipeline.stages.dpo_pairs.config, pipeline.stages.dpo_pairs.pairs; "
        "heavy = [m for m in ('vllm', 'transformers', 'torch', 'qwen_vl_utils') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_build_judge_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="unknown --judge-backend 'llava'"):
        J.build_judge("llava", str(tmp_path))
    with pytest.raises(ValueError, match="--judge-backend transformers needs --judge-model"):
        J.build_judge("transformers", None)
    with pytest.raises(ValueError, match=f"--judge-model '{tmp_path}' is not a local model directory"):
        J.judge_name("vllm", str(tmp_path))
    assert J.judge_name("shapes", None) == "shapes"


# ------------------------------------------------------------------------------------------------ shapes judge


def test_shapes_judge_accepts_teacher_renders_and_rejects_noise_and_mirrored_relations():
    judge = J.build_judge("shapes")
    teacher = ShapesTeacher(32)
    metas = [enumerate_scenes(tag)[i] for tag in CATEGORIES for i in (0, 3)]
    renders = [Image.fromarray(teacher(m, seed)) for seed, m in enumerate(metas)]
    good = J.judge_batch(judge, renders, [m["prompt"] for m in metas], metas, 0.5)
    assert all(j.kept and j.score == 1.0 for j in good), [j.answer for j in good if not j.kept]
    assert all(j.answer.startswith("Score: 10\ncorrect\n") for j in good)
    bad = J.judge_batch(judge, [noise(i, (32, 32)) for i in range(len(metas))], [""] * len(metas), metas, 0.5)
    assert all(j.reason == "judge_rejected" and j.score == 0.0 for j in bad)
    # Spatial relations count: a render of the mirrored scene is rejected, with the scorer's reason in the answer.
    pos = enumerate_scenes("position")[0]
    mirrored = Image.fromarray(teacher(mirror_relation(pos), 3))
    (j,) = J.judge_batch(judge, [mirrored], [pos["prompt"]], [pos], 0.5)
    assert j.reason == "judge_rejected" and "expected" in j.answer.splitlines()[1]
    with pytest.raises(ValueError, match="needs each sample's ShapesWorld metadata"):
        judge.answers([renders[0]], ["x"], [None])


# ------------------------------------------------------------------------------------ transformers (tiny Qwen)


def test_tiny_random_qwen25vl_judges_on_cpu_and_keeps_raw_answers(qwen_dir):
    judge = J.build_judge("transformers", qwen_dir, device="cpu", max_new_tokens=6, max_pixels=56 * 56)
    assert isinstance(judge, J.TransformersJudge) and judge.name.startswith("transformers:tiny-qwen25vl-")
    assert judge.device == "cpu" and judge.model.dtype == torch.float32  # dtype auto: float32 off a GPU
    images = [noise(i, (32 + 8 * i, 40)) for i in range(4)]  # different sizes: padded batch, left padding
    captions = ["a red circle", "two blue squares left of a star", "a green cross", "three yellow triangles"]
    with torch.random.fork_rng(devices=[]):
        results = J.judge_batch(judge, images, captions, [None] * 4, 0.8)
        again = J.judge_batch(judge, images, captions, [None] * 4, 0.8)
    assert [r.answer for r in results] == [r.answer for r in again]  # greedy decoding
    assert all(isinstance(r.answer, str) for r in results)
    for r in results:
        if r.reason == "judge_unparseable":
            assert r.detail == r.answer and r.score is None
        else:
            assert r.score is not None
    # A random model answers with random words: (almost) all unparseable, raw text kept for the rejects file.
    assert sum(r.reason == "judge_unparseable" for r in results) >= 3, [r.answer for r in results]
    # Batching does not change an image's answer (left padding, greedy).
    alone = J.judge_batch(judge, images[1:2], captions[1:2], [None], 0.8)[0]
    assert alone.answer == results[1].answer


def test_transformers_backend_routing_with_stubbed_generation(qwen_dir, monkeypatch):
    judge = J.build_judge("transformers", qwen_dir, device="cpu", max_pixels=112 * 112)
    seen = {}
    replies = {"a red circle": "Score: 9", "a blue square": "Score: 5", "a green cross": "It looks fine to me."}

    def fake_generate(texts, images):
        seen["texts"], seen["images"] = texts, images
        return [next((v for k, v in replies.items() if f'"{k}"' in t), "yes") for t in texts]

    monkeypatch.setattr(judge, "generate", fake_generate)
    captions = ["a red circle", "a blue square", "a green cross", "a star"]
    images = [noise(i, (40 + 30 * i, 40)) for i in range(4)]
    out = J.judge_batch(judge, images, captions, [None] * 4, 0.8)
    assert [(o.reason, o.score) for o in out] == [
        ("", 0.9),
        ("judge_rejected", 0.5),
        ("judge_unparseable", None),
        ("", 1.0),
    ]
    assert out[2].detail == "It looks fine to me."
    # What the model would have seen: Qwen's chat format with the prompt, one image resized by qwen_vl_utils to
    # multiples of 28 within the pixel bounds.
    for text, caption in zip(seen["texts"], captions, strict=True):
        assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
        assert J.judge_prompt(caption) in text and text.endswith("<|im_start|>assistant\n")
    for (im,) in seen["images"]:
        assert im.width % 28 == 0 and im.height % 28 == 0 and im.width * im.height <= 112 * 112


# --------------------------------------------------------------------------------------------------- vLLM


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in `vllm` module recording the engine arguments and the requests."""

    class SamplingParams:
        def __init__(self, **kw):
            calls["sampling"] = kw

    class LLM:
        def __init__(self, **kw):
            calls["engine"] = kw

        def generate(self, requests, params, use_tqdm=True):
            calls["requests"] = requests
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f" Score: {i + 7}\n")]) for i in range(len(requests))]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_backend_builds_requests_from_the_shared_messages(qwen_dir, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    judge = J.build_judge("vllm", qwen_dir, max_new_tokens=12, max_pixels=56 * 56, gpu_memory_utilization=0.5)
    assert judge.name.startswith("vllm:tiny-qwen25vl-")
    assert calls["engine"]["model"] == qwen_dir and calls["engine"]["gpu_memory_utilization"] == 0.5
    assert calls["engine"]["limit_mm_per_prompt"] == {"image": 1}
    assert calls["sampling"] == {"temperature": 0.0, "max_tokens": 12}
    out = J.judge_batch(judge, [noise(0), noise(1)], ["a red circle", "a star"], [None, None], 0.8)
    assert [(o.reason, o.score, o.answer) for o in out] == [("judge_rejected", 0.7, "Score: 7"), ("", 0.8, "Score: 8")]
    for request, caption in zip(calls["requests"], ["a red circle", "a star"], strict=True):
        assert J.judge_prompt(caption) in request["prompt"] and "<|image_pad|>" in request["prompt"]
        (image,) = request["multi_modal_data"]["image"]
        assert isinstance(image, Image.Image) and image.width % 28 == 0


def test_vllm_missing_is_a_clear_error(qwen_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ValueError, match="needs the optional vllm extra"):
        J.build_judge("vllm", qwen_dir)


@pytest.mark.gpu
def test_vllm_real_engine_on_tiny_qwen(qwen_dir):
    pytest.importorskip("vllm", reason="vllm is not installed (optional extra `vllm`)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device")
    judge = J.build_judge("vllm", qwen_dir, max_new_tokens=6, max_pixels=56 * 56, gpu_memory_utilization=0.3)
    out = J.judge_batch(judge, [noise(0), noise(1)], ["a red circle", "a star"], [None, None], 0.8)
    assert len(out) == 2 and all(isinstance(o.answer, str) for o in out)
    assert all(o.detail == o.answer for o in out if o.reason == "judge_unparseable")


# --------------------------------------------------------------------------------------------- the judge stage


class RefusingJudge:
    """A judge that refuses (ValueError) any batch holding an image wider than 64 px, and scores by caption."""

    name = backend = "stub"

    def answers(self, images, captions, metadata):
        if any(im.width > 64 for im in images):
            raise ValueError(f"aspect ratio too extreme: {max(im.width for im in images)} px wide")
        return ["Score: 9" if "circle" in c else "Score: 2" for c in captions]


def test_judge_stage_batch_rows_kept_or_not_and_refused_images(tmp_path):
    from pipeline.core.schema import JUDGEMENT_SCHEMA
    from pipeline.stages.dpo_pairs.judging import JudgeStage, Raw, Sample
    from pipeline.stages.dpo_pairs.pairs import PairsConfig

    stage = JudgeStage(PairsConfig(output=str(tmp_path), judge_backend="shapes"))
    stage.judge = RefusingJudge()
    items = [
        Sample(Raw(f"r{i}", f"src{i}", caption, b"bytes%d" % i, {}), 6.5, None, noise(i, (w, 40)))
        for i, (caption, w) in enumerate([("a red circle", 40), ("a star", 40), ("a blue circle", 200)])
    ]
    out = stage.process(items)
    assert out.rows.schema.equals(JUDGEMENT_SCHEMA)
    rows = out.rows.to_pylist()
    assert [(r["id"], r["kept"], r["reason"], r["judge_answer"]) for r in rows] == [
        ("r0", True, "", "Score: 9"),
        ("r1", False, "judge_rejected", "Score: 2"),
    ]
    assert rows[0]["image"] == b"bytes0" and rows[0]["aesthetic"] == 6.5 and rows[0]["judge"] == "stub"
    assert rows[1]["judge_score"] == pytest.approx(0.2) and "Score: 2" in rows[1]["detail"]
    (refused,) = out.rejects  # the batch was retried one by one: only the refused image is lost
    assert (refused.id, refused.source, refused.reason) == ("r2", "src2", "judge_error")
    assert "aspect ratio too extreme: 200 px wide" in refused.detail
