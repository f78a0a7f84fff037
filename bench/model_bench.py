"""Train-step and sampling throughput of a preset on random data, with the MFU it implies.

    python bench/model_bench.py --preset debug --device cpu
    python bench/model_bench.py --preset lightgen --device cuda --batch 64 --compile

Training: forward + backward + AdamW step on random latents and random-length text (padded to the
batch's longest), bf16 autocast on CUDA. FLOPs are counted by torch's FlopCounterMode on one real
step (matmuls and attention), so MFU counts the work our implementation does, not a formula.
Sampling: ``generate`` at 64 iterations (CFG on), images/s.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import bench_parser  # noqa: E402
from lightgen_model import LightGen, generate, preset  # noqa: E402
from training.metrics import peak_flops  # noqa: E402  (the trainer's table of dense bf16 peaks)

SDPA = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "math": "MATH"}


def random_batch(cfg, B: int, res: int, device: str, g: torch.Generator, max_text: int):
    h = res // cfg.vae_stride
    lat = torch.randn(B, cfg.latent_channels, h, h, generator=g).to(device)
    lengths = torch.randint(max(1, max_text // 6), max_text + 1, (B,), generator=g)
    Lt = int(lengths.max())
    text = torch.randn(B, Lt, cfg.text_dim, generator=g).to(device)
    mask = (torch.arange(Lt)[None] < lengths[:, None]).to(device)
    return lat, text, mask


def bench_train(model: LightGen, args, device: str) -> dict:
    cfg = model.cfg
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02, fused=fused)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(cfg, args.batch, args.resolution, device, g, args.max_text) for _ in range(4)]

    def step(i: int) -> float:
        lat, text, mask = batches[i % len(batches)]
        with amp:
            loss = model(lat, text, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    for i in range(args.warmup):
        step(i)
    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    flops_per_step = counter.get_total_flops()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    float(loss.detach())
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    out = {"img_per_s": args.batch / dt, "step_s": dt, "flops_per_img": flops_per_step / args.batch}
    peak = peak_flops(torch.device(device))
    if peak:
        out["mfu"] = flops_per_step / dt / peak
        out["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench_sample(model: LightGen, args, device: str) -> dict:
    cfg = model.cfg
    model.eval()
    g = torch.Generator().manual_seed(0)
    _, text, mask = random_batch(cfg, args.sample_batch, args.resolution, device, g, args.max_text)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run = lambda n: generate(model, text, mask, args.resolution, num_iter=n, cfg=4.0, generator=g)
    with amp:
        run(4)
        sync()
        t0 = time.perf_counter()
        run(args.sample_iters)
        sync()
    dt = time.perf_counter() - t0
    return {"sample_img_per_s": args.sample_batch / dt, "sample_iters": args.sample_iters, "sample_s": dt}


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = bench_parser(__doc__, preset="debug", device=device, batch=32, warmup=3, steps=10)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the preset's base)")
    p.add_argument("--max-text", type=int, default=None, help="longest text (default: the preset's max_text_len)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--sample-iters", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block and the head")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--no-sample", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-denormals", action="store_true", help="CPU: do not flush denormals (they cost up to 6x)")
    p.add_argument(
        "--sdpa", default="auto", choices=["auto", *SDPA], help="restrict SDPA to one backend (default: torch's choice)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    cfg = preset(args.preset, grad_checkpointing=args.checkpointing)
    args.resolution = args.resolution or cfg.base_resolution
    args.max_text = args.max_text or cfg.max_text_len
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = LightGen(cfg).to(args.device)
    if args.compile:
        for blocks in (
            model.encoder_blocks,
            model.decoder_blocks,
            model.cross_attn_blocks,
            model.text_emb.text_aligner,
        ):
            for blk in blocks:
                blk.compile(dynamic=True)
        model.diffloss.net.compile(dynamic=True)
    res = {"preset": args.preset, "device": args.device, "batch": args.batch, "resolution": args.resolution}
    res["torch"] = torch.__version__
    res["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res["compile"] = args.compile
    res["threads"] = torch.get_num_threads()
    res["flush_denormal"] = not args.keep_denormals
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        res["sdpa"] = args.sdpa
        backend = sdpa_kernel([getattr(SDPBackend, SDPA[args.sdpa])])
    else:
        backend = contextlib.nullcontext()
    with backend:
        if not args.no_train:
            res |= bench_train(model, args, args.device)
        if not args.no_sample:
            res |= bench_sample(model, args, args.device)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
