"""The ShapesWorld scorer: ~1 on the teacher's renders, ~0 on noise and blanks, rejects wrong renders."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from shapesworld.render import ShapesTeacher, _background, render_folder
from shapesworld.score import (
    Detection,
    detect_objects,
    evaluate,
    format_summary,
    relative_position,
    score_folder,
    score_image,
    summarize,
)
from shapesworld.world import CATEGORIES, COLORS, SHAPES, generate_prompts, make_scene, mirror_relation

PER_CATEGORY = 50
RECORDS = generate_prompts(PER_CATEGORY * len(CATEGORIES), seed=2024, diversity=1.0)


def _accuracy(records: list[dict], images: list[np.ndarray]) -> dict[str, float]:
    hits = defaultdict(list)
    for meta, img in zip(records, images, strict=True):
        hits[meta["tag"]].append(score_image(img, meta).correct)
    return {tag: float(np.mean(v)) for tag, v in hits.items()}


@pytest.mark.parametrize("res", [32, 64, 256])
def test_teacher_renders_score_near_one(res: int) -> None:
    teacher = ShapesTeacher(res)
    images = [teacher(meta, 10_000 + i) for i, meta in enumerate(RECORDS)]
    acc = _accuracy(RECORDS, images)
    assert set(acc) == set(CATEGORIES)
    assert min(acc.values()) >= 0.98, acc


def _degrade(img: np.ndarray, seed: int) -> np.ndarray:
    """What an imperfect generator produces: ~1 px blur (at 32 px) and pixel noise."""
    sigma = img.shape[0] / 32
    x = ndimage.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0))
    x += np.random.default_rng(seed).normal(0, 15, img.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_tolerates_blur_and_noise() -> None:
    teacher = ShapesTeacher(32)
    images = [_degrade(teacher(meta, i), i) for i, meta in enumerate(RECORDS)]
    assert min(_accuracy(RECORDS, images).values()) >= 0.9


@pytest.mark.parametrize("res", [32, 64, 256])
def test_noise_and_blank_images_score_near_zero(res: int) -> None:
    rng = np.random.default_rng(res)
    palette = [*COLORS.values(), (128, 128, 128), (0, 0, 0), (255, 255, 255)]
    makers = [
        lambda: rng.integers(0, 256, (res, res, 3), dtype=np.uint8),  # uniform noise
        lambda: np.clip(_background(rng, res), 0, 255).astype(np.uint8),  # background only
        lambda: np.full((res, res, 3), palette[rng.integers(len(palette))], dtype=np.uint8),  # constant
    ]
    for make in makers:
        correct = [score_image(make(), meta).correct for meta in RECORDS[:60]]
        assert np.mean(correct) <= 0.05


def _wrong(meta: dict, how: str) -> dict:
    """The metadata of a deliberately wrong render for `meta`."""
    bad = json.loads(json.dumps(meta))
    inc = bad["include"]
    if how == "color":  # another color for the first object; for two colors, swap them between objects
        if len(inc) == 2:
            inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
        else:
            inc[0]["color"] = next(c for c in COLORS if c != inc[0]["color"])
    elif how == "count":
        inc[0]["count"] += -1 if inc[0]["count"] == 4 else 1
    elif how == "shape":
        others = [s for s in SHAPES if s not in {e["class"] for e in inc}]
        inc[0]["class"] = others[0]
    elif how == "position":
        bad = mirror_relation(bad)
    bad.pop("exclude", None)
    return bad


@pytest.mark.parametrize(
    ("how", "tags"),
    [
        ("color", ("colors", "color_attr")),
        ("count", ("counting",)),
        ("position", ("position",)),
        ("shape", ("single_object", "two_object", "colors")),
    ],
)
@pytest.mark.parametrize("res", [32, 64])
def test_deliberately_wrong_renders_are_rejected(how: str, tags: tuple[str, ...], res: int) -> None:
    teacher = ShapesTeacher(res)
    records = [m for m in RECORDS if m["tag"] in tags]
    verdicts = [score_image(teacher(_wrong(m, how), i), m).correct for i, m in enumerate(records)]
    assert np.mean(verdicts) <= 0.02


def test_count_minus_one_is_rejected_too() -> None:
    teacher = ShapesTeacher(32)
    for i, meta in enumerate(m for m in RECORDS if m["tag"] == "counting"):
        fewer = json.loads(json.dumps(meta))
        fewer["include"][0]["count"] -= 1
        fewer.pop("exclude")
        assert not score_image(teacher(fewer, i), meta).correct


def _drawn(*parts: tuple[str, tuple, tuple]) -> np.ndarray:
    """A 64-px image of PIL primitives (kind, coords, fill) on a light gray background."""
    img = Image.new("RGB", (64, 64), (228, 228, 228))
    draw = ImageDraw.Draw(img)
    for kind, xy, fill in parts:
        getattr(draw, kind)(xy, fill=fill)
    return np.asarray(img)


BG, RED = (228, 228, 228), COLORS["red"]
NON_SHAPES = {
    "L": [("rectangle", (10, 10, 20, 50), RED), ("rectangle", (10, 40, 50, 50), RED)],
    "ring": [("ellipse", (10, 10, 50, 50), RED), ("ellipse", (20, 20, 40, 40), BG)],
    "crescent": [("ellipse", (10, 10, 50, 50), RED), ("ellipse", (22, 6, 58, 46), BG)],
    "T": [("rectangle", (8, 10, 56, 22), RED), ("rectangle", (26, 10, 38, 54), RED)],
    "star": [
        (
            "polygon",
            [(32, 6), (38, 24), (58, 24), (42, 36), (48, 56), (32, 44), (16, 56), (22, 36), (6, 24), (26, 24)],
            RED,
        )
    ],
    "bar": [("rectangle", (8, 28, 56, 36), RED)],
    "two-colored square": [("rectangle", (12, 12, 31, 50), RED), ("rectangle", (32, 12, 50, 50), COLORS["green"])],
}


@pytest.mark.parametrize("name", sorted(NON_SHAPES))
def test_blobs_that_are_no_shape_are_not_detected(name: str) -> None:
    assert detect_objects(_drawn(*NON_SHAPES[name])) == []


def _det(shape: str, box: tuple[int, int, int, int], color: str = "red", conf: float = 0.9) -> Detection:
    return Detection(shape, color, box, conf, 1)


def test_relative_position_matches_geneval() -> None:
    a = _det("circle", (0, 0, 10, 10))
    assert relative_position(a, _det("square", (20, 0, 30, 10))) == {"left of"}
    assert relative_position(a, _det("square", (0, 20, 10, 30))) == {"above"}
    assert relative_position(a, _det("square", (20, 20, 30, 30))) == {"left of", "above"}
    # Offsets within 0.1 x (dim_a + dim_b) per axis are no relation at all.
    assert relative_position(a, _det("square", (1, 1, 11, 11))) == set()
    # A mostly vertical offset is not also "left of": 3 - 2 = 1 over a norm of ~20 is < 0.5.
    assert relative_position(_det("circle", (0, 0, 10, 10)), _det("square", (3, 20, 13, 30))) == {"above"}


def test_evaluate_follows_geneval_rules() -> None:
    counting = make_scene("counting", ["circle"], count=2)
    two = [_det("circle", (0, 0, 5, 5)), _det("circle", (10, 0, 15, 5))]
    assert evaluate(two, counting)[0]
    assert not evaluate(two[:1], counting)[0]  # include needs >= count
    three = [*two, _det("circle", (20, 0, 25, 5))]
    ok, reason = evaluate(three, counting)
    assert not ok and "circle<3" in reason  # exclude fails at >= count

    colors = make_scene("colors", ["square"], ["blue"])
    # Only the most confident square is checked, as GenEval checks its top-`count` detections.
    dets = [_det("square", (0, 0, 5, 5), "red", 0.95), _det("square", (9, 9, 14, 14), "blue", 0.9)]
    assert not evaluate(dets, colors)[0]
    assert evaluate(dets[::-1], colors)[0]

    position = make_scene("position", ["circle", "cross"], relation="right of")  # cross right of circle
    circle, cross = _det("circle", (0, 0, 10, 10)), _det("cross", (20, 0, 30, 10))
    assert evaluate([circle, cross], position)[0]
    assert not evaluate([_det("circle", (20, 0, 30, 10)), _det("cross", (0, 0, 10, 10))], position)[0]
    ok, reason = evaluate([cross], position)  # no target: the position clause can't hold
    assert not ok and "no target" in reason


def test_detections_report_class_color_and_box() -> None:
    meta = make_scene("color_attr", ["triangle", "square"], ["green", "purple"])
    teacher = ShapesTeacher(128)
    found = {(d.shape, d.color) for d in detect_objects(teacher(meta, 1))}
    assert found == {("triangle", "green"), ("square", "purple")}
    detection = detect_objects(teacher.image(meta, 1))[0]
    x0, y0, x1, y1 = detection.box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    with pytest.raises(ValueError, match="RGBA"):
        score_image(Image.new("RGBA", (32, 32)), meta)
    with pytest.raises(ValueError, match="float"):
        score_image(np.zeros((32, 32, 3)), meta)


SUMMARY = """Summary
=======
Total images: 6
Total prompts: 2
% correct images: 50.00%
% correct prompts: 50.00%

Task breakdown
==============
counting         = 75.00% (3 / 4)
colors           = 0.00% (0 / 2)

Overall score (avg. over tasks): 0.37500"""


def test_summary_matches_geneval_format() -> None:
    counting, colors = make_scene("counting", ["cross"], count=3), make_scene("colors", ["circle"], ["red"])
    results = [{"tag": "counting", "metadata": counting, "correct": c} for c in (True, True, False, True)]
    results += [{"tag": "colors", "metadata": colors, "correct": False} for _ in range(2)]
    summary = summarize(results)
    assert summary["tasks"]["counting"] == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert format_summary(summary) == SUMMARY


def test_score_folder_reads_geneval_layout(tmp_path: Path) -> None:
    records = RECORDS[:12]
    render_folder(records, tmp_path, 32, samples=2, seed=0)
    # Spoil one sample: a blank image cannot be correct.
    Image.new("RGB", (32, 32), (230, 230, 230)).save(tmp_path / "00003" / "samples" / "0001.png")
    summary = score_folder(tmp_path)
    assert summary["total_images"] == 24 and summary["total_prompts"] == 12
    assert summary["correct_images"] == pytest.approx(23 / 24)
    assert list(summary["tasks"]) == [r["tag"] for r in records[:6]]
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["summary"] == summary and len(saved["images"]) == 24
    bad = [im for im in saved["images"] if not im["correct"]]
    assert len(bad) == 1 and bad[0]["filename"].endswith("00003/samples/0001.png") and bad[0]["reason"]


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (lambda root: (root / "00001" / "metadata.jsonl").write_text("{oops\n"), r"00001/metadata.jsonl:1"),
        (lambda root: Image.new("RGBA", (32, 32)).save(root / "00000/samples/0000.png"), "0000.png: image mode"),
        (lambda root: Image.new("RGB", (32, 16)).save(root / "00000/samples/0000.png"), "0000.png: image size"),
        (lambda root: (root / "00000/samples/0001.png").write_bytes(b"nope"), "0001.png: cannot read"),
    ],
)
def test_score_folder_names_bad_files(tmp_path: Path, spoil, named: str) -> None:
    render_folder(RECORDS[:2], tmp_path, 32, samples=2)
    spoil(tmp_path)
    with pytest.raises(ValueError, match=named):
        score_folder(tmp_path)


def test_score_folder_rejects_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        score_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no GenEval prompt folders"):
        score_folder(tmp_path)
