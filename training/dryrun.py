"""`--dry-run` of `training/pretrain.py` and `training/dpo.py`: one training step of the configured model and
micro-batch on the meta device (no shards, weights or checkpoints read; nothing written).

The trainer's own ``loss`` (the masked diffusion loss, or Diffusion-DPO with its frozen reference) runs forward and
backward on meta tensors. Reported: FLOPs per image (forward + backward counted; the AdamW and EMA updates are
element-wise, so they are estimated at ``OPT_FLOPS_PER_PARAM`` per parameter and step), the activation peak
(measured on meta with bf16 weights, the storage autocast gives matmul outputs, and gradients dropped as they are
accumulated, see lightgen/meta.py), and memory per GPU for DDP and FSDP2 at ``--gpus N``:

- DDP: fp32 weights, gradients and DDP's gradient buckets (4 B each per parameter), AdamW's two moments (8 B), the
  EMA (4 B, if on), autocast's bf16 weight copies (2 B), the DPO reference (4 or 2 B), plus the activation peak.
- FSDP2 (``fully_shard`` per block, as training/dist.py): weights, gradients, moments and EMA divided by N; the
  root unit (what no block holds: embeddings, tables, the diffusion head) and two blocks (the one running and the
  one prefetched) unsharded in fp32, plus autocast copies, the reference and the activation peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightgen.fullsize import lightgen_config, lightgen_model
from lightgen.meta import measure

OPT_FLOPS_PER_PARAM = 18  # AdamW ~15 element-wise FLOPs per parameter (moments, bias corrections, decay) + EMA 3
GIB = 1024**3
BLOCK_LISTS = ("encoder_blocks", "decoder_blocks", "cross_attn_blocks")


def expected_mask_ratio(mcfg: Any) -> float:
    """The mean of the training mask ratio: a normal(1, std) truncated to [mask_ratio_min, 1]."""
    lo, std = mcfg.mask_ratio_min, mcfg.mask_ratio_std
    a = torch.tensor((lo - 1.0) / std, dtype=torch.float64)
    pdf = lambda x: torch.exp(-0.5 * x**2) / (2 * torch.pi) ** 0.5
    mean = 1.0 + std * (pdf(a) - pdf(torch.zeros((), dtype=torch.float64))) / (0.5 - torch.special.ndtr(a))
    return float(mean)


def model_config(trainer: Any) -> Any:
    """The trainer's model config; a ``model.init_from`` that is not a local directory may name a conf/models
    folder (``lightgen``): its config.json then stands in for the checkpoint's."""
    init = trainer.cfg.model.init_from
    if init and not (Path(init) / "config.json").is_file():
        try:
            return lightgen_config(init).replace(**trainer.cfg.model.overrides)
        except ValueError:
            raise ValueError(
                f"model.init_from={init} does not exist; a dry run takes a model directory or a conf/models name "
                "(model.init_from=lightgen)"
            ) from None
    return trainer.model_config(None)


def _inputs(trainer: Any, mcfg: Any, batch: int, resolution: int, text_len: int) -> dict[str, torch.Tensor]:
    """A batch as the collate function gives it, text of ``text_len`` tokens, on meta tensors."""
    side = resolution // mcfg.vae_stride
    lat = lambda: torch.empty(batch, mcfg.latent_channels, side, side, device="meta", dtype=torch.bfloat16)
    out = {
        "text": torch.empty(batch, text_len, mcfg.text_dim, device="meta", dtype=torch.bfloat16),
        "text_mask": torch.ones(batch, text_len, dtype=torch.bool, device="meta"),
    }
    if trainer.kind == "dpo":
        return out | {"winner": lat(), "loser": lat()}
    return out | {"latents": lat()}


def _block_params(model: nn.Module) -> tuple[int, int]:
    """(parameters outside every FSDP block unit, parameters of the largest block)."""
    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name)] + list(model.text_emb.text_aligner)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())
    return total - sum(sizes), max(sizes, default=0)


def memory_per_gpu(params: int, root: int, block: int, act: int, gpus: int, ema: bool, ref_bytes: int) -> dict:
    """Bytes per GPU for DDP and FSDP2 (see the module docstring)."""
    states = params * (4 + 4 + 8 + (4 if ema else 0))  # weights, gradients, AdamW moments, EMA (fp32)
    common = 2 * params + ref_bytes + act  # autocast copies, DPO reference, activations
    return {
        "ddp": states + 4 * params + common,
        "fsdp2": states // gpus + 4 * (root + 2 * block) + common,
    }


def dry_train(
    trainer_cls: type, cfg: Any, gpus: int = 1, resolution: int | None = None, text_len: int | None = None
) -> dict[str, Any]:
    """One step of ``trainer_cls``'s loss on the meta device at the configured micro-batch; FLOPs and memory.
    Captions fill the model's ``max_text_len`` unless ``text_len`` says otherwise."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    trainer = trainer_cls(cfg)
    mcfg = model_config(trainer)
    res = resolution or mcfg.base_resolution
    mcfg.grid_for(res, res)  # raises on a size that does not tile
    B = cfg.data.batch_size
    model = lightgen_model(mcfg, torch.bfloat16).train()
    ratio = expected_mask_ratio(mcfg)
    model.sample_mask_ratio = lambda generator=None: ratio  # the mean draw, so that FLOPs are the expected ones
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    for p in model.parameters():  # drop each gradient once accumulated: the peak is the activations' own
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ref_bytes = 0
    if trainer.kind == "dpo":
        ref_dtype = torch.float32 if cfg.dpo.reference_dtype == "float32" else torch.bfloat16
        trainer.reference = lightgen_model(mcfg, torch.bfloat16).eval().requires_grad_(False)
        ref_bytes = sum(p.numel() for p in model.parameters()) * (4 if ref_dtype == torch.float32 else 2)
    batch = _inputs(trainer, mcfg, B, res, text_len or mcfg.max_text_len)

    def step() -> torch.Tensor:
        loss, _ = trainer.loss(model, batch)
        loss.backward()
        return loss

    m, _ = measure(step)
    params = sum(p.numel() for p in model.parameters())
    root, block = _block_params(model)
    accum, images = cfg.optim.grad_accum, B * (2 if trainer.kind == "dpo" else 1)
    global_batch = B * gpus * accum
    opt = OPT_FLOPS_PER_PARAM * params / (B * gpus * accum)
    mem = memory_per_gpu(params, root, block, m.peak_bytes, gpus, cfg.optim.ema_decay > 0, ref_bytes)
    return {
        "dry_run": trainer.kind,
        "resolution": res,
        "mask_ratio": round(ratio, 4),
        "micro_batch": B,
        "gpus": gpus,
        "grad_accum": accum,
        "global_batch": global_batch,
        "parameters": params,
        "flops_fwd_bwd_per_item": m.flops / B,
        "flops_optimizer_per_item": opt,
        "flops_per_item": m.flops / B + opt,
        "latent_images_per_item": images // B,
        "peak_activation_bytes": m.peak_bytes,
        "memory_per_gpu_bytes": mem,
        "memory_per_gpu_gib": {k: round(v / GIB, 1) for k, v in mem.items()},
        "seconds": round(m.seconds, 2),
    }
