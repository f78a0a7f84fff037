"""Masked iterative generation and zero-shot inpainting (free functions over a ``LightGen``).

One loop serves both: each sample has a set of tokens to generate (all of them for generation, the
masked region for inpainting); in a random order, a cosine schedule reveals them over ``num_iter`` steps.
Under CFG the image-only encoder/decoder runs once and only the cross stack and head see both branches,
batched together; the cross stack and the head run only on the tokens predicted at that step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .config import CFG_SCHEDULES, check_sampling
from .mar import CrossContext, LightGen, gather_rows, select_rows
from .rng import rand, randn

# one generator for the whole batch, or one per row (a batch then equals each row generated alone)
Generator = torch.Generator | list[torch.Generator] | None

__all__ = ["CFG_SCHEDULES", "generate", "inpaint", "masked_generation", "pixel_mask_to_tokens"]


def reveal_counts(n: Tensor, remaining: Tensor, step: int, num_iter: int) -> Tensor:
    """How many tokens stay unknown after ``step`` (MaskGIT cosine schedule, at least one revealed per
    step while more than one remains, all revealed at the last step). n, remaining: (B,) long."""
    if step >= num_iter - 1:
        return torch.zeros_like(remaining)
    keep = torch.floor(n.double() * math.cos(math.pi / 2 * (step + 1) / num_iter)).long()
    keep = torch.maximum(torch.ones_like(keep), torch.minimum(remaining - 1, keep))
    return torch.minimum(keep, remaining)


@torch.no_grad()
def masked_generation(
    model: LightGen,
    tokens: Tensor,
    gen_mask: Tensor,
    grid: tuple[int, int],
    text: Tensor,
    text_mask: Tensor | None = None,
    num_iter: int = 64,
    cfg: float = 4.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    generator: Generator = None,
    callback: Callable[[int, Tensor], None] | None = None,
    batch_uncond: bool | None = None,
) -> Tensor:
    """Fill the positions ``gen_mask`` (B, L, True = generate) of ``tokens`` (B, L, C); the rest is kept
    bit-identical. Returns new tokens (B, L, C). ``batch_uncond`` forces (True) or skips (False) the
    unconditional branch; by default it runs when cfg != 1."""
    check_sampling(num_iter, cfg, cfg_schedule, temperature)
    B, L, _ = tokens.shape
    dev = tokens.device
    tokens, gen_mask = tokens.clone(), gen_mask.to(dev).bool()
    n = gen_mask.sum(1)  # (B,)
    gens = _row_generators(generator, B)
    draw = rand((B, L), generator, dev) if gens is None else torch.cat([rand((1, L), g, dev) for g in gens])
    scores = torch.where(gen_mask, draw, torch.full_like(gen_mask, 2.0, dtype=torch.float))
    rank = torch.argsort(torch.argsort(scores, dim=1), dim=1)  # rank[b, pos]: its place in the random order
    ctx, ctx_mask = model.encode_text(text, text_mask)
    use_cfg = cfg != 1.0 if batch_uncond is None else batch_uncond
    if use_cfg:
        ctx = torch.cat([ctx, model.null_context(ctx)])
        ctx_mask = None if ctx_mask is None else torch.cat([ctx_mask, ctx_mask])
    kv = model.cross_context(ctx)  # the text's keys and values: the same in every iteration
    mask = gen_mask.clone()
    for step in range(num_iter):
        keep = reveal_counts(n, mask.sum(1), step, num_iter)
        mask_next = rank < keep[:, None]
        to_pred = mask & ~mask_next
        if bool(to_pred.any()):
            x = model.encode_decode(tokens, mask, grid)  # (B, L, Dd), text-independent
            scale = _cfg_scale(cfg, cfg_schedule, n, keep) if use_cfg else None
            new = _predict(model, x, to_pred, grid, kv, ctx_mask, scale, temperature, generator, gens)  # (M, C)
            tokens[to_pred] = new.to(tokens.dtype)
        mask = mask_next
        if callback is not None:
            callback(step, tokens)
    return tokens


def _predict(
    model: LightGen,
    x: Tensor,
    to_pred: Tensor,
    grid: tuple[int, int],
    kv: CrossContext,
    ctx_mask: Tensor | None,
    scale: Tensor | None,
    temperature: float,
    generator: Generator,
    gens: list[torch.Generator] | None,
) -> Tensor:
    """New values (M, C) of the M tokens ``to_pred`` (B, L) from decoder states x (B, L, Dd), in row-major order.

    ``scale`` (B,): the guidance scale per sample, with ``kv`` (the cross stack's keys and values of the text)
    holding the conditional then the unconditional context (2B rows); None: no guidance, ``kv`` of B rows."""
    B = x.shape[0]
    idx, valid = select_rows(to_pred)  # (B, m)
    xs, pos = gather_rows(x, idx), model.cross_pos(grid, idx)
    noise = _row_noise(gens, valid, model, x.device)
    shared = None if gens else generator
    if scale is None:
        z = model.cross(xs, kv, ctx_mask, pos)[valid]  # (M, Dc)
        return model.diffloss.sample(z, None, 1.0, temperature, shared, noise=noise)
    z = model.cross(torch.cat([xs, xs]), kv, ctx_mask, torch.cat([pos, pos]))  # (2B, m, Dc)
    z_c, z_u = z[:B][valid], z[B:][valid]  # (M, Dc) each
    scale = scale[:, None].expand_as(valid)[valid]  # (M,)
    return model.diffloss.sample(z_c, z_u, scale, temperature, shared, noise=noise)


def _row_generators(generator: Generator, B: int) -> list[torch.Generator] | None:
    if not isinstance(generator, (list, tuple)):
        return None
    if len(generator) != B:
        raise ValueError(f"got {len(generator)} generators for a batch of {B}: give one per row, or one for all")
    return list(generator)


def _row_noise(gens: list[torch.Generator] | None, valid: Tensor, model: LightGen, dev: torch.device) -> Tensor | None:
    """Head noise (steps, M, C) with each row's tokens drawn from that row's own generator (row-major order,
    as ``z[valid]``): a batch then reproduces each row's single-image result."""
    if gens is None:
        return None
    steps, C = model.diffloss.sample_schedule.num_steps, model.diffloss.token_dim
    counts = valid.sum(1).tolist()
    return torch.cat([randn((steps, int(c), C), g, dev) for g, c in zip(gens, counts, strict=True)], dim=1)


def _cfg_scale(cfg: float, schedule: str, n: Tensor, keep: Tensor) -> Tensor:
    """Per-sample guidance scale; 'linear' grows from 1 to cfg as tokens are revealed (Muse), reaching cfg at the
    last step; 'linear-reference' takes the reference's mask length, clamped to >= 1 also at the last step, where
    its scale is then 1 + (cfg - 1)(n - 1)/n."""
    if schedule == "constant":
        return torch.full(n.shape, float(cfg), device=n.device)
    if schedule == "linear-reference":
        keep = keep.clamp(min=1)
    return 1.0 + (cfg - 1.0) * (n - keep).float() / n.clamp(min=1).float()


def _resolve_grid(model: LightGen, resolution: int | tuple[int, int] | None) -> tuple[int, int]:
    if resolution is None:
        resolution = model.cfg.base_resolution
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    return model.cfg.grid_for(h, w)


@torch.no_grad()
def generate(
    model: LightGen,
    text: Tensor,
    text_mask: Tensor | None = None,
    resolution: int | tuple[int, int] | None = None,
    **settings: Any,
) -> Tensor:
    """Text-to-latents. text (B, Lt, text_dim) frozen-encoder states; resolution in pixels (int or (H, W));
    ``settings``: `masked_generation`'s keywords (num_iter, cfg, cfg_schedule, temperature, generator, callback).
    Returns normalised latents (B, C, H/stride, W/stride)."""
    grid = _resolve_grid(model, resolution)
    B, L = text.shape[0], grid[0] * grid[1]
    p = next(model.parameters())
    tokens = torch.zeros(B, L, model.cfg.token_dim, device=text.device, dtype=p.dtype)
    gen_mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
    out = masked_generation(model, tokens, gen_mask, grid, text, text_mask, **settings)
    return model.unpatchify(out, grid)


@torch.no_grad()
def inpaint(
    model: LightGen, latents: Tensor, token_mask: Tensor, text: Tensor, text_mask: Tensor | None = None, **settings: Any
) -> Tensor:
    """Zero-shot inpainting. latents (B, C, H, W); token_mask (B, L) or (B, h, w), True = regenerate.
    Tokens outside the mask come back bit-identical. ``settings`` are ``masked_generation``'s (``num_iter``, ``cfg``,
    ``cfg_schedule``, ``temperature``, ``generator``, ``callback``), with its defaults."""
    grid = model.latent_grid(latents)
    B, L = latents.shape[0], grid[0] * grid[1]
    if token_mask.shape not in ((B, L), (B, *grid)):
        raise ValueError(f"token_mask of shape {tuple(token_mask.shape)} does not match batch {B} and grid {grid}")
    out = masked_generation(model, model.patchify(latents), token_mask.reshape(B, L), grid, text, text_mask, **settings)
    return model.unpatchify(out, grid)


def pixel_mask_to_tokens(mask: Tensor, pixels_per_token: int, threshold: float = 0.0) -> Tensor:
    """(B, H, W) pixel mask (nonzero = regenerate) -> (B, h, w) token mask: a token is regenerated when
    more than ``threshold`` of its pixels are masked."""
    B, H, W = mask.shape
    p = pixels_per_token
    if H % p or W % p:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the token size {p} px")
    frac = mask.float().reshape(B, H // p, p, W // p, p).mean(dim=(2, 4))
    return frac > threshold
