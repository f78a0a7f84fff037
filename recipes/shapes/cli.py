"""The recipe's command line: `python -m recipes.shapes` runs the demo, `--ablation` the data ablation."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import recipes.shapes
from lightgen_model.config import CFG_SCHEDULES, SamplingDefaults
from recipes.shapes.commands import DEFAULT_IMAGES, IDLE_IMAGES_PER_S

COUNTS = ("images", "dpo_steps", "ablation_captions", "ablation_scenes", "curve_points", "heldout", "samples", "pairs")


def add_budget(p: argparse.ArgumentParser) -> None:
    """Where the run goes and how much it trains."""
    p.add_argument("--out", default="runs/demo", help="output folder (rerun with the same folder to resume)")
    idle = DEFAULT_IMAGES / IDLE_IMAGES_PER_S / 60
    p.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        help="pretraining budget in training images (steps = images / global batch, rounded up); "
        f"about {idle:.0f} min on 2 idle CPU cores",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="also stop pretraining after this much training time; the cosine then follows the elapsed "
        "share of it (a slower machine trains less: the model depends on the machine)",
    )
    p.add_argument("--dpo-steps", type=int, default=150, help="DPO budget in optimizer steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun); 1 = plain python")
    p.add_argument("--workers", type=int, default=1, help="Ray workers of the pipeline stages")


def add_data(p: argparse.ArgumentParser) -> None:
    """How much data each stage makes, and the ablation's arms."""
    p.add_argument("--pool", type=int, default=12000, help="ShapesWorld captions drawn (with duplicates)")
    p.add_argument("--captions", type=int, default=6000, help="captions selected for the teacher")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--heldout", type=int, default=120, help="held-out GenEval-style prompts")
    p.add_argument("--samples", type=int, default=4, help="samples (seeds) per held-out prompt")
    p.add_argument("--curve-prompts", type=int, default=48, help="held-out prompts for the score-vs-minutes curve")
    p.add_argument("--curve-points", type=int, default=6, help="checkpoints (curve points) over the budget")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="instead: the data ablation, diverse vs low-diversity captions, same number and image budget",
    )
    p.add_argument("--ablation-captions", type=int, default=3000, help="captions in each arm of the ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ablation: pretraining seeds per arm")
    p.add_argument("--ablation-scenes", type=int, default=4, help="distinct scenes per category in the low arm")
    p.add_argument("--pairs", type=int, default=600, help="DPO pairs to build")


def add_sampling_and_run(p: argparse.ArgumentParser) -> None:
    """Sampling settings (default: the model's recorded ones), seeds, trainer overrides, restart and verbosity."""
    model = "(default: the model's recorded setting)"
    p.add_argument("--num-iter", type=int, help=f"sampling iterations {model}")
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale {model}")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help=f"guidance schedule {model}")
    p.add_argument("--temperature", type=float, help=f"the diffusion head's temperature {model}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-set", nargs="*", default=[], help="extra pretrain overrides section.key=value")
    p.add_argument("--dpo-set", nargs="*", default=[], help="extra DPO overrides section.key=value")
    p.add_argument("--restart", action="store_true", help="delete the output folder first")
    p.add_argument("--verbose", action="store_true", help="also echo Ray / progress-bar lines")


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an empty budget or a bad sampling setting now, not after the pretraining."""
    for name in COUNTS:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    try:
        SamplingDefaults().replace(steps=args.num_iter, cfg=args.cfg, temperature=args.temperature)
    except ValueError as e:
        p.error(str(e))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The recipe's options, checked."""
    p = argparse.ArgumentParser(
        description=recipes.shapes.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prog="python -m recipes.shapes",
    )
    add_budget(p)
    add_data(p)
    add_sampling_and_run(p)
    args = p.parse_args(argv)
    check(p, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the demo (or the ablation); Ctrl-C stops it with a hint to rerun, which resumes."""
    from recipes.shapes.ablation import Ablation
    from recipes.shapes.demo import Demo

    args = parse_args(argv)
    if args.restart and Path(args.out).exists():
        shutil.rmtree(args.out)
    try:
        return (Ablation(args) if args.ablation else Demo(args)).run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue from where it stopped ({args.out})", flush=True)
        raise SystemExit(130) from None
