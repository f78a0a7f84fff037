"""The paper's data ablation in miniature, on the demo's own command lines (recipes/shapes/commands.py).

The same number of captions and the same pretraining budget in images on (a) diverse captions (every scene) and
(b) low-diversity ones (--ablation-scenes scenes per category, drawn from a larger pool, exact duplicates removed,
so both arms hold the same number of distinct captions). Both arms paraphrase every caption with the same
grammar, so they differ in the scenes their captions describe only, not in wording (the held-out prompts'
canonical template is no more common in one arm than in the other). Each arm is pretrained with every seed of
--seeds; held-out scores per seed and their mean and spread in <out>/ablation.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipes.shapes import commands as cmd
from recipes.shapes.commands import HELDOUT_SEED, Options
from recipes.shapes.demo import sample_and_score
from recipes.shapes.results import CATEGORIES, budget, data_counts, mean_std
from recipes.shapes.steps import StepRunner

ARMS = ("diverse", "low_diversity")


class Ablation:
    """Diverse vs low-diversity captions, the same number of them and the same budget, over several seeds."""

    def __init__(self, a: Options) -> None:
        self.a, self.out = a, Path(a.out)
        self.steps = StepRunner(self.out, a.verbose)

    def run(self) -> dict[str, Any]:
        """Both arms, every seed; the per-seed scores and their spread (also in <out>/ablation.json)."""
        a, n = self.a, self.a.ablation_captions
        self.steps.command("heldout", lambda: cmd.prompts(a.heldout, HELDOUT_SEED, self.out / "heldout.jsonl"))
        low_extra = ["--shapes-diversity", "1.0", "--shapes-scenes", str(a.ablation_scenes)]
        res = {
            "budget": budget(a),
            "captions": n,
            "diverse": self.arm("diverse", ["--shapes-diversity", "1.0"], 2 * n),
            "low_diversity": self.arm("low_diversity", low_extra, 4 * n),
        }
        (self.out / "ablation.json").write_text(json.dumps(res, indent=1))
        print_table(res, a.seeds)
        return res

    def arm(self, name: str, extra: list[str], pool: int) -> dict[str, Any]:
        """One arm's data (captions with `extra` options, from `pool` drawn), then a pretraining per seed."""
        a, o = self.a, self.out / name
        self.steps.command(f"{name}/captions", lambda: cmd.build_captions(a, o, pool, a.ablation_captions, extra))
        self.steps.command(f"{name}/synthesize", lambda: cmd.synthesize(a, o))
        self.steps.command(f"{name}/encode", lambda: cmd.encode_latents(a, o))
        seeds = {str(seed): self.arm_seed(name, seed) for seed in a.seeds}  # JSON keys
        keys = sorted({k for r in seeds.values() for k in r})
        spread = {k: mean_std([r.get(k, 0.0) for r in seeds.values()]) for k in keys}
        return {"options": extra, "pool": pool, "data": data_counts(o), "seeds": seeds, "spread": spread}

    def arm_seed(self, name: str, seed: int) -> dict[str, float]:
        """Pretrain one arm with training seed `seed`; its held-out scores (overall and per category)."""
        a, o = self.a, self.out / name
        run, dest = o / f"pretrain-s{seed}", o / f"geneval-s{seed}"
        self.steps.command(f"{name}/pretrain-s{seed}", lambda: cmd.pretrain(a, o, run, seed), log=f"{name}_pretrain")
        heldout = self.out / "heldout.jsonl"
        geneval = lambda: sample_and_score(self.steps, f"{name}_geneval", a, run / "model", heldout, dest, a.samples)
        self.steps.step(f"{name}/geneval-s{seed}", geneval)
        summary = json.loads((dest / "scores.json").read_text())["summary"]
        return {"overall": summary["overall"]} | {t: v["accuracy"] for t, v in summary["tasks"].items()}


def print_table(res: dict[str, Any], seeds: list[int]) -> None:
    """Mean ± std over the seeds per category and arm; a note where an arm holds fewer captions than asked."""
    n, images = res["captions"], res["budget"]["images"]
    print(f"\n=== data ablation: {n} captions per arm, {images} training images, seeds {', '.join(map(str, seeds))}")
    print(f"{'':16}{'diverse':>16}{'low-diversity':>16}")
    for t in (*CATEGORIES, "overall"):
        nan = {"mean": float("nan"), "std": float("nan")}
        row = [res[arm]["spread"].get(t, nan) for arm in ARMS]
        print(f"{t:16}" + "".join(f"{c['mean']:>10.3f} ± {c['std']:.3f}" for c in row))
    for name in ARMS:
        written = res[name]["data"].get("captions", {}).get("written")
        if written != n:
            print(f"note: the {name} arm holds {written} distinct captions, not {n}: raise its pool")
