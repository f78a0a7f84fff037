"""Utilisation figures for `lightgen plan`, from measured throughputs and FLOPs counted on the meta device.

Each measured point: a throughput on one H100 (ours in BENCHMARKS.md, public ones with their source) and the
same work's FLOPs per item counted by a dry run. MFU = items/s x FLOPs per item / 989 TFLOP/s. The plan uses, per
kind of work, the utilisation named in `KIND_SOURCE`; every point is then predicted back with the utilisation
the plan would use, beside its measurement (a point that sets its kind's figure alone is exact by construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightgen.plan import GIB, GPUS
from lightgen.plan_runs import remembered

H100 = GPUS["h100"].peak_flops


@dataclass(frozen=True)
class Point:
    """A measured throughput (items/s on one H100) and where it comes from."""

    name: str
    kind: str  # train | teacher | sample
    items_per_s: float
    source: str


POINTS = (
    Point(
        "ours: lightgen 0.79 B train, 256 px, batch 64, compile",
        "train",
        239.4,
        "BENCHMARKS.md, 2026-11-23, H100 80GB HBM3 (bench/train_bench.py --compile)",
    ),
    Point(
        "MAR-L train, 256 px, cached latents",
        "train",
        254.0,
        "github.com/LTH14/mar README training schedule (≈ 254 img/s per H100; the figure as quoted to us, not re-derived here)",
    ),
    Point(
        "Flux-dev 1024², 28 steps, bf16, batch 1",
        "teacher",
        1 / 7.1,
        "a public diffusers figure as quoted to us: ≈ 7.1 s per image on one H100 (not re-measured here)",
    ),
    Point(
        "ours: lightgen generate 256 px, 64 it., CFG 4, batch 256",
        "sample",
        8.8,
        "BENCHMARKS.md, H100 (bench/model_bench.py --no-train --sample-batch 256)",
    ),
    Point(
        "ours: lightgen generate 256 px, 64 it., CFG 4, batch 64",
        "sample",
        2.7,
        "BENCHMARKS.md, H100 (bench/model_bench.py --no-train --sample-batch 64)",
    ),
)
# The plan's utilisation per recipe kind: the mean MFU of the points of that kind of work. VAE and T5 encoding
# have no measured point: they take the Flux figure (bf16 inference of large matmuls). Sampling takes the batch-256
# point only (the batch-64 one shows how much the batch matters there).
KIND_SOURCE = {"train": "train", "synthesize": "teacher", "encode": "teacher", "pairs": "sample", "sample": "sample"}
KIND_SOURCE_INV = {"train": "train", "synthesize": "teacher", "sample": "sample"}
FIT_POINTS = {"sample": ("ours: lightgen generate 256 px, 64 it., CFG 4, batch 256",)}
MEASURED_MEMORY_GIB = 57.9  # BENCHMARKS.md: model_bench --batch 64, forward + backward + fused AdamW, one H100


def _train_flops(name: str) -> dict[str, Any]:
    """FLOPs per image of a training point: ours at the benchmark's text length (6-12 tokens: 9), or MAR-L's
    shape in our network (16+16 blocks of 1024, no text stack, 64 buffer tokens, head 3 x 1024, KL-16 tokens)."""
    from lightgen import plan_runs

    if name.startswith("ours"):
        s = {"config": "conf/lightgen_256.yaml", "overrides": ["data.batch_size=64"], "text_len": 9}
    else:
        mar = (
            "{latent_channels: 16, vae_stride: 16, patch_size: 1, cross: {depth: 0}, text_aligner_depth: 0, "
            "text_dim: 16, max_text_len: 1, buffer_size: 64, head_width: 1024, head_depth: 3}"
        )
        s = {"config": "conf/lightgen_256.yaml", "overrides": ["data.batch_size=64", f"model.overrides={mar}"]}
    return remembered({"kind": "train", "gpus": 1, **s}, lambda: plan_runs.train(s, 1))


def flops_per_item(p: Point) -> float:
    """The point's FLOPs per item, counted on the meta device."""
    from lightgen import plan_runs

    if p.kind == "train":
        return _train_flops(p.name)["flops_fwd_bwd_per_item"]
    if p.kind == "teacher":
        s = {"model": "FLUX.1-dev", "resolution": 1024, "steps": 28, "batch_size": 1}
        return remembered({"kind": "synthesize", **s}, lambda: plan_runs.synthesize(s))["flops_per_item"]
    s = {"model": "lightgen", "resolution": 256, "steps": 64, "cfg": 4.0, "batch_size": 8}
    gen = remembered({"kind": "sample", **s}, lambda: plan_runs.sample(s))
    return gen["items"]["lightgen.generate"]["flops_per_item"]  # the benchmark times generate alone


def utilisation() -> dict[str, tuple[float, str]]:
    """Recipe kind -> (utilisation, where it comes from)."""
    mfu: dict[str, list[float]] = {}
    for p in POINTS:
        if p.kind in FIT_POINTS and p.name not in FIT_POINTS[p.kind]:
            continue
        mfu.setdefault(p.kind, []).append(p.items_per_s * flops_per_item(p) / H100)
    label = {
        "train": "mean MFU of our 256-px training and MAR-L",
        "teacher": "Flux-dev on H100",
        "sample": "our sampling at batch 256",
    }
    return {k: (sum(mfu[v]) / len(mfu[v]), label[v]) for k, v in KIND_SOURCE.items()}


def calibration_points() -> list[dict[str, Any]]:
    """Each point's measured and predicted items/s (with the plan's utilisation) and the error; and the memory."""
    util = {KIND_SOURCE_INV[k]: v[0] for k, v in utilisation().items() if k in KIND_SOURCE_INV}
    rows = []
    for p in POINTS:
        f = flops_per_item(p)
        pred = util[p.kind] * H100 / f
        rows.append(
            {
                "point": p.name,
                "source": p.source,
                "flops_per_item": f,
                "measured": p.items_per_s,
                "predicted": pred,
                "error": pred / p.items_per_s - 1,
                "mfu": p.items_per_s * f / H100,
            }
        )
    ours = _train_flops(POINTS[0].name)
    params = ours["parameters"]
    pred_mem = (params * (4 + 4 + 8 + 2) + ours["peak_activation_bytes"]) / GIB  # no EMA, no DDP in that bench
    rows.append(
        {
            "point": "ours: peak memory, train step, batch 64, one H100 (GiB)",
            "source": "BENCHMARKS.md (bench/model_bench.py --batch 64)",
            "measured": MEASURED_MEMORY_GIB,
            "predicted": pred_mem,
            "error": pred_mem / MEASURED_MEMORY_GIB - 1,
        }
    )
    return rows


def format_points(rows: list[dict[str, Any]]) -> str:
    """The calibration points as a Markdown table."""
    out = [
        "| measured point (one H100) | FLOP/item (counted) | MFU | measured | plan predicts | error | source |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        f = f"{r['flops_per_item'] / 1e12:.3g} T" if "flops_per_item" in r else "—"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "—"
        out.append(
            f"| {r['point']} | {f} | {mfu} | {r['measured']:.3g} | {r['predicted']:.3g} | "
            f"{r['error']:+.1%} | {r['source']} |"
        )
    return "\n".join(out)
