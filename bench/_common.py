"""What the model benchmarks share: the command-line arguments that say what to run and for how long."""

from __future__ import annotations

import argparse


def bench_parser(
    doc: str | None, *, preset: str, device: str, batch: int, warmup: int, steps: int
) -> argparse.ArgumentParser:
    """A parser with the arguments every model benchmark takes, at the script's defaults: --preset, --device,
    --batch, --warmup (untimed steps) and --steps (timed); each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=preset)
    p.add_argument("--device", default=device)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=int, default=steps)
    return p
