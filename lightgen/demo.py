"""The embedded default, end to end: every stage of LightGen on ShapesWorld, on a CPU, through the real CLIs.

    python -m lightgen.demo [--out runs/demo] [--images 330000] [--device cpu|cuda] [--ablation]

captions (build-captions) -> teacher images (synthesize) -> training shards (encode-latents) -> pretraining
(torchrun, 2 processes) -> held-out GenEval-layout samples + scores -> DPO pairs (build-dpo-pairs, shapes judge)
-> DPO (torchrun) -> samples + scores again -> runs/demo/report.html and scores.json, with PASS/FAIL per target.

Every stage runs as a subprocess of its real command line (logged under <out>/logs/). A finished stage is
recorded in <out>/stages.json and skipped on a rerun; an interrupted one resumes (the trainers from their newest
checkpoint, the pipeline stages from their finished shards). Ctrl-C at any point, rerun the same command.

The budget is work (training images, hence steps), fixed before the run: the same command gives the same model on
any machine, however busy (on a CPU bit for bit); a busy machine only takes longer. `--budget-minutes` adds a time
limit instead (the cosine then follows the elapsed share of it, so the model depends on the machine's speed).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lightgen_model.config import CFG_SCHEDULES, SamplingDefaults

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_SEED = 999_001
SYNTH_SHARD = 200  # images per synthesize shard (the DPO stage takes whole shards)  # never used by the training captions (build-captions draws ShapesWorld with --seed)

BATCH_PER_PROCESS = 32  # pretraining batch per process (global 64 with the default 2 processes)
DEFAULT_IMAGES = 330_000  # the pretraining budget: 5,157 steps of 64 (why 330 k: BENCHMARKS.md, the demo)
IDLE_IMAGES_PER_S = 260  # the demo's pretraining speed on 2 idle cores: 248-265 measured (BENCHMARKS.md, the demo)
# the demo's targets at the default budget (held-out ShapesWorld, after pretraining)
TARGETS = {"single_object": 0.80, "colors": 0.60, "overall": 0.50}
SAMPLING_STAGES = ("curve", "geneval_pretrain", "pairs", "geneval_dpo")  # what evaluation and DPO losers cost
SAMPLING_SHARE = 0.20  # target: at most this share of the demo's stage time
# pages of `lightgen-data inspect` (<out>/inspect/<name>.html) -> the stage output folder each shows
INSPECT_PAGES = {"captions": "captions", "images": "images", "latents": "latents", "pairs": "pairs",
                 "judgements": "pairs/judgements"}  # fmt: skip


def tool(name: str) -> list[str]:
    """The console script installed beside this Python (the package's own CLIs)."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    module = {"lightgen": "lightgen.cli", "lightgen-data": "pipeline.cli"}[name]
    return [sys.executable, "-m", module]


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.state_path = self.out / "stages.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    # -- running stages ----------------------------------------------------------------------------------
    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def sh(self, stage: str, cmd: list[str]) -> None:
        """Run one command, streaming its output to the console and to logs/<stage>.log."""
        print(f"\n=== {stage}: {' '.join(cmd)}", flush=True)
        with open(self.out / "logs" / f"{stage}.log", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                    cwd=ROOT, bufsize=1)  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                noisy = line.startswith(("(", "[")) or "%|" in line  # Ray worker lines, progress bars
                if self.a.verbose or not noisy:
                    sys.stdout.write(line)
            rc = proc.wait()
        if rc != 0:
            raise SystemExit(f"stage {stage} failed (exit {rc}); see {self.out / 'logs' / (stage + '.log')}")

    def stage(self, name: str, fn) -> None:
        if self.state.get(name, {}).get("done"):
            print(f"=== {name}: done earlier ({self.state[name]['seconds']:.0f} s), skipped", flush=True)
            return
        t0 = time.time()
        prev = self.state.get(name, {}).get("seconds", 0.0)
        fn()
        # the 1-minute load average as the stage ends: how busy the machine was (timings depend on it, models do not)
        self.state[name] = {"done": True, "seconds": prev + time.time() - t0, "load": round(os.getloadavg()[0], 2)}
        self.save_state()

    # -- the chain -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a, o = self.a, self.out
        workers = ["--workers", str(a.workers)]
        self.stage("captions", lambda: self.sh("captions", [
            *tool("lightgen-data"), "build-captions", "--shapes", str(a.pool), "--n", str(a.captions),
            "--embedder", "hash", "--seed", str(a.seed), "--output", str(o / "captions"), *workers,
        ]))  # fmt: skip
        self.stage("synthesize", lambda: self.sh("synthesize", [
            *tool("lightgen-data"), "synthesize", "--input", str(o / "captions"), "--output", str(o / "images"),
            "--teacher", "shapes", "--resolution", str(a.resolution), "--seed", str(a.seed),
            "--shard-size", str(SYNTH_SHARD), *workers,
        ]))  # fmt: skip
        self.stage("encode", lambda: self.sh("encode", [
            *tool("lightgen-data"), "encode-latents", "--input", str(o / "images"), "--output", str(o / "latents"),
            "--vae", "pixel", "--text-encoder", "minilm", "--resolution", str(a.resolution), *workers,
        ]))  # fmt: skip
        self.announce_budget()
        self.stage("pretrain", lambda: self.sh("pretrain", [
            *self.launcher(), str(ROOT / "training/pretrain.py"), "--config", str(ROOT / "conf/shapes.yaml"),
            f"data.shards=[{o / 'latents'}]", f"train.out_dir={o / 'pretrain'}", *self.budget_overrides(),
            *self.curve_checkpoints(), *a.pretrain_set,
        ]))  # fmt: skip
        self.stage("curve", self.curve)
        self.stage("heldout", lambda: self.sh("heldout", [
            *tool("lightgen"), "shapes", "prompts", "--n", str(a.heldout), "--seed", str(HELDOUT_SEED),
            "--out", str(o / "heldout.jsonl"),
        ]))  # fmt: skip
        self.stage("geneval_pretrain", lambda: self.geneval("pretrain"))
        self.stage("pairs", lambda: self.sh("pairs", [
            *tool("lightgen-data"), "build-dpo-pairs", *self.pair_inputs(), "--output", str(o / "pairs"),
            "--judge-backend", "shapes", "--model", str(o / "pretrain" / "model"), "--seed", str(a.seed + 1),
            "--resolution", str(a.resolution), "--batch-size", "64", "--judge-losers", *self.sampling_args(), *workers,
        ]))  # fmt: skip
        self.stage("dpo", lambda: self.sh("dpo", [
            *self.launcher(), str(ROOT / "training/dpo.py"), "--config", str(ROOT / "conf/dpo_shapes.yaml"),
            f"model.init_from={o / 'pretrain' / 'model'}", f"dpo.pairs=[{o / 'pairs'}]", f"train.out_dir={o / 'dpo'}",
            f"train.device={a.device}", f"train.max_steps={a.dpo_steps}", "train.budget_minutes=null",
            f"train.seed={a.seed}", "log.progress=false", *a.dpo_set,
        ]))  # fmt: skip
        self.stage("geneval_dpo", lambda: self.geneval("dpo"))
        self.inspect_pages()
        scores = self.collect()
        write_report(self.out, scores, self.state)
        print_verdicts(scores)
        return scores

    def pretrain_steps(self) -> int:
        """The pretraining budget in optimizer steps: --images over the global batch, rounded up."""
        return -(-self.a.images // (BATCH_PER_PROCESS * max(1, self.a.nproc)))

    def budget_overrides(self, seed: int | None = None) -> list[str]:
        """Trainer overrides of the pretraining budget: steps, and a time limit only when --budget-minutes is set;
        the training seed (default --seed)."""
        a = self.a
        minutes = "null" if a.budget_minutes is None else str(a.budget_minutes)
        return [f"data.batch_size={BATCH_PER_PROCESS}", f"train.max_steps={self.pretrain_steps()}",
                f"train.budget_minutes={minutes}", f"train.device={a.device}",
                f"train.seed={a.seed if seed is None else seed}", "log.progress=false"]  # fmt: skip

    def curve_checkpoints(self) -> list[str]:
        """A kept checkpoint every 1/--curve-points of the budget (of the steps, or of the minutes when timed)."""
        a, points = self.a, max(1, self.a.curve_points)
        if a.budget_minutes is not None:
            every = ["checkpoint.every_steps=0", f"checkpoint.every_minutes={a.budget_minutes / points:.3f}"]
        else:
            every = [
                f"checkpoint.every_steps={-(-self.pretrain_steps() // points)}",
                "checkpoint.every_minutes=null",
            ]
        return [*every, "checkpoint.keep_last=100"]

    def announce_budget(self) -> None:
        """The pretraining budget and the time it takes on 2 idle cores (the trainer prints a live ETA)."""
        a, steps = self.a, self.pretrain_steps()
        images = steps * BATCH_PER_PROCESS * max(1, a.nproc)
        idle = f"; about {images / IDLE_IMAGES_PER_S / 60:.0f} min on 2 idle CPU cores" if a.device == "cpu" else ""
        limit = f", at most {a.budget_minutes:g} min of training" if a.budget_minutes is not None else ""
        print(f"=== pretraining budget: {steps} steps of {images // steps} = {images} images{limit}{idle}", flush=True)

    def curve(self) -> None:
        """Held-out score of every kept pretraining checkpoint (a smaller prompt subset, one sample each)."""
        o, a = self.out, self.a
        meta = o / "curve_prompts.jsonl"
        self.sh("curve", [*tool("lightgen"), "shapes", "prompts", "--n", str(a.curve_prompts), "--seed",
                          str(HELDOUT_SEED + 1), "--out", str(meta)])  # fmt: skip
        rows = []
        for ck in sorted((o / "pretrain" / "checkpoints").glob("step-*")):
            dest = o / "geneval" / "curve" / ck.name
            self.sh("curve", [*tool("lightgen"), "geneval", "--model", str(ck), "--metadata", str(meta),
                              "--out", str(dest), "--samples", "1", "--seed", str(a.seed), "--batch-size", "64",
                              *self.sampling_args()])  # fmt: skip
            self.sh("curve", [*tool("lightgen"), "shapes", "score", str(dest)])
            summary = json.loads((dest / "scores.json").read_text())["summary"]
            st = json.loads((ck / "state.json").read_text())
            rows.append({"step": st["step"], "minutes": round(st["elapsed_s"] / 60, 2), "overall": summary["overall"]}
                        | {t: v["accuracy"] for t, v in summary["tasks"].items()})  # fmt: skip
        (o / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def inspect_pages(self) -> None:
        """One `lightgen-data inspect` page per stage output folder, under <out>/inspect/ (redone on every run: cheap,
        and always of the folders as they are now); the report links them."""
        for name, folder in INSPECT_PAGES.items():
            if (self.out / folder / "manifest.json").is_file():
                self.sh("inspect", [*tool("lightgen-data"), "inspect", str(self.out / folder), "--out",
                                    str(self.out / "inspect" / f"{name}.html"), "--seed", str(self.a.seed)])  # fmt: skip

    def pair_inputs(self) -> list[str]:
        """The first synthesize shards holding >= --pairs images: the DPO source (winners = teacher renders)."""
        tars = sorted((self.out / "images").glob("*.tar"))
        k = max(1, -(-self.a.pairs // SYNTH_SHARD))
        return [x for t in tars[:k] for x in ("--input", str(t))]

    def launcher(self) -> list[str]:
        n = self.a.nproc
        if n <= 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]

    def sampling_args(self) -> list[str]:
        """The sampling options given on the command line; the rest are the model's recorded defaults (the `shapes`
        preset's `sampling`)."""
        a = self.a
        given = {
            "--steps": a.num_iter,
            "--cfg": a.cfg,
            "--cfg-schedule": a.cfg_schedule,
            "--temperature": a.temperature,
        }
        return [x for flag, v in given.items() if v is not None for x in (flag, str(v))] + ["--device", a.device]

    def geneval(self, which: str) -> None:
        o, a = self.out, self.a
        self.sh(f"geneval_{which}", [
            *tool("lightgen"), "geneval", "--model", str(o / which / "model"), "--metadata", str(o / "heldout.jsonl"),
            "--out", str(o / "geneval" / which), "--samples", str(a.samples), "--seed", str(a.seed),
            "--batch-size", "64", *self.sampling_args(),
        ])  # fmt: skip
        self.sh(f"geneval_{which}", [*tool("lightgen"), "shapes", "score", str(o / "geneval" / which)])

    # -- results -----------------------------------------------------------------------------------------
    def budget(self) -> dict[str, Any]:
        """The pretraining and DPO budgets as run."""
        a, steps = self.a, self.pretrain_steps()
        return {"steps": steps, "images": steps * BATCH_PER_PROCESS * max(1, a.nproc), "minutes": a.budget_minutes,
                "dpo_steps": a.dpo_steps}  # fmt: skip

    def collect(self) -> dict[str, Any]:
        o = self.out
        res: dict[str, Any] = {"budget": self.budget(), "device": self.a.device, "models": {}}
        for which in ("pretrain", "dpo"):
            doc = json.loads((o / "geneval" / which / "scores.json").read_text())
            weights = hashlib.sha256((o / which / "model" / "model.safetensors").read_bytes()).hexdigest()
            # the weights' sha256: two runs of the same command on any machine, idle or busy, give the same model
            res["models"][which] = {"summary": doc["summary"], "per_seed": per_seed(doc["images"]), "sha256": weights}
        res["data"] = data_counts(o)
        res["curve"] = _metrics(o / "curve.jsonl")
        res["stages"] = {k: round(v["seconds"], 1) for k, v in self.state.items()}
        res["load_average"] = max((v.get("load", 0.0) for v in self.state.values()), default=0.0)
        res["targets"] = verdicts(res)
        tmp = o / "scores.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(o / "scores.json")
        return res


class Ablation(Demo):
    """The paper's data ablation in miniature: the same number of captions and the same pretraining budget in images
    on (a) diverse captions (every scene) and (b) low-diversity ones (--ablation-scenes scenes per category, drawn
    from a larger pool, exact duplicates removed, so both arms hold the same number of distinct captions). Both arms
    paraphrase every caption with the same grammar, so they differ in the scenes their captions describe only, not
    in wording (the held-out prompts' canonical template is no more common in one arm than in the other). Each arm
    is pretrained with every seed of --seeds; held-out scores per seed and their mean and spread in
    <out>/ablation.json."""

    def arm(self, name: str, extra: list[str], pool: int) -> dict[str, Any]:
        a, o, n = self.a, self.out / name, self.a.ablation_captions
        workers = ["--workers", str(a.workers)]
        self.stage(f"{name}/captions", lambda: self.sh(f"{name}_captions", [
            *tool("lightgen-data"), "build-captions", "--shapes", str(pool), "--n", str(n), "--embedder", "hash",
            "--seed", str(a.seed), "--output", str(o / "captions"), *extra, *workers,
        ]))  # fmt: skip
        self.stage(f"{name}/synthesize", lambda: self.sh(f"{name}_synthesize", [
            *tool("lightgen-data"), "synthesize", "--input", str(o / "captions"), "--output", str(o / "images"),
            "--teacher", "shapes", "--resolution", str(a.resolution), "--seed", str(a.seed), *workers,
        ]))  # fmt: skip
        self.stage(f"{name}/encode", lambda: self.sh(f"{name}_encode", [
            *tool("lightgen-data"), "encode-latents", "--input", str(o / "images"), "--output", str(o / "latents"),
            "--vae", "pixel", "--text-encoder", "minilm", "--resolution", str(a.resolution), *workers,
        ]))  # fmt: skip
        seeds = {str(seed): self.arm_seed(name, seed) for seed in a.seeds}  # JSON keys
        keys = sorted({k for r in seeds.values() for k in r})
        spread = {k: {"mean": float(np.mean([r.get(k, 0.0) for r in seeds.values()])),
                      "std": float(np.std([r.get(k, 0.0) for r in seeds.values()]))} for k in keys}  # fmt: skip
        return {"options": extra, "pool": pool, "data": data_counts(o), "seeds": seeds, "spread": spread}

    def arm_seed(self, name: str, seed: int) -> dict[str, float]:
        """Pretrain one arm with training seed `seed`; its held-out scores (overall and per category)."""
        a, o = self.a, self.out / name
        run, dest = o / f"pretrain-s{seed}", o / f"geneval-s{seed}"
        self.stage(f"{name}/pretrain-s{seed}", lambda: self.sh(f"{name}_pretrain", [
            *self.launcher(), str(ROOT / "training/pretrain.py"), "--config", str(ROOT / "conf/shapes.yaml"),
            f"data.shards=[{o / 'latents'}]", f"train.out_dir={run}", *self.budget_overrides(seed), *a.pretrain_set,
        ]))  # fmt: skip

        def geneval() -> None:
            self.sh(f"{name}_geneval", [
                *tool("lightgen"), "geneval", "--model", str(run / "model"), "--metadata",
                str(self.out / "heldout.jsonl"), "--out", str(dest), "--samples", str(a.samples), "--seed", str(a.seed),
                "--batch-size", "64", *self.sampling_args(),
            ])  # fmt: skip
            self.sh(f"{name}_geneval", [*tool("lightgen"), "shapes", "score", str(dest)])

        self.stage(f"{name}/geneval-s{seed}", geneval)
        summary = json.loads((dest / "scores.json").read_text())["summary"]
        return {"overall": summary["overall"]} | {t: v["accuracy"] for t, v in summary["tasks"].items()}

    def run(self) -> dict[str, Any]:
        a, n = self.a, self.a.ablation_captions
        self.stage("heldout", lambda: self.sh("heldout", [
            *tool("lightgen"), "shapes", "prompts", "--n", str(a.heldout), "--seed", str(HELDOUT_SEED),
            "--out", str(self.out / "heldout.jsonl"),
        ]))  # fmt: skip
        low_extra = ["--shapes-diversity", "1.0", "--shapes-scenes", str(a.ablation_scenes)]
        res = {
            "budget": self.budget(),
            "captions": n,
            "diverse": self.arm("diverse", ["--shapes-diversity", "1.0"], 2 * n),
            "low_diversity": self.arm("low_diversity", low_extra, 4 * n),
        }
        (self.out / "ablation.json").write_text(json.dumps(res, indent=1))
        seeds = ", ".join(map(str, a.seeds))
        print(f"\n=== data ablation: {n} captions per arm, {res['budget']['images']} training images, seeds {seeds}")
        print(f"{'':16}{'diverse':>16}{'low-diversity':>16}")
        for t in (*CATEGORIES, "overall"):
            nan = {"mean": float("nan"), "std": float("nan")}
            cells = [res[arm]["spread"].get(t, nan) for arm in ("diverse", "low_diversity")]
            print(f"{t:16}" + "".join(f"{c['mean']:>10.3f} ± {c['std']:.3f}" for c in cells))
        for name in ("diverse", "low_diversity"):
            written = res[name]["data"].get("captions", {}).get("written")
            if written != n:
                print(f"note: the {name} arm holds {written} distinct captions, not {n}: raise its pool")
        return res


def per_seed(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores per sample index (sample k of every prompt used seed k): per category and overall, with spread."""
    by_k: dict[int, dict[str, list[bool]]] = {}
    for r in images:
        k = int(Path(r["filename"]).stem)
        by_k.setdefault(k, {}).setdefault(r["tag"], []).append(bool(r["correct"]))
    rows = {}
    for k, tags in sorted(by_k.items()):
        acc = {t: float(np.mean(v)) for t, v in tags.items()}
        rows[k] = acc | {"overall": float(np.mean(list(acc.values())))}
    keys = sorted({key for r in rows.values() for key in r})
    spread = {key: {"mean": float(np.mean([r[key] for r in rows.values() if key in r])),
                    "std": float(np.std([r[key] for r in rows.values() if key in r]))} for key in keys}  # fmt: skip
    return {"seeds": rows, "spread": spread}


def data_counts(o: Path) -> dict[str, Any]:
    out = {}
    for name in ("captions", "images", "latents", "pairs"):
        p = o / name / "manifest.json"
        if p.is_file():
            m = json.loads(p.read_text())
            out[name] = {"in": m.get("inputs"), "written": m.get("rows"), "rejected": m.get("rejected")}
    return out


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    pre = res["models"]["pretrain"]["summary"]
    acc = lambda s, t: s["tasks"].get(t, {}).get("accuracy", 0.0)
    rows = []
    for key, goal in TARGETS.items():
        v = pre["overall"] if key == "overall" else acc(pre, key)
        rows.append({"target": f"pretrain {key} >= {goal}", "value": round(v, 3), "pass": v >= goal})
    sp_pre, sp_post = res["models"]["pretrain"]["per_seed"]["spread"], res["models"]["dpo"]["per_seed"]["spread"]
    d_over = sp_post["overall"]["mean"] - sp_pre["overall"]["mean"]
    d_pos = sp_post.get("position", {"mean": 0})["mean"] - sp_pre.get("position", {"mean": 0})["mean"]
    n_seeds = len(res["models"]["dpo"]["per_seed"]["seeds"])
    rows.append(
        {"target": f"DPO: overall does not fall ({n_seeds} seeds)", "value": round(d_over, 3), "pass": d_over >= 0}
    )
    rows.append({"target": f"DPO: position improves ({n_seeds} seeds)", "value": round(d_pos, 3), "pass": d_pos > 0})
    share = sampling_share(res["stages"])
    rows.append({"target": f"sampling <= {SAMPLING_SHARE:.0%} of the demo's time", "value": round(share, 3),
                 "pass": share <= SAMPLING_SHARE})  # fmt: skip
    return rows


def sampling_share(stages: dict[str, float]) -> float:
    """The share of the stage time spent sampling: score curve, both GenEval runs, DPO pairs (losers)."""
    total = sum(stages.values())
    return sum(stages.get(k, 0.0) for k in SAMPLING_STAGES) / total if total else 0.0


def print_verdicts(res: dict[str, Any]) -> None:
    print("\n=== targets")
    for r in res["targets"]:
        print(f"{'PASS' if r['pass'] else 'FAIL'}  {r['target']}: {r['value']}")
    t = sum(res["stages"].values())
    print(
        f"total stage time {t / 60:.1f} min (target <= 30 on 2 idle cores; highest load average "
        f"{res['load_average']}): {'PASS' if t <= 1800 else 'FAIL'}"
    )


# -- the report -----------------------------------------------------------------------------------------------
def _svg_curve(series: dict[str, list[tuple[float, float]]], title: str, w: int = 520, h: int = 200) -> str:
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: 40 + (w - 50) * (x - x0) / max(x1 - x0, 1e-9)
    sy = lambda y: h - 25 - (h - 40) * (y - y0) / max(y1 - y0, 1e-9)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg width="{w}" height="{h}" style="background:#fff;border:1px solid #ddd">',
             f'<text x="40" y="14" font-size="12">{html.escape(title)}</text>',
             f'<text x="2" y="{sy(y1) + 4:.0f}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{sy(y0):.0f}" font-size="10">{y0:.3g}</text>',
             f'<text x="{w - 60}" y="{h - 5}" font-size="10">step {x1:.0f}</text>']  # fmt: skip
    for i, (name, s) in enumerate(series.items()):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        c = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.2" points="{path}"/>')
        parts.append(f'<text x="{w - 150}" y="{30 + 12 * i}" font-size="11" fill="{c}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _smooth(rows: list[dict[str, Any]], key: str, k: int = 25) -> list[tuple[float, float]]:
    vals = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
    out = []
    for i in range(0, len(vals), max(1, len(vals) // 200)):
        window = [v for _, v in vals[max(0, i - k) : i + 1]]
        out.append((vals[i][0], float(np.mean(window))))
    return out


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _grid_for(folder: Path, tag: str, n: int = 8) -> str:
    """An <img> row of the first sample of the first n prompts of a category (relative paths)."""
    cells = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
        if meta["tag"] != tag:
            continue
        img = d / "samples" / "0000.png"
        if img.is_file():
            rel = os.path.relpath(img, folder.parent.parent)
            cells.append(f'<img src="{rel}" title="{html.escape(meta["prompt"])}" width="64" height="64" '
                         'style="image-rendering:pixelated;margin:1px">')  # fmt: skip
        if len(cells) == n:
            break
    return "".join(cells)


def inspect_links(o: Path) -> str:
    """Links to the `lightgen-data inspect` pages that exist under <out>/inspect/."""
    pages = [n for n in INSPECT_PAGES if (o / "inspect" / f"{n}.html").is_file()]
    links = " · ".join(f'<a href="inspect/{n}.html">{n}</a>' for n in pages)
    return f"<p>Look at the data (lightgen-data inspect): {links}</p>" if pages else ""


def budget_text(b: dict[str, Any]) -> str:
    """'Pretraining budget 5157 steps = 330048 images; DPO 150 steps' (with a time limit when there was one)."""
    limit = "" if b["minutes"] is None else f" (at most {b['minutes']:g} min of training)"
    return f"Pretraining budget {b['steps']} steps = {b['images']} images{limit}; DPO {b['dpo_steps']} steps"


def write_report(o: Path, res: dict[str, Any], state: dict[str, Any]) -> Path:
    pre, post = res["models"]["pretrain"], res["models"]["dpo"]
    rows = []
    for t in (*CATEGORIES, "overall"):
        a, b = pre["per_seed"]["spread"].get(t), post["per_seed"]["spread"].get(t)
        if a is None:
            continue
        rows.append(
            f"<tr><td>{t}</td><td>{a['mean']:.3f} ± {a['std']:.3f}</td><td>{b['mean']:.3f} ± {b['std']:.3f}</td></tr>"
        )
    grids = []
    for t in CATEGORIES:
        grids.append(f"<tr><td>{t}</td><td>{_grid_for(o / 'geneval' / 'pretrain', t)}</td>"
                     f"<td>{_grid_for(o / 'geneval' / 'dpo', t)}</td></tr>")  # fmt: skip
    pm, dm = _metrics(o / "pretrain" / "metrics.jsonl"), _metrics(o / "dpo" / "metrics.jsonl")
    curves = _svg_curve({"pretrain loss": _smooth(pm, "loss")}, "pretraining loss (smoothed)")
    curves += _svg_curve({"DPO loss": _smooth(dm, "loss")}, "DPO loss (smoothed)")
    curves += _svg_curve({"implicit acc": _smooth(dm, "implicit_acc")}, "DPO implicit accuracy (smoothed)")
    learn = _metrics(o / "curve.jsonl")
    if learn:
        series = {k: [(r["step"], r[k]) for r in learn if k in r] for k in ("overall", "single_object", "colors")}
        curves += _svg_curve(series, "held-out score vs training step")
    verdict_rows = "".join(
        f"<tr><td>{'PASS' if r['pass'] else '<b>FAIL</b>'}</td><td>{html.escape(r['target'])}</td><td>{r['value']}</td></tr>"
        for r in res["targets"]
    )
    stage_rows = "".join(f"<tr><td>{k}</td><td>{v['seconds']:.0f} s</td></tr>" for k, v in state.items())
    data_rows = "".join(
        f"<tr><td>{k}</td><td>{v['in']}</td><td>{v['written']}</td><td>{v['rejected']}</td></tr>"
        for k, v in res["data"].items()
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>LightGen ShapesWorld demo</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} td,th{{padding:3px 8px;border-bottom:1px solid #eee}}
table{{border-collapse:collapse;margin-bottom:18px}}</style></head><body>
<h1>LightGen on ShapesWorld — end to end on a {html.escape(res["device"])}</h1>
<p>{html.escape(budget_text(res["budget"]))}. Held-out prompts (seed {HELDOUT_SEED}), {len(pre["per_seed"]["seeds"])}
samples each; scores are mean ± std over the sample seeds.</p>
<h2>Targets</h2><table>{verdict_rows}</table>
<h2>Scores per category</h2><table><tr><th>category</th><th>after pretraining</th><th>after DPO</th></tr>{"".join(rows)}</table>
<h2>Samples (first sample of the first prompts per category)</h2>
<table><tr><th></th><th>after pretraining</th><th>after DPO</th></tr>{"".join(grids)}</table>
<h2>Curves</h2>{curves}
<h2>Data</h2><table><tr><th>stage</th><th>in</th><th>written</th><th>rejected</th></tr>{data_rows}</table>
{inspect_links(o)}
<h2>Stage timings</h2><table>{stage_rows}</table>
</body></html>"""
    path = o / "report.html"
    path.write_text(doc)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                prog="python -m lightgen.demo")  # fmt: skip
    p.add_argument("--out", default="runs/demo", help="output folder (rerun with the same folder to resume)")
    p.add_argument(
        "--images",
        type=int,
        default=DEFAULT_IMAGES,
        help="pretraining budget in training images (steps = images / global batch, rounded up); "
        f"about {DEFAULT_IMAGES / IDLE_IMAGES_PER_S / 60:.0f} min on 2 idle CPU cores",
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
    args = p.parse_args(argv)
    counts = (
        "images",
        "dpo_steps",
        "ablation_captions",
        "ablation_scenes",
        "curve_points",
        "heldout",
        "samples",
        "pairs",
    )
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    try:  # a bad sampling setting is refused now, not after the pretraining
        SamplingDefaults().replace(steps=args.num_iter, cfg=args.cfg, temperature=args.temperature)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.restart and Path(args.out).exists():
        shutil.rmtree(args.out)
    try:
        return (Ablation(args) if args.ablation else Demo(args)).run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue from where it stopped ({args.out})", flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
