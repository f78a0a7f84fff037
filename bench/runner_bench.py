"""The runner's own cost: rows/s of the test suite's toy stage at 10^5 and 10^6 rows, in process and on Ray.

The toy stage does almost no work per row (parse an integer, square it), so what is measured is the runner:
planning, reading, batching, Parquet writing, sha256, receipts, the manifest and the rejects merge. A resume of a
finished run measures the verification cost (every shard re-hashed). Run: `python bench/runner_bench.py`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import toy_stage  # noqa: E402
from toy_stage import ToyConfig, ToyStage  # noqa: E402

from pipeline.core.runner import run_stage  # noqa: E402


def make_inputs(root: Path, rows: int, per_file: int) -> None:
    """`rows` integers in files of `per_file` lines (one output shard each)."""
    root.mkdir(parents=True)
    for k in range(rows // per_file):
        (root / f"f{k:06d}.txt").write_text("\n".join(str(k * per_file + j) for j in range(per_file)) + "\n")


def timed(src: Path, out: Path, workers: int, batch: int) -> tuple[float, dict]:
    """Seconds of one run and its report."""
    t0 = time.perf_counter()
    cfg = ToyConfig(inputs=[str(src)], output=str(out), workers=workers, batch_size=batch, progress=False)
    report = run_stage(ToyStage(cfg))
    return time.perf_counter() - t0, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--per-file", type=int, default=1000, help="rows per input file = per output shard")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    if any(args.workers):
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(toy_stage)  # Ray workers do not have tests/ on their path
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            src = Path(tmp) / f"in{n}"
            make_inputs(src, n, args.per_file)
            for w in args.workers:
                out = Path(tmp) / f"out{n}-{w}"
                secs, report = timed(src, out, w, args.batch)
                again, _ = timed(src, out, w, args.batch)
                row = {
                    "rows": n,
                    "shards": report["shards"],
                    "workers": w,
                    "seconds": round(secs, 2),
                    "rows_per_s": round(n / secs),
                    "resume_seconds": round(again, 2),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"driver_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
