"""Training step and sampling of our model vs the public reference code (FLUID), same weights, side by side.

    python bench/reference_bench.py --reference /tmp/lightgen_ref [--bf16] [--compile] [--threads 2]

The reference tree (git archive of github XianfengWu01/LightGen) is imported from ``--reference``, never copied;
it needs ``timm`` (not a project dependency: ``pip install timm``), and its ``.cuda()`` calls are made no-ops on a
CPU. The config (12.96 M parameters): 256-px images as 16x16 tokens of 16 channels (vae_stride 16, patch 1),
width 192 with 3 heads, 6 encoder + 6 decoder + 6 cross blocks, 4 text-aligner blocks, head 2 x 384, 100 head
sampling steps, T5-XXL-shaped text (128 x 4096, the reference's max_length and caption width), no dropout. Both
models get the reference's weights (our side through ``lightgen.convert``, as ``lightgen convert-reference`` does),
and a check that they compute the same function runs first. Then, alternating in one process: training steps
(forward + backward + AdamW, batch 16) and sampling (the reference's ``sample_tokens`` vs our ``generate``: 64
iterations, constant cfg 4.0, temperature 1.0, as the reference's generation scripts sample; batch 16).
``--bf16`` (bf16 autocast) and ``--compile`` (the trainer's ``train.compile``) apply to our side only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightgen.convert import check_keys, infer_config  # noqa: E402
from lightgen_model import LightGen, count_parameters, generate  # noqa: E402
from training.dist import compile_blocks  # noqa: E402

# the reference's FLUID arguments (models/fluid_arbitrary.py) of the benchmarked config
WIDTH, HEADS, DEPTH, TEXT_DEPTH, HEAD_DEPTH, HEAD_WIDTH = 192, 3, 6, 4, 2, 384
GEOMETRY = {"img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16}
TEXT_LEN, TEXT_DIM = 128, 4096


def load_reference(root: Path, head_steps: str) -> nn.Module:
    """The reference's FLUID at the benchmarked config, imported from its tree."""
    if not torch.cuda.is_available():  # its tensors are made with .cuda(); on a CPU they stay where they are
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(root))
    from models.fluid_arbitrary import FLUID

    stacks = {
        f"{s}_{k}": v for s in ("encoder", "decoder", "cross") for k, v in (("depth", DEPTH), ("num_heads", HEADS))
    }
    dims = {f"{s}_embed_dim": WIDTH for s in ("encoder", "decoder", "cross")}
    return FLUID(
        **GEOMETRY,
        **stacks,
        **dims,
        text_depth=TEXT_DEPTH,
        mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        caption_channels=TEXT_DIM,
        max_length=TEXT_LEN,
        interpolate_offset=0.1,
        attn_dropout=0.0,
        proj_dropout=0.0,
        diffloss_d=HEAD_DEPTH,
        diffloss_w=HEAD_WIDTH,
        num_sampling_steps=head_steps,
        diffusion_batch_mul=4,
    )


def ours_from(ref: nn.Module, head_steps: str) -> LightGen:
    """Our model with the reference's weights, configured as ``lightgen convert-reference`` would."""
    state = ref.state_dict()
    args = {**GEOMETRY, "max_length": TEXT_LEN, "attn_dropout": 0.0, "proj_dropout": 0.0}
    args |= {"num_sampling_steps": head_steps, "diffusion_batch_mul": 4}
    model = LightGen(infer_config(state, args, heads=HEADS))
    check_keys(state, model, "reference")
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def check_same_function(ref: nn.Module, ours: LightGen, g: torch.Generator) -> float:
    """Largest |difference| of the head's output for the same tokens, mask, text, timesteps and noisy inputs."""
    ref.eval(), ours.eval()
    B, L, C = 2, 256, GEOMETRY["vae_embed_dim"]
    tokens, text = torch.randn(B, L, C, generator=g), torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.zeros(B, L)
    mask[:, torch.randperm(L, generator=g)[:180]] = 1.0  # the same count per row, as the reference needs
    x = ref.forward_fluid_decoder(ref.forward_fluid_encoder(tokens, mask), mask)
    z_ref = ref.forward_fluid_text_decoder(x, ref.text_emb(text))  # (B, L, D)
    ctx, ctx_mask = ours.encode_text(text)
    z = ours.cross(ours.encode_decode(tokens, mask.bool(), (16, 16)), ctx, ctx_mask, ours.cross_pos((16, 16)))
    x_t, t = torch.randn(B * L, C, generator=g), torch.randint(0, 1000, (B * L,), generator=g)
    out_ref = ref.diffloss.net(x_t, t, z_ref.flatten(0, 1))
    net = ours.diffloss.net
    out = net(x_t, net.time_embed(t) + net.cond_embed(z.flatten(0, 1)))
    return max(float((z - z_ref).abs().max()), float((out - out_ref).abs().max()))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], amp, is_ref: bool) -> None:
    lat, text = batch
    with amp:
        loss = model(lat, text, height=256, width=256) if is_ref else model(lat, text)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sample(model: nn.Module, text: Tensor, amp, is_ref: bool, iters: int) -> None:
    settings = {"num_iter": iters, "cfg": 4.0, "cfg_schedule": "constant", "temperature": 1.0}
    with torch.no_grad(), amp:
        if is_ref:
            model.sample_tokens(bsz=text.shape[0], texts=text, height=256, width=256, **settings)
        else:
            generate(model, text, None, 256, generator=torch.Generator().manual_seed(0), **settings)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="the reference code's tree (git archive)")
    p.add_argument("--bf16", action="store_true", help="our side under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="our side torch.compiled as train.compile does")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-rounds", type=int, default=5, help="timed steps per side (after 2 warm-up steps)")
    p.add_argument("--sample-rounds", type=int, default=1, help="timed sample batches per side (after a warm-up)")
    p.add_argument("--sample-iters", type=int, default=64)
    p.add_argument("--head-steps", default="100", help="the head's sampling steps (the reference's default)")
    p.add_argument("--no-sample", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as from_pretrained does; applies to both sides
    torch.manual_seed(0)
    ref = load_reference(args.reference, args.head_steps)
    ours = ours_from(ref, args.head_steps)
    g = torch.Generator().manual_seed(0)
    diff = check_same_function(ref, ours, g)
    print(f"parameters {count_parameters(ours)['total'] / 1e6:.2f} M; same function: max |diff| {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the two models do not compute the same function")
    if args.compile:
        compile_blocks(ours)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    sides = {"reference": (ref, contextlib.nullcontext(), True), "ours": (ours, amp, False)}
    opts = {
        k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
        for k, (m, _, _) in sides.items()
    }
    lat = torch.randn(args.batch, 16, 16, 16, generator=g)
    text = torch.randn(args.batch, TEXT_LEN, TEXT_DIM, generator=g)
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "sample": []} for k in sides}
    for k, (m, a, is_ref) in sides.items():
        m.train()
        for _ in range(2):
            train_step(m, opts[k], (lat, text), a, is_ref)
    for _ in range(args.train_rounds):  # alternating, so that load changes hit both sides alike
        for k, (m, a, is_ref) in sides.items():
            times[k]["train"].append(timed(lambda: train_step(m, opts[k], (lat, text), a, is_ref)))  # noqa: B023
    if not args.no_sample:
        for m, a, is_ref in sides.values():
            m.eval()
            sample(m, text[:2], a, is_ref, 4)
        for _ in range(args.sample_rounds):
            for k, (m, a, is_ref) in sides.items():
                times[k]["sample"].append(timed(lambda: sample(m, text, a, is_ref, args.sample_iters)))  # noqa: B023
    report(times, args)


def report(times: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    """A table of medians: s per train step, s per sample batch, and reference / ours."""
    med = {k: {w: statistics.median(v) if v else float("nan") for w, v in t.items()} for k, t in times.items()}
    ours = "ours" + "".join(f" +{f}" for f in ("bf16", "compile") if getattr(args, f))
    print(
        f"threads {args.threads}, batch {args.batch}; median of {args.train_rounds} steps / {args.sample_rounds} batches"
    )
    print(f"| side | train step (s) | sample batch (s, {args.sample_iters} it, {args.head_steps} head steps) |")
    print("| --- | --- | --- |")
    print(f"| reference | {med['reference']['train']:.3f} | {med['reference']['sample']:.2f} |")
    print(f"| {ours} | {med['ours']['train']:.3f} | {med['ours']['sample']:.2f} |")
    ratio = {w: med["reference"][w] / med["ours"][w] for w in ("train", "sample")}
    print(f"| speed-up (reference / ours) | {ratio['train']:.2f}x | {ratio['sample']:.2f}x |")


if __name__ == "__main__":
    main()
