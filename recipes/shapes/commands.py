"""One builder per command line of the ShapesWorld recipe: the demo and the ablation run the very same lines.

Each builder takes the parsed options (`cli.parse_args`) and the folders it works on, and returns the argv of
one real CLI. The lines, their order and their seeds decide the trained models: change them only on purpose.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

Options = argparse.Namespace  # the recipe's parsed command line (cli.parse_args)

ROOT = Path(__file__).resolve().parents[2]
HELDOUT_SEED = 999_001  # never used by the training captions (build-captions draws ShapesWorld with --seed)
SYNTH_SHARD = 200  # images per synthesize shard (the DPO stage takes whole shards)
BATCH_PER_PROCESS = 32  # pretraining batch per process (global 64 with the default 2 processes)
DEFAULT_IMAGES = 330_000  # the pretraining budget: 5,157 steps of 64 (why 330 k: BENCHMARKS.md, the demo)
IDLE_IMAGES_PER_S = 260  # the demo's pretraining speed on 2 idle cores: 248-265 measured (BENCHMARKS.md, the demo)
SAMPLING_BATCH = 64  # images per sampling batch (GenEval, DPO losers)


def tool(name: str) -> list[str]:
    """The console script installed beside this Python (the package's own CLIs)."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    module = {"lightgen": "lightgen.cli", "lightgen-data": "pipeline.cli"}[name]
    return [sys.executable, "-m", module]


def launcher(nproc: int) -> list[str]:
    """Plain Python for one training process, torchrun for several."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def flags(**values: object) -> list[str]:
    """`--name value` pairs in the order given (`shard_size=200` -> `--shard-size 200`); None values left out."""
    return [x for k, v in values.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]


def overrides(values: dict[str, object]) -> list[str]:
    """Trainer overrides `section.key=value`, in the order given."""
    return [f"{k}={v}" for k, v in values.items()]


def build_captions(a: Options, out: Path, pool: int, n: int, extra: Sequence[str] = ()) -> list[str]:
    """ShapesWorld captions: `pool` drawn, `n` selected, into <out>/captions (`extra`: the ablation's scenes)."""
    chosen = flags(shapes=pool, n=n, embedder="hash", seed=a.seed, output=out / "captions")
    return [*tool("lightgen-data"), "build-captions", *chosen, *extra, *flags(workers=a.workers)]


def synthesize(a: Options, out: Path, shard_size: int | None = None) -> list[str]:
    """Teacher images of <out>/captions into <out>/images (the ablation keeps the stage's own shard size)."""
    paths = flags(input=out / "captions", output=out / "images", teacher="shapes")
    rest = flags(resolution=a.resolution, seed=a.seed, shard_size=shard_size, workers=a.workers)
    return [*tool("lightgen-data"), "synthesize", *paths, *rest]


def encode_latents(a: Options, out: Path) -> list[str]:
    """Training shards of <out>/images into <out>/latents: raw pixels, MiniLM text states."""
    paths = flags(input=out / "images", output=out / "latents", vae="pixel", text_encoder="minilm")
    return [*tool("lightgen-data"), "encode-latents", *paths, *flags(resolution=a.resolution, workers=a.workers)]


def pretrain_steps(a: Options) -> int:
    """The pretraining budget in optimizer steps: --images over the global batch, rounded up."""
    return -(-a.images // (BATCH_PER_PROCESS * max(1, a.nproc)))


def pretrain(a: Options, out: Path, run: Path, seed: int, checkpoints: Sequence[str] = ()) -> list[str]:
    """Pretraining on <out>/latents into `run`: the budget in steps (a time limit only with --budget-minutes)."""
    script = [str(ROOT / "training/pretrain.py"), "--config", str(ROOT / "conf/shapes.yaml")]
    budget = {
        "data.shards": f"[{out / 'latents'}]",
        "train.out_dir": run,
        "data.batch_size": BATCH_PER_PROCESS,
        "train.max_steps": pretrain_steps(a),
        "train.budget_minutes": "null" if a.budget_minutes is None else a.budget_minutes,
        "train.device": a.device,
        "train.seed": seed,
        "log.progress": "false",
    }
    return [*launcher(a.nproc), *script, *overrides(budget), *checkpoints, *a.pretrain_set]


def curve_checkpoints(a: Options) -> list[str]:
    """A kept checkpoint every 1/--curve-points of the budget (of the steps, or of the minutes when timed)."""
    points = max(1, a.curve_points)
    if a.budget_minutes is not None:
        every = {"checkpoint.every_steps": 0, "checkpoint.every_minutes": f"{a.budget_minutes / points:.3f}"}
    else:
        every = {"checkpoint.every_steps": -(-pretrain_steps(a) // points), "checkpoint.every_minutes": "null"}
    return overrides(every | {"checkpoint.keep_last": 100})


def prompts(n: int, seed: int, path: Path) -> list[str]:
    """`n` held-out GenEval-style prompts drawn with `seed`."""
    return [*tool("lightgen"), "shapes", "prompts", *flags(n=n, seed=seed, out=path)]


def sampling(a: Options) -> list[str]:
    """The sampling options given on the command line; the rest are the model's recorded defaults (the `shapes`
    preset's `sampling`)."""
    return flags(steps=a.num_iter, cfg=a.cfg, cfg_schedule=a.cfg_schedule, temperature=a.temperature, device=a.device)


def geneval(a: Options, model: Path, metadata: Path, dest: Path, samples: int) -> list[str]:
    """GenEval-layout samples of `model` for the prompts of `metadata`, into `dest`."""
    chosen = flags(model=model, metadata=metadata, out=dest, samples=samples, seed=a.seed, batch_size=SAMPLING_BATCH)
    return [*tool("lightgen"), "geneval", *chosen, *sampling(a)]


def score(dest: Path) -> list[str]:
    """GenEval's rules on a folder of samples: <dest>/scores.json."""
    return [*tool("lightgen"), "shapes", "score", str(dest)]


def pair_inputs(a: Options, out: Path) -> list[str]:
    """The first synthesize shards holding >= --pairs images: the DPO source (winners = teacher renders)."""
    tars = sorted((out / "images").glob("*.tar"))
    k = max(1, -(-a.pairs // SYNTH_SHARD))
    return [x for t in tars[:k] for x in ("--input", str(t))]


def build_dpo_pairs(a: Options, out: Path) -> list[str]:
    """DPO pairs into <out>/pairs: teacher winners, the pretrained model's losers, kept where the judge agrees."""
    judge = flags(output=out / "pairs", judge_backend="shapes", model=out / "pretrain" / "model", seed=a.seed + 1)
    batch = [*flags(resolution=a.resolution, batch_size=SAMPLING_BATCH), "--judge-losers"]
    inputs = pair_inputs(a, out)
    return [*tool("lightgen-data"), "build-dpo-pairs", *inputs, *judge, *batch, *sampling(a), *flags(workers=a.workers)]


def dpo(a: Options, out: Path) -> list[str]:
    """Diffusion-DPO from <out>/pretrain/model on <out>/pairs into <out>/dpo, --dpo-steps steps."""
    script = [str(ROOT / "training/dpo.py"), "--config", str(ROOT / "conf/dpo_shapes.yaml")]
    run = {
        "model.init_from": out / "pretrain" / "model",
        "dpo.pairs": f"[{out / 'pairs'}]",
        "train.out_dir": out / "dpo",
        "train.device": a.device,
        "train.max_steps": a.dpo_steps,
        "train.budget_minutes": "null",
        "train.seed": a.seed,
        "log.progress": "false",
    }
    return [*launcher(a.nproc), *script, *overrides(run), *a.dpo_set]


def inspect(a: Options, folder: Path, page: Path) -> list[str]:
    """The `lightgen-data inspect` page of a stage output folder."""
    return [*tool("lightgen-data"), "inspect", str(folder), *flags(out=page, seed=a.seed)]
