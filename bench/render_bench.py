"""The ShapesWorld teacher's rendering speed on one CPU core (it draws every training image of `make demo`).

    python bench/render_bench.py [--resolution 64] [--images 200] [--warmup 10] [--repeat 3] [--min-rate 100]

Renders ``--images`` scenes of ShapesWorld prompts (``generate_prompts(600, 11)``, as the tests use) with
``ShapesTeacher.batch`` after ``--warmup`` untimed ones, ``--repeat`` times; prints the best rate in images/s
(200+ img/s at 64 px were measured on one core). With ``--min-rate R`` it exits with code 1 when the best rate
is below R, the floor that used to be a wall-clock assertion in ``tests/test_shapesworld_render.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapesworld.render import ShapesTeacher  # noqa: E402
from shapesworld.world import generate_prompts  # noqa: E402


def render_rate(resolution: int, images: int, warmup: int, repeat: int) -> float:
    """The best of ``repeat`` timed renders of ``images`` scenes at ``resolution`` px, in images per second."""
    records = generate_prompts(max(600, images), 11, diversity=1.0)
    teacher = ShapesTeacher(resolution)
    teacher.batch(records[:warmup], list(range(warmup)))
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        teacher.batch(records[:images], list(range(images)))
        best = max(best, images / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 1 when the rate is under ``--min-rate``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--min-rate", type=float, default=None, help="Exit 1 below this many images/s.")
    a = p.parse_args(argv)
    rate = render_rate(a.resolution, a.images, a.warmup, a.repeat)
    print(json.dumps({"resolution": a.resolution, "images": a.images, "images_per_second": round(rate, 1)}))
    if a.min_rate is not None and rate < a.min_rate:
        print(f"error: {rate:.1f} images/s is below --min-rate {a.min_rate}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
