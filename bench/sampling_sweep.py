"""Held-out ShapesWorld scores of one trained model under several sampling settings, side by side.

    python bench/sampling_sweep.py --model runs/demo/pretrain/model --metadata runs/demo/heldout.jsonl \
        --out runs/sweep --grid "cfg=2,3,4.5" "temperature=0.3,0.5,0.8" [--base steps=64 cfg=3 temperature=0.5]

Each setting is the base settings with one --grid key changed (one axis at a time, not the cross product); every
point is `lightgen geneval` + `lightgen shapes score` with the same prompts, sample seeds and batch size, so the
points differ in that setting only. Keys: steps, cfg, cfg_schedule, temperature, head_steps. Printed: one row per
point with its score per category, overall, the spread over sample seeds and the sampling seconds (same machine,
same run: compare the seconds as ratios only, and only on an idle machine); the rows also go to <out>/sweep.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.shapes.results import per_seed  # noqa: E402

BIN = Path(sys.executable).parent
KEYS = ("steps", "cfg", "cfg_schedule", "temperature", "head_steps")


def setting(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    if key not in KEYS or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {KEYS}, got {text!r}")
    return key, value


def score(args: argparse.Namespace, point: dict[str, str], dest: Path) -> dict[str, Any]:
    """Sample and score the held-out prompts with `point`'s settings; the summary, per-seed overall and seconds."""
    flags = [x for k, v in point.items() for x in (f"--{k.replace('_', '-')}", v)]
    t0 = time.time()
    subprocess.run(
        [
            str(BIN / "lightgen"),
            "geneval",
            "--model",
            str(args.model),
            "--metadata",
            str(args.metadata),
            "--out",
            str(dest),
            "--samples",
            str(args.samples),
            "--seed",
            "0",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            *flags,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.time() - t0
    subprocess.run([str(BIN / "lightgen"), "shapes", "score", str(dest)], check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((dest / "scores.json").read_text())
    tasks = {t: v["accuracy"] for t, v in doc["summary"]["tasks"].items()}
    spread = per_seed(doc["images"])["spread"]["overall"]
    return {"overall": doc["summary"]["overall"], "tasks": tasks, "std_over_seeds": spread["std"], "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--metadata", type=Path, required=True, help="`lightgen shapes prompts` output")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--base", type=setting, nargs="*", default=[("steps", "64"), ("cfg", "3"), ("temperature", "0.5")])
    p.add_argument("--grid", nargs="+", required=True, help='"key=v1,v2,..." one axis each')
    args = p.parse_args(argv)
    for path in (args.model / "config.json", args.metadata):
        if not path.is_file():
            p.error(f"{path}: no such file")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    base = dict(args.base)
    points = [base]
    for axis in args.grid:
        try:
            key, values = setting(axis)
        except argparse.ArgumentTypeError as e:
            p.error(f"--grid: {e}")
        points += [base | {key: v} for v in values.split(",") if v != base.get(key)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for point in points:
        name = "_".join(f"{k}{v}" for k, v in sorted(point.items()))
        row = {"settings": point} | score(args, point, args.out / name)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tasks = " ".join(f"{t[:6]} {v:.3f}" for t, v in row["tasks"].items())
        print(
            f"{name:40} overall {row['overall']:.3f} ± {row['std_over_seeds']:.3f}  {tasks}  {row['seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
