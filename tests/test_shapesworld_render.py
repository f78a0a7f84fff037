"""The ShapesWorld teacher: determinism, layouts that honour the metadata, legibility at 32 px, batches (its
speed: `bench/render_bench.py`)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shapesworld.render import BORDER, GAP, SIZE_RANGES, ShapesTeacher, render_folder
from shapesworld.score import relative_position
from shapesworld.world import COLORS, generate_prompts, make_scene

RECORDS = generate_prompts(600, 11, diversity=1.0)


def test_deterministic_per_seed_and_resolution_independent_layout() -> None:
    teacher = ShapesTeacher(64)
    meta = RECORDS[4]
    assert np.array_equal(teacher(meta, 7), teacher(meta, 7))
    assert not np.array_equal(teacher(meta, 7), teacher(meta, 8))
    assert ShapesTeacher(32).layout(meta, 7) == ShapesTeacher(512).layout(meta, 7)


@pytest.mark.parametrize("res", [32, 100, 1024])
def test_output_shape_dtype_and_pil(res: int) -> None:
    teacher = ShapesTeacher(res)
    img = teacher(RECORDS[0], 0)
    assert img.shape == (res, res, 3) and img.dtype == np.uint8
    pil = teacher.image(RECORDS[0], 0)
    assert pil.mode == "RGB" and pil.size == (res, res)
    batch = teacher.batch(RECORDS[:3], [0, 1, 2])
    assert batch.shape == (3, res, res, 3) and np.array_equal(batch[0], img)


@pytest.mark.parametrize("res", [16, 2048])
def test_rejects_unsupported_resolution(res: int) -> None:
    with pytest.raises(ValueError, match=str(res)):
        ShapesTeacher(res)


def test_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match="'hexagon'"):
        ShapesTeacher(32)({"tag": "single_object", "include": [{"class": "hexagon", "count": 1}]}, 0)


def test_layout_honours_metadata() -> None:
    """Exact counts and classes, requested colors, objects inside the frame, never closer than GAP."""
    teacher = ShapesTeacher(32)
    for i, meta in enumerate(RECORDS):
        objects = teacher.layout(meta, i)
        want = Counter({e["class"]: e["count"] for e in meta["include"]})
        assert Counter(o.shape for o in objects) == want
        for entry in meta["include"]:
            if "color" in entry:
                assert [o.color for o in objects if o.shape == entry["class"]] == [entry["color"]]
        for o in objects:
            x0, y0, x1, y1 = o.box()
            assert min(x0, y0) >= BORDER - 1e-9 and max(x1, y1) <= 1 - BORDER + 1e-9
            assert o.size * 32 >= 9.5  # legible at 32 px
        for a in objects:
            for b in objects:
                if a is not b:
                    reach = (a.size + b.size) / 2 + GAP - 1e-9
                    assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def test_positions_hold_under_geneval_rule() -> None:
    """The subject stands in exactly the requested relation to the target, by GenEval's own rule."""
    from shapesworld.score import Detection

    teacher = ShapesTeacher(256)
    for i, meta in enumerate(r for r in RECORDS if r["tag"] == "position"):
        target, subject = teacher.layout(meta, i)
        dets = [Detection(o.shape, o.color, tuple(round(v * 256) for v in o.box()), 1.0, 1) for o in (target, subject)]
        assert relative_position(dets[1], dets[0]) == {meta["include"][1]["position"][0]}


def test_size_adjectives_are_honoured() -> None:
    """ "small" objects come from the bottom of the size range, "large" ones from the top."""
    teacher = ShapesTeacher(64)
    lo, hi = SIZE_RANGES[2]
    meta = make_scene("two_object", ["circle", "cross"])
    meta["include"][0]["size"], meta["include"][1]["size"] = "small", "large"
    small, large = zip(*((o.size for o in teacher.layout(meta, seed)) for seed in range(50)), strict=True)
    assert max(small) <= lo + 0.35 * (hi - lo) + 1e-9
    assert min(large) >= hi - 0.35 * (hi - lo) - 1e-9


def test_background_is_light_neutral_and_not_flat() -> None:
    img = ShapesTeacher(64)(make_scene("single_object", ["circle"]), 3).astype(float)
    corner = img[:8, :8].reshape(-1, 3)
    assert corner.min() > 190 and (corner.max(1) - corner.min(1)).max() < 30  # light and near-gray
    frame = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3)])
    assert frame.std(0).max() > 1.0  # gradient + noise, not a constant
    palette = np.array(list(COLORS.values()), dtype=float)
    assert np.linalg.norm(corner[:, None] - palette[None], axis=-1).min() > 150


def test_batch_is_the_single_renders_stacked() -> None:
    """What the speed benchmark times (`bench/render_bench.py`: >= 200 img/s at 64 px on one core) renders the same
    images as one call per scene; the wall-clock floor lives there, not in a test a busy machine could fail."""
    teacher = ShapesTeacher(64)
    seeds = list(range(100, 120))
    batch = teacher.batch(RECORDS[:20], seeds)
    assert batch.shape == (20, 64, 64, 3) and batch.dtype == np.uint8
    assert all(np.array_equal(batch[i], teacher(RECORDS[i], s)) for i, s in enumerate(seeds))
    assert len({b.tobytes() for b in batch}) == 20  # 20 different scenes
    with pytest.raises(ValueError, match="20 metadata records but 19 seeds"):
        teacher.batch(RECORDS[:20], seeds[:19])


def test_render_benchmark_runs_and_reports_a_rate(capsys) -> None:
    """The benchmark's entry point on a few images: a JSON line with the rate; --min-rate fails below it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import render_bench

    assert render_bench.main(["--images", "4", "--warmup", "1", "--repeat", "1", "--resolution", "32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 4 and report["images_per_second"] > 0
    assert render_bench.main(["--images", "2", "--warmup", "1", "--repeat", "1", "--min-rate", "1e12"]) == 1


def test_render_folder_layout(tmp_path) -> None:
    records = RECORDS[:3]
    assert render_folder(records, tmp_path, 32, samples=2, seed=5) == 6
    for p, meta in enumerate(records):
        folder = tmp_path / f"{p:05d}"
        assert (folder / "metadata.jsonl").read_text().count("\n") == 1
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta
        pngs = sorted(x.name for x in (folder / "samples").iterdir())
        assert pngs == ["0000.png", "0001.png"]
        img = Image.open(folder / "samples" / "0001.png")
        assert img.mode == "RGB" and img.size == (32, 32)
    first = (tmp_path / "00001" / "samples" / "0000.png").read_bytes()
    render_folder(records, tmp_path, 32, samples=2, seed=5)
    assert (tmp_path / "00001" / "samples" / "0000.png").read_bytes() == first
