"""`lightgen plan RECIPE.yaml --gpu h100 --gpus 8`: what a recipe costs, from FLOPs counted on the meta device.

A recipe (``conf/recipes/paper.yaml``) lists stages. Each stage is one of the dry runs (``synthesize``,
``encode``, ``pairs``, ``train``, ``sample``) with its settings and an item count (images, pairs or steps x
global batch); a stage may instead state ``flops_per_item`` (no dry run). Per stage: FLOPs per item x items /
(GPU peak x utilisation) = GPU-hours; wall-clock on N GPUs = GPU-hours / N (perfect data parallelism assumed);
memory per GPU from the dry run and whether it fits. Utilisation per kind of work comes from measurements
(`CALIBRATION`, see ``calibration_points``), unless a stage states its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    """bf16 dense peak (FLOP/s) and memory (GiB as torch reports it) of one GPU."""

    name: str
    peak_flops: float
    memory_gib: float
    source: str


GPUS = {
    "a100": GPU("A100 80GB SXM", 312e12, 79.2, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense; 80 GB HBM2e"),
    "h100": GPU(
        "H100 80GB SXM", 989e12, 79.2, "NVIDIA H100 datasheet: 1979 TFLOPS bf16 with sparsity = 989 dense; 80 GB HBM3"
    ),
    "h200": GPU(
        "H200 141GB SXM", 989e12, 139.8, "NVIDIA H200 datasheet: same compute as H100 SXM (989 dense); 141 GB HBM3e"
    ),
}
KINDS = ("synthesize", "encode", "pairs", "train", "sample")


@dataclass
class Stage:
    """One row of a recipe."""

    name: str
    kind: str
    items: float
    settings: dict[str, Any] = field(default_factory=dict)
    flops_per_item: float | None = None
    utilisation: float | None = None
    note: str = ""


def load_recipe(path: str | Path) -> tuple[list[Stage], dict[str, Any]]:
    """Stages and the recipe's other keys (``paper_gpu_days``, notes); errors name the bad stage."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict):
        raise ValueError(f"{path}: a recipe is a mapping with a 'stages' mapping")
    stages = []
    for name, s in doc["stages"].items():
        s = dict(s)
        kind = s.pop("kind", None)
        if kind not in KINDS:
            raise ValueError(f"{path}: stage {name!r} has kind {kind!r}; expected one of {KINDS}")
        if "items" not in s and not {"steps", "global_batch"} <= set(s):
            raise ValueError(f"{path}: stage {name!r} needs items, or steps and global_batch")
        items = s.pop("items", None) or s["steps"] * s["global_batch"]
        fpi, util, note = s.pop("flops_per_item", None), s.pop("utilisation", None), s.pop("note", "")
        stages.append(Stage(name, kind, float(items), s, fpi, util, note))
    return stages, {k: v for k, v in doc.items() if k != "stages"}


@dataclass
class Row:
    """A stage's figures on one GPU type and count."""

    stage: Stage
    flops_per_item: float
    utilisation: float
    util_source: str
    gpu_hours: float
    wall_hours: float
    memory_gib: float | None
    fits: bool | None
    memory_mode: str = ""  # ddp / fsdp2 for training stages


def cost_row(
    stage: Stage, flops_per_item: float, util: float, source: str, gpu: GPU, gpus: int, memory_gib: float | None
) -> Row:
    """GPU-hours = items x FLOPs per item / (peak x utilisation) / 3600; wall-clock = GPU-hours / gpus."""
    hours = stage.items * flops_per_item / (gpu.peak_flops * util) / 3600
    fits = None if memory_gib is None else memory_gib <= gpu.memory_gib
    return Row(stage, flops_per_item, util, source, hours, hours / gpus, memory_gib, fits)


def measure_stage(stage: Stage, gpus: int) -> tuple[float, float | None, str]:
    """(FLOPs per item, memory per GPU in GiB, ddp / fsdp2 or "") from the stage's dry run on the meta device."""
    from lightgen import plan_runs

    return plan_runs.run(stage.kind, stage.settings, gpus)


def plan(stages: list[Stage], gpu_name: str, gpus: int, utilisation: dict[str, tuple[float, str]]) -> list[Row]:
    """One `Row` per stage; stated ``flops_per_item`` skip the dry run (memory then unknown)."""
    if gpu_name not in GPUS:
        raise ValueError(f"unknown --gpu {gpu_name!r}; choose from {sorted(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    gpu, rows = GPUS[gpu_name], []
    for s in stages:
        flops, mem, mode = (s.flops_per_item, None, "") if s.flops_per_item is not None else measure_stage(s, gpus)
        util, source = (s.utilisation, "stated in the recipe") if s.utilisation else utilisation[s.kind]
        rows.append(cost_row(s, flops, util, source, gpu, gpus, mem))
        rows[-1].memory_mode = mode
    return rows


def _num(x: float) -> str:
    """3 significant digits with a k/M/G/T/P suffix."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    """Wall-clock: minutes below an hour, hours below two days, then days."""
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


def _gpu_hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"


def format_table(rows: list[Row], gpu_name: str, gpus: int, meta: dict[str, Any]) -> str:
    """The plan as a Markdown table, the totals, and the paper's own figure beside them."""
    gpu = GPUS[gpu_name]
    head = (
        f"| stage | items | FLOP/item | utilisation (source) | GPU-hours | wall-clock on {gpus} | memory/GPU | fits |"
    )
    lines = [
        f"{gpu.name} x {gpus} (bf16 dense peak {gpu.peak_flops / 1e12:.0f} TFLOP/s, {gpu.memory_gib} GiB)",
        "",
        head,
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        mem = (
            "—"
            if r.memory_gib is None
            else f"{r.memory_gib:.1f} GiB" + (f" ({r.memory_mode})" if r.memory_mode else "")
        )
        fits = "—" if r.fits is None else ("yes" if r.fits else "**no**")
        lines.append(
            f"| {r.stage.name} | {_num(r.stage.items)} | {_num(r.flops_per_item)} | {r.utilisation:.1%} "
            f"({r.util_source}) | {_gpu_hours(r.gpu_hours)} | {_hours(r.wall_hours)} | {mem} | {fits} |"
        )
    total = sum(r.gpu_hours for r in rows)
    lines.append(f"| **total** | | | | **{total:,.0f}** | **{_hours(total / gpus)}** | | |")
    pre = [r for r in rows if r.stage.name in meta.get("paper_pretraining_stages", [])]
    if pre and "paper_gpu_days" in meta:
        days = sum(r.gpu_hours for r in pre) / 24
        a100 = days * gpu.peak_flops / GPUS["a100"].peak_flops  # at the same utilisation
        same = "" if gpu_name == "a100" else f" = {a100:,.1f} A100-days at the same utilisation"
        lines += [
            "",
            f"Pretraining ({' + '.join(r.stage.name for r in pre)}): {days:,.1f} {gpu_name.upper()}-days"
            f"{same}; the paper: {meta['paper_gpu_days']} A100-days.",
        ]
    lines.append(f"All stages: {total / 24:,.1f} {gpu_name.upper()}-days.")
    return "\n".join(lines)


def accum_for(global_batch: int, micro: int, gpus: int) -> int:
    """Gradient-accumulation steps that reach ``global_batch`` with ``micro`` per GPU on ``gpus`` (rounded up)."""
    return max(1, math.ceil(global_batch / (micro * gpus)))


def run_plan(
    recipe: str | Path, gpu: str, gpus: int, cache: str | Path | None = None, calibration: bool = False
) -> str:
    """The plan's table (and, if asked, the calibration points) for a recipe file."""
    from lightgen import plan_runs

    plan_runs.use_cache(cache)
    stages, meta = load_recipe(recipe)
    util: dict[str, tuple[float, str]] = {}
    if any(s.utilisation is None for s in stages):
        from lightgen.calibration import utilisation

        util = utilisation()
    text = format_table(plan(stages, gpu, gpus, util), gpu, gpus, meta)
    if calibration:
        from lightgen.calibration import calibration_points, format_points

        text += "\n\nCalibration (utilisation = items/s x counted FLOPs / 989 TFLOP/s):\n\n"
        text += format_points(calibration_points())
    return text
