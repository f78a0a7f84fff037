"""Write the spec lists of the learnability sweep (bench/learn_sweep.py) as runs/learn2/specs<N>.json.

python bench/learn_specs.py 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

K = 1000
SWEEP1_SAMPLING = [[64, 0.5, 3.0, "linear"], [64, 1.0, 3.0, "linear"], [64, 0.25, 3.0, "linear"],
                   [16, 0.5, 3.0, "linear"], [64, 0.5, 1.0, "linear"], [64, 0.5, 6.0, "linear"],
                   [64, 0.5, 3.0, "constant"]]  # fmt: skip
EVAL_GPU = [25 * K, 50 * K, 100 * K, 150 * K]
EVAL_CPU = [40 * K, 80 * K, 120 * K]


def recipe(**kw):
    """The first-guess recipe: batch 16, sin-cos positional init, cosine decay."""
    return {"batch": 16, "lr": 1e-3, "warmup": 500, "pos": "sincos", "sched": "cos", "min_lr": 0.05} | kw


def sweep1() -> dict:
    W192 = {f"{s}_{k}": v for s in ("encoder", "decoder", "cross") for k, v in (("dim", 192), ("heads", 6))}
    gpu = [
        {"name": "g_base", "warmup": 200},
        recipe(name="g_R", final_sampling=SWEEP1_SAMPLING),
        {"name": "g_b16", "batch": 16, "warmup": 500},
        {"name": "g_b16_sc", "batch": 16, "warmup": 500, "pos": "sincos"},
        recipe(name="g_R_b8", batch=8, lr=7e-4, warmup=1000),
        recipe(name="g_R_b32", batch=32, lr=1.5e-3, warmup=300),
        recipe(name="g_R_lr2", lr=2e-3),
        recipe(name="g_R_res48", res=48),
        recipe(name="g_R_mul4", set={"diffusion_batch_mul": 4}),
        recipe(name="g_R_e4", set={"encoder_depth": 4}),
        recipe(name="g_R_k4", n_train=10000, k_img=4),
        recipe(name="g_R_canon", canon_frac=0.3),
        recipe(name="g_R_eps", set={"prediction": "eps", "learn_sigma": False}),
        recipe(name="g_R_lr05", lr=5e-4),
        recipe(name="g_R_big", world={"size_ranges": {1: [0.4, 0.7], 2: [0.34, 0.42], 3: [0.3, 0.36], 4: [0.3, 0.36]}}),
        recipe(name="g_R_w192", set=W192),
        recipe(name="g_R_mr03", set={"mask_ratio_min": 0.3}),
        recipe(name="g_R_head", set={"head_width": 256, "head_depth": 4}),
        recipe(name="g_R_vns", set={"learn_sigma": False}),
        recipe(name="g_R_flat", world={"flat_bg": True}),
        recipe(name="g_R_ema", sched="const", ema=0.999),
    ]
    for s in gpu:
        s.setdefault("eval_at", EVAL_GPU)
    probe = lambda name, **kw: {"name": name, "seconds": 25, "n_train": 2000} | kw  # noqa: E731
    cpu = [
        probe("p_base_b64"),
        probe("p_R_b16", **recipe()),
        probe("p_R_b8", **recipe(batch=8)),
        probe("p_R_b32", **recipe(batch=32)),
        probe("p_R_mul4", **recipe(set={"diffusion_batch_mul": 4})),
        probe("p_R_res48", **recipe(res=48)),
        probe("p_R_e4", **recipe(set={"encoder_depth": 4})),
        probe("p_R_w192", **recipe(set=W192)),
        recipe(name="c_R", eval_at=EVAL_CPU, final_n_eval=120),
        {"name": "c_base", "warmup": 200, "eval_at": EVAL_CPU, "final_n_eval": 120},
        recipe(name="c_R_b8", batch=8, lr=7e-4, warmup=1000, eval_at=EVAL_CPU, final_n_eval=120),
        recipe(name="c_R_b4", batch=4, lr=5e-4, warmup=2000, eval_at=EVAL_CPU, final_n_eval=120),
    ]
    return {"gpu": gpu, "cpu": cpu}


def sweep2() -> dict:
    """Second call: every run uses sin-cos init + cosine decay ending at its budget (112k images at b16 is
    about 11 CPU-minutes on the 2-core box); one factor at a time around h_R, evaluated at 40k/80k/end."""
    ev = {"eval_at": [40 * K, 80 * K], "images": 112 * K}
    big = {"size_ranges": {1: [0.4, 0.7], 2: [0.34, 0.42], 3: [0.3, 0.36], 4: [0.3, 0.36]}}
    samp = [[64, 0.5, 3.0, "linear"], [64, 1.0, 3.0, "linear"], [64, 0.25, 3.0, "linear"], [64, 0.5, 5.0, "linear"],
            [64, 0.5, 1.5, "linear"]]  # fmt: skip
    gpu = [
        recipe(name="h_R", final_sampling=samp, final_n_eval=240, **ev),
        recipe(name="h_lr2", lr=2e-3, **ev),
        recipe(name="h_b32", batch=32, lr=2e-3, warmup=300, **(ev | {"images": 142 * K})),
        recipe(name="h_mul4", set={"diffusion_batch_mul": 4}, **ev),
        recipe(name="h_e4", set={"encoder_depth": 4}, **ev),
        recipe(name="h_e4c1", set={"encoder_depth": 4, "cross_depth": 1}, **ev),
        recipe(name="h_res48", res=48, **ev),
        recipe(name="h_canon", canon_frac=0.3, **ev),
        recipe(name="h_big", world=big, **ev),
        recipe(name="h_mr03", set={"mask_ratio_min": 0.3}, **ev),
        recipe(name="h_vns", set={"learn_sigma": False}, **ev),
        recipe(name="h_k4", n_train=10000, k_img=4, **ev),
        recipe(name="h_combo", lr=2e-3, canon_frac=0.3, set={"diffusion_batch_mul": 2}, **ev),
    ]
    probe = lambda name, **kw: {"name": name, "seconds": 20, "n_train": 2000} | kw  # noqa: E731
    cpu = [
        probe("q_b64"), probe("q_b32", **recipe(batch=32)), probe("q_b16", **recipe()),
        probe("q_b8", **recipe(batch=8)), probe("q_mul4", **recipe(set={"diffusion_batch_mul": 4})),
        probe("q_e4", **recipe(set={"encoder_depth": 4})),
        probe("q_e4c1", **recipe(set={"encoder_depth": 4, "cross_depth": 1})),
        probe("q_res48", **recipe(res=48)), probe("q_mul2", **recipe(set={"diffusion_batch_mul": 2})),
        probe("q_b16b", **recipe()), probe("q_b64b"), probe("q_b32b", **recipe(batch=32)),
    ]  # fmt: skip
    return {"gpu": gpu, "cpu": cpu}


def sweep3() -> dict:
    """sweep2 cut to fit a short call: budgets 64k images at b16 (80k at b32), evaluations at 32k and the end."""
    sp = sweep2()
    for s in sp["gpu"]:
        s["images"] = 80 * K if s["batch"] == 32 else 64 * K
        s["eval_at"] = [32 * K]
        if s["name"] == "h_R":
            s["final_sampling"] = s["final_sampling"][:4]
    sp["cpu"] = sp["cpu"][:8]
    return sp


def sweep4() -> dict:
    """What the second, short device call ran (budget ran low): sweep2's GPU runs cut to 32k images
    (40k at b32), evaluated at 16k and the end on 120 prompts; 13 GPU workers, no CPU probes."""
    sp = sweep2()
    for s in sp["gpu"]:
        s.update(images=40 * K if s["batch"] == 32 else 32 * K, eval_at=[16 * K], final_n_eval=120,
                 final_sampling=None)  # fmt: skip
    sp["cpu"] = []
    return sp


if __name__ == "__main__":
    n = sys.argv[1] if len(sys.argv) > 1 else "1"
    specs = {"1": sweep1, "2": sweep2, "3": sweep3, "4": sweep4}[n]()
    path = Path(f"runs/learn2/specs{n}.json")
    path.write_text(json.dumps(specs, indent=1))
    print(path, {k: len(v) for k, v in specs.items()})
