"""The demo's CPU training step: fp32 vs bf16 autocast vs torch.compile, side by side, and whether each is bit-exact.

    python bench/shapes_cpu_bench.py [--preset shapes] [--batch 32] [--threads 1] [--steps 20] [--warmup 5]

As one of ``make demo``'s two pretraining processes runs it: the ``shapes`` preset, batch 32, one thread, the
trainer's CPU kernel settings (deterministic algorithms, flush-to-zero), AdamW + gradient clipping at 3.0, random
latents and random-length MiniLM-width text (``model_bench.random_batch``). The variants (``train.precision`` fp32 /
bf16, ``train.compile``) start from the same weights and take their steps in turn, so that load changes hit all
alike; reported: the median step time and its ratio to fp32. Reproducibility: each variant is run twice for
``--repeat-steps`` steps from the same weights and draws, and its parameters compared bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_bench import random_batch  # noqa: E402

from lightgen_model import LightGen, preset  # noqa: E402
from training.dist import compile_blocks  # noqa: E402

VARIANTS = {"fp32": (False, False), "bf16": (True, False), "compile": (False, True), "bf16+compile": (True, True)}


class Run:
    """One variant's model, optimiser and step."""

    def __init__(self, base: LightGen, bf16: bool, compiled: bool, seed: int):
        self.model = copy.deepcopy(base).train()
        if compiled:
            compile_blocks(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
        self.amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.g = torch.Generator().manual_seed(seed)

    def step(self, batch) -> None:
        lat, text, mask = batch
        with self.amp():
            loss = self.model(lat, text, mask, generator=self.g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 3.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def bit_exact(base: LightGen, bf16: bool, compiled: bool, batches: list, steps: int) -> bool:
    """Two runs of ``steps`` steps from the same weights and draws end with identical parameters."""
    finals = []
    for _ in range(2):
        run = Run(base, bf16, compiled, seed=1)
        for i in range(steps):
            run.step(batches[i % len(batches)])
        finals.append([p.detach().clone() for p in run.model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat-steps", type=int, default=5, help="steps of each reproducibility run")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # the trainer's CPU settings (training/dist.py)
    torch.set_flush_denormal(True)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    base = LightGen(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(cfg, args.batch, cfg.base_resolution, "cpu", g, cfg.max_text_len) for _ in range(4)]
    names = args.variants.split(",")
    runs = {n: Run(base, *VARIANTS[n], seed=1) for n in names}
    for run in runs.values():
        for i in range(args.warmup):
            run.step(batches[i % len(batches)])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.steps):
        for n, run in runs.items():
            t0 = time.perf_counter()
            run.step(batches[i % len(batches)])
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"preset {args.preset}, batch {args.batch}, {args.threads} thread(s); median of {args.steps} steps")
    print("| variant | s/step | img/s | vs fp32 | bit-exact rerun |")
    print("| --- | --- | --- | --- | --- |")
    ref = med.get("fp32", next(iter(med.values())))
    for n in names:
        exact = bit_exact(base, *VARIANTS[n], batches, args.repeat_steps)
        print(f"| {n} | {med[n]:.4f} | {args.batch / med[n]:.1f} | {ref / med[n]:.2f}x | {'yes' if exact else 'NO'} |")


if __name__ == "__main__":
    main()
