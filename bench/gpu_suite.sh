#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md: the lightgen preset at 256 px, bf16, eager and compiled.
# Usage (on a CUDA machine, repository root): bash bench/gpu_suite.sh [OUTDIR]
set -u
out=${1:-${OUT:-runs/bench}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
run() { echo "== $*"; timeout 420 python3 bench/model_bench.py "$@" 2>&1 | tee -a "$out/log.txt" | tail -3; }
run --preset lightgen --device cuda --batch 64 --steps 10 --sample-batch 64 --sample-iters 64
# Batch 128 does not fit in 80 GB without --checkpointing (eager b64 peaks at ~58 GiB, ~0.72 GiB per image
# on top of ~12 GiB of weights, grads and AdamW state; eager and compiled b128 both OOM on an H100 80GB).
# So: the largest eager batch that fits, and the compiled run at b64, comparable with the eager b64 line.
run --preset lightgen --device cuda --batch 80 --steps 10 --no-sample
run --preset lightgen --device cuda --batch 64 --steps 10 --compile --no-sample
grep '^{' "$out/log.txt" > "$out/results.jsonl"
