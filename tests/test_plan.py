"""`lightgen plan`: hand-checkable numbers on a tiny recipe, a dry-run stage, the CLI and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightgen.cli import app
from lightgen.plan import GPUS, load_recipe, plan, run_plan

ROOT = Path(__file__).resolve().parent.parent

TINY = """
paper_gpu_days: 88
paper_pretraining_stages: [pretrain]
stages:
  teacher:
    kind: synthesize
    items: 1000000
    flops_per_item: 4.0e+14
    utilisation: 0.5
  pretrain:
    kind: train
    steps: 1000
    global_batch: 2048
    flops_per_item: 1.0e+12
    utilisation: 0.25
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_tiny_recipe_by_hand(tiny: Path):
    """GPU-hours = items x FLOPs / (peak x utilisation) / 3600, computed here from the recipe's stated inputs."""
    stages, meta = load_recipe(tiny)
    rows = plan(stages, "a100", 4, {})
    peak = 312e12  # A100 bf16 dense
    teacher_h = 1_000_000 * 4.0e14 / (peak * 0.5) / 3600  # = 712.25 GPU-hours
    pretrain_h = 1000 * 2048 * 1.0e12 / (peak * 0.25) / 3600  # = 7.29 GPU-hours
    assert teacher_h == pytest.approx(712.25, abs=0.01)
    assert [r.gpu_hours for r in rows] == pytest.approx([teacher_h, pretrain_h])
    assert [r.wall_hours for r in rows] == pytest.approx([teacher_h / 4, pretrain_h / 4])
    assert rows[1].stage.items == 2_048_000
    text = run_plan(tiny, "a100", 4)
    assert f"**{teacher_h + pretrain_h:,.0f}**" in text  # the total GPU-hours
    assert f"{pretrain_h / 24:,.1f} A100-days; the paper: 88 A100-days" in text


def test_h100_is_faster_than_a100_by_the_peak_ratio(tiny: Path):
    """Same utilisation, same FLOPs: hours scale with 1 / peak."""
    stages, _ = load_recipe(tiny)
    a, h = plan(stages, "a100", 8, {}), plan(stages, "h100", 8, {})
    ratio = GPUS["h100"].peak_flops / GPUS["a100"].peak_flops
    assert a[0].gpu_hours == pytest.approx(h[0].gpu_hours * ratio)


def test_train_stage_runs_the_trainer_dry_run(tmp_path: Path):
    """A train stage without stated FLOPs runs the trainer's dry run: the debug model's memory per GPU fits."""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"stages:\n  t:\n    kind: train\n    config: {ROOT / 'conf/debug.yaml'}\n    steps: 10\n"
        "    global_batch: 64\n    utilisation: 0.1\n"
    )
    stages, _ = load_recipe(path)
    (row,) = plan(stages, "h200", 2, {})
    assert row.flops_per_item > 0 and row.memory_gib is not None and row.fits
    assert row.gpu_hours == pytest.approx(640 * row.flops_per_item / (989e12 * 0.1) / 3600)


def test_cli_prints_the_table_and_refuses_unknown_gpus(tiny: Path):
    """`lightgen plan` prints one row per stage; an unknown --gpu is one error line."""
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(tiny), "--gpu", "h100", "--gpus", "8"])
    assert res.exit_code == 0, res.output
    assert re.search(r"\| teacher \| 1 M \| 400 T \|", res.output) and "H100" in res.output
    res = runner.invoke(app, ["plan", str(tiny), "--gpu", "v100"])
    assert res.exit_code == 2 and "unknown --gpu 'v100'" in res.output


def test_recipe_errors_name_the_stage(tmp_path: Path):
    """A stage of an unknown kind, or without items, is refused with its name."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  x:\n    kind: painting\n    items: 3\n")
    with pytest.raises(ValueError, match="stage 'x' has kind 'painting'"):
        load_recipe(bad)
    bad.write_text("stages:\n  y:\n    kind: train\n")
    with pytest.raises(ValueError, match="stage 'y' needs items"):
        load_recipe(bad)


def test_paper_recipe_loads():
    """conf/recipes/paper.yaml: every stage is well formed; pretraining is 100 k steps x 2048."""
    stages, meta = load_recipe(ROOT / "conf/recipes/paper.yaml")
    by = {s.name: s for s in stages}
    assert by["pretrain_256"].items == 100_000 * 2048 and meta["paper_gpu_days"] == 88
    assert by["synthesize"].items == 2_000_000
