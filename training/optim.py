"""AdamW with weight-decay groups, the lr schedule (steps, or the elapsed share of a time budget), gradient clipping, and an
EMA of the weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimSection

# learned tables and tokens (3-D parameters) that the default grouping does not decay
NO_DECAY_NAMES = ("pos_embed", "mask_token", "buffer_tokens", "fake_latent")


def param_groups(model: nn.Module, weight_decay: float, groups: str = "default") -> list[dict]:
    """Two groups: decayed parameters, and ones without weight decay.

    ``groups="default"``: no decay on biases, norms (1-D), the whole diffusion head (as the reference) and, unlike
    the reference, the positional tables and learned tokens (mask token, null text, buffer tokens).
    ``groups="reference"``: exactly the reference's ``add_weight_decay``: no decay on 1-D parameters, biases and
    the diffusion head only, so the 3-D positional tables, mask token and null text are decayed (for finetuning a
    converted checkpoint as it was trained).
    """
    if groups not in ("default", "reference"):
        raise ValueError(f"weight-decay groups must be 'default' or 'reference', got {groups!r}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or "diffloss" in name
        if groups == "default":
            skip = skip or any(k in name for k in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimSection, global_batch: int) -> float:
    """lr = blr x global batch / 256 (or the absolute `lr`), times `lr_scale`."""
    base = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256
    return base * cfg.lr_scale


def lr_at(step: int, peak: float, cfg: OptimSection, total_steps: int, share: float = 0.0) -> float:
    """Linear warm-up to `peak`, then constant or cosine down to `min_lr_ratio * peak`. The cosine's progress is the
    step share after warm-up, `(step - warmup) / (total_steps - warmup)`, or `share` (elapsed share of a time
    budget) when that is larger."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, max((step - cfg.warmup_steps) / span, share))
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))


class LRSchedule:
    """`lr_at` over a length fixed before the run: `optim.schedule_steps`, else `train.max_steps` — a budget in work,
    so the same command gives the same schedule (and on a CPU the same model) on any machine. With a time budget
    (`train.budget_minutes`) the cosine also follows the elapsed share of that budget (`lr(step, elapsed_s)`): a
    slower machine stops earlier but still anneals to the floor by the end of the budget."""

    def __init__(
        self,
        cfg: OptimSection,
        peak: float,
        max_steps: int,
        budget_minutes: float | None,
        recorded_total: int | None = None,
    ) -> None:
        self.cfg, self.peak = cfg, peak
        self.total = recorded_total or cfg.schedule_steps or max_steps
        self.budget_s = 60 * budget_minutes if budget_minutes else None

    def share(self, elapsed_s: float) -> float:
        """The elapsed share of the time budget (0 without one)."""
        return min(1.0, elapsed_s / self.budget_s) if self.budget_s else 0.0

    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        """The learning rate of step `step` (0-based) after `elapsed_s` seconds of training."""
        return lr_at(step, self.peak, self.cfg, self.total, self.share(elapsed_s))


def clip_grad(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The total gradient norm (a full tensor under FSDP2), clipped to `max_norm` when that is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    if max_norm and max_norm > 0:
        n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        n = torch.nn.utils.get_total_norm([p.grad for p in params])
    return n.full_tensor() if hasattr(n, "full_tensor") else n


def build_optimizer(model: nn.Module, cfg: OptimSection, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups` (fused on CUDA unless `optim.fused` says otherwise)."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.weight_decay_groups),
        lr=lr,
        betas=tuple(cfg.betas),
        fused=bool(fused) or None,
    )


class EMA:
    """Exponential moving average of a model's parameters (fp32), keyed like `model.named_parameters()`.

    With FSDP2 the tensors are the local shards (DTensors) and `state_dict` gathers them; with DDP only the
    main process keeps an EMA (every rank's weights are equal)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.shadow = [p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameters."""
        params = [p.detach() for _, p in model.named_parameters() if p.requires_grad]
        if params and params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)
        else:
            for s, p in zip(self.shadow, params, strict=True):
                s.lerp_(p.float(), 1.0 - self.decay)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set the shadow from full tensors by parameter name (each rank takes its shard under FSDP2)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow, strict=True):
                src = state[n].to(device=s.device, dtype=s.dtype)
                if hasattr(s, "to_local"):  # FSDP2 shard: take this rank's part of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src, s.device_mesh, s.placements)
                s.copy_(src)

    def full(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 tensors by parameter name."""
        return {
            n: (s.full_tensor() if hasattr(s, "full_tensor") else s)
            for n, s in zip(self.names, self.shadow, strict=True)
        }
