"""Where a training step's GPU time goes: PyTorch profiler over 3 steps of a preset (default lightgen, batch 64).

    python bench/profile_step.py [--preset lightgen] [--batch 64] [--steps 3] [--rows 25]

Same step as bench/model_bench.py (bf16 autocast, fused AdamW, grad clipping), eager, after 3 warm-up steps.
Prints the kernels/ops sorted by CUDA time, then a coarse breakdown by kernel family.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_bench import SDPA, random_batch  # noqa: E402

from lightgen_model import LightGen, preset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="lightgen")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    p.add_argument("--sdpa", default="auto", choices=["auto", *SDPA], help="restrict SDPA to one backend")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = LightGen(cfg).to("cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(cfg, args.batch, cfg.base_resolution, "cuda", g, cfg.max_text_len) for _ in range(4)]

    def step(i: int) -> None:
        lat, text, mask = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(lat, text, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel([getattr(SDPBackend, SDPA[args.sdpa])])
    else:
        backend = contextlib.nullcontext()
    with backend:
        for i in range(3):
            step(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.steps):
                step(i)
            torch.cuda.synchronize()
    print(f"sdpa={args.sdpa} batch={args.batch}: unprofiled step {wall * 1e3:.1f} ms")
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))

    # Coarse breakdown over device kernels only (events with no CPU-side children are kernels/memcpys).
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kern) or 1.0
    fam: dict[str, float] = {}
    for e in kern:
        n = e.name.lower()
        if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
            k = "matmul (cuBLAS/CUTLASS)"
        elif "flash" in n or "fmha" in n or "attention" in n or "efficient" in n:
            k = "attention (SDPA)"
        elif "adam" in n or "foreach" in n or "multi_tensor" in n:
            k = "optimizer / foreach"
        elif "memcpy" in n or "memset" in n:
            k = "memcpy/memset"
        elif "reduce" in n or "norm" in n:
            k = "reductions / norms"
        else:
            k = "other elementwise"
        fam[k] = fam.get(k, 0.0) + e.device_time
    print(f"\nGPU kernel time over {args.steps} steps: {total / 1e3:.1f} ms ({total / 1e3 / args.steps:.1f} ms/step)")
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v / 1e3:9.1f} ms  {100 * v / total:5.1f}%")
    print(f"  kernels launched per step: {len(kern) // args.steps}")
    by_kernel: dict[str, list[float]] = {}
    for e in kern:
        by_kernel.setdefault(e.name, []).append(e.device_time)
    print(f"\nTop {args.rows} GPU kernels by total time (per step):")
    for name, ts in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[: args.rows]:
        tot = sum(ts)
        print(
            f"  {tot / 1e3 / args.steps:8.2f} ms  {100 * tot / total:5.1f}%  x{len(ts) // args.steps:<5d} {name[:110]}"
        )
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
