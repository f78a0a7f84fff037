"""Launch the learnability sweep on one machine: GPU workers and 2-thread CPU workers in parallel,
all stopped at a deadline, results gathered into one folder (for the device tool's $OUT).

    python bench/learn_launch.py --specs runs/learn2/specs1.json --gpu-workers 5 --cpu-workers 5 \
        --deadline 480 --out $OUT
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--specs", required=True)
    p.add_argument("--gpu-workers", type=int, default=5)
    p.add_argument("--cpu-workers", type=int, default=5)
    p.add_argument("--deadline", type=float, default=480)
    p.add_argument("--work", default="/tmp/sweep")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    procs = []
    script = str(Path(__file__).with_name("learn_sweep.py"))
    for kind, n, dev, thr in (("gpu", args.gpu_workers, "cuda", 1), ("cpu", args.cpu_workers, "cpu", 2)):
        for i in range(n):
            e = dict(env, OMP_NUM_THREADS=str(thr), MKL_NUM_THREADS=str(thr))
            cmd = [sys.executable, script, "worker", "--specs", args.specs, "--queue", kind, "--device", dev,
                   "--threads", str(thr), "--out", str(work), "--worker-id", f"{kind}{i}"]  # fmt: skip
            log = open(work / f"{kind}{i}.log", "w")  # noqa: SIM115 (the worker owns it until exit)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=e, start_new_session=False))
            time.sleep(0.5)
    while time.time() - t0 < args.deadline and any(pr.poll() is None for pr in procs):
        time.sleep(2)
    for pr in procs:
        if pr.poll() is None:
            pr.send_signal(signal.SIGTERM)
    time.sleep(2)
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
    rows = []
    for f in sorted(work.glob("*.jsonl")):
        rows += f.read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(rows) + "\n")
    with tarfile.open(out / "grids_logs.tar.gz", "w:gz") as tar:
        for f in sorted(work.glob("*.png")) + sorted(work.glob("*.log")):
            tar.add(f, arcname=f.name)
    print(f"launcher done in {time.time() - t0:.0f}s, {len(rows)} rows", flush=True)
    for r in rows:
        if '"eval"' in r or '"throughput"' in r or '"error"' in r:
            print(r[:400])


if __name__ == "__main__":
    main()
