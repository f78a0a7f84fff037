"""The demo's chain: captions -> teacher images -> training shards -> pretraining (+ score curve) -> held-out
scores -> DPO pairs -> DPO -> held-out scores -> inspect pages, scores.json, report.html and the verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipes.shapes import commands as cmd
from recipes.shapes.commands import BATCH_PER_PROCESS, HELDOUT_SEED, IDLE_IMAGES_PER_S, SYNTH_SHARD, Options
from recipes.shapes.report import INSPECT_PAGES, write_report
from recipes.shapes.results import budget, data_counts, model_scores, print_verdicts, read_jsonl, verdicts
from recipes.shapes.steps import StepRunner


def sample_and_score(steps: StepRunner, log: str, a: Options, model: Path, metadata: Path, dest: Path, n: int) -> None:
    """GenEval-layout samples of `model` (`n` per prompt of `metadata`) into `dest`, then their scores."""
    steps.sh(log, cmd.geneval(a, model, metadata, dest, n))
    steps.sh(log, cmd.score(dest))


def announce_budget(a: Options) -> None:
    """The pretraining budget and the time it takes on 2 idle cores (the trainer prints a live ETA)."""
    steps = cmd.pretrain_steps(a)
    images = steps * BATCH_PER_PROCESS * max(1, a.nproc)
    idle = f"; about {images / IDLE_IMAGES_PER_S / 60:.0f} min on 2 idle CPU cores" if a.device == "cpu" else ""
    limit = f", at most {a.budget_minutes:g} min of training" if a.budget_minutes is not None else ""
    print(f"=== pretraining budget: {steps} steps of {images // steps} = {images} images{limit}{idle}", flush=True)


class Demo:
    """The whole chain on ShapesWorld, each stage one step of real command lines (recipes/shapes/commands.py)."""

    def __init__(self, a: Options) -> None:
        self.a, self.out = a, Path(a.out)
        self.steps = StepRunner(self.out, a.verbose)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; the results, also in <out>/scores.json and <out>/report.html."""
        a, o, s = self.a, self.out, self.steps
        # 1-3. data: captions, teacher images, training shards
        s.command("captions", lambda: cmd.build_captions(a, o, a.pool, a.captions))
        s.command("synthesize", lambda: cmd.synthesize(a, o, SYNTH_SHARD))
        s.command("encode", lambda: cmd.encode_latents(a, o))
        # 4. pretraining, a checkpoint every 1/--curve-points of it, and the score of each
        announce_budget(a)
        s.command("pretrain", lambda: cmd.pretrain(a, o, o / "pretrain", a.seed, cmd.curve_checkpoints(a)))
        s.step("curve", self.curve)
        # 5. the held-out prompts and the pretrained model's scores
        s.command("heldout", lambda: cmd.prompts(a.heldout, HELDOUT_SEED, o / "heldout.jsonl"))
        s.step("geneval_pretrain", lambda: self.geneval("pretrain"))
        # 6-7. DPO pairs, DPO, and the scores again
        s.command("pairs", lambda: cmd.build_dpo_pairs(a, o))
        s.command("dpo", lambda: cmd.dpo(a, o))
        s.step("geneval_dpo", lambda: self.geneval("dpo"))
        # 8. inspect pages, results, report, verdicts
        self.inspect_pages()
        scores = self.collect()
        write_report(o, scores, s.state)
        print_verdicts(scores)
        return scores

    def curve(self) -> None:
        """Held-out score of every kept pretraining checkpoint (a smaller prompt subset, one sample each)."""
        a, o = self.a, self.out
        meta = o / "curve_prompts.jsonl"
        self.steps.sh("curve", cmd.prompts(a.curve_prompts, HELDOUT_SEED + 1, meta))
        rows = []
        for ck in sorted((o / "pretrain" / "checkpoints").glob("step-*")):
            dest = o / "geneval" / "curve" / ck.name
            sample_and_score(self.steps, "curve", a, ck, meta, dest, 1)
            summary = json.loads((dest / "scores.json").read_text())["summary"]
            st = json.loads((ck / "state.json").read_text())
            point = {"step": st["step"], "minutes": round(st["elapsed_s"] / 60, 2), "overall": summary["overall"]}
            rows.append(point | {t: v["accuracy"] for t, v in summary["tasks"].items()})
        (o / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def geneval(self, which: str) -> None:
        """Held-out samples and scores of the pretrained or the DPO model."""
        o = self.out
        sample_and_score(
            self.steps,
            f"geneval_{which}",
            self.a,
            o / which / "model",
            o / "heldout.jsonl",
            o / "geneval" / which,
            self.a.samples,
        )

    def inspect_pages(self) -> None:
        """One `lightgen-data inspect` page per stage output folder, under <out>/inspect/ (redone on every run: cheap,
        and always of the folders as they are now); the report links them."""
        for name, folder in INSPECT_PAGES.items():
            if (self.out / folder / "manifest.json").is_file():
                self.steps.sh("inspect", cmd.inspect(self.a, self.out / folder, self.out / "inspect" / f"{name}.html"))

    def collect(self) -> dict[str, Any]:
        """The results: budget, both models' scores, data counts, curve, stage times, verdicts (-> scores.json)."""
        o = self.out
        res: dict[str, Any] = {"budget": budget(self.a), "device": self.a.device, "models": {}}
        res["models"] = {which: model_scores(o, which) for which in ("pretrain", "dpo")}
        res["data"] = data_counts(o)
        res["curve"] = read_jsonl(o / "curve.jsonl")
        res["stages"] = self.steps.seconds()
        res["load_average"] = self.steps.highest_load()
        res["targets"] = verdicts(res)
        tmp = o / "scores.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(o / "scores.json")
        return res
