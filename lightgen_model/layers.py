"""Building blocks: attention through SDPA with key padding masks, ViT blocks, cross blocks, AdaLN.

Parameter names follow timm's ViT ``Block`` and the public reference so that its checkpoints map
one-to-one (see ``convert.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout: float) -> Tensor:
    """q (B, h, Lq, d), k/v (B, h, Lk, d); key_mask (B, Lk) True = attend. Returns (B, h, Lq, d)."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)


class Attention(nn.Module):
    """Multi-head self-attention (timm layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        # unbind, not indexing: one backward op instead of three zero-filled copies of qkv
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = _sdpa(q, k, v, key_mask, self.attn_drop if self.training else 0.0)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Image tokens query text keys/values (reference layout: ``query_linear``, ``kv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.query_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def context(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, h, Lk, d) of the text ``ctx`` (B, Lk, D)."""
        B, Lk, D = ctx.shape
        k, v = self.kv(ctx).view(B, Lk, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: Tensor, ctx: Tensor | tuple[Tensor, Tensor], key_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D) queries the text ``ctx`` (B, Lk, D), or its keys and values from ``context``."""
        B, L, D = x.shape
        q = self.query_linear(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, h, L, d)
        k, v = self.context(ctx) if isinstance(ctx, Tensor) else ctx
        out = _sdpa(q, k, v, key_mask, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, D)))


class Mlp(nn.Module):
    """Two-layer MLP with GELU (timm layout: ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def layer_norm(dim: int) -> nn.LayerNorm:
    """The LayerNorm used everywhere (eps 1e-6, as in the reference)."""
    return nn.LayerNorm(dim, eps=1e-6)


class Block(nn.Module):
    """Pre-norm transformer block (timm ViT ``Block``): x + attn(LN x), then x + mlp(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Cross block of the reference: the residual starts from the *normalised* query.

    x = LN_q(q) + attn(LN_q(q), LN_kv(text)); x = x + mlp(LN_2(x)).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.normq = layer_norm(dim)
        self.normkv = layer_norm(dim)
        self.attn = CrossAttention(dim, heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def context(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the text ctx (B, Lk, D): they do not depend on the queries, so sampling computes
        them once for all its iterations."""
        return self.attn.context(self.normkv(ctx))

    def forward(self, x: Tensor, ctx: Tensor | tuple[Tensor, Tensor], key_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D) queries the text ``ctx`` (B, Lk, D), or its keys and values from ``context``."""
        q = self.normq(x)
        x = q + self.attn(q, self.normkv(ctx) if isinstance(ctx, Tensor) else ctx, key_mask)
        return x + self.mlp(self.norm2(x))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation."""
    return x * (1 + scale) + shift


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of integer or real timesteps t (N,) -> (N, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> MLP (reference layout ``mlp.0``, ``mlp.2``)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class ResBlock(nn.Module):
    """AdaLN residual MLP block of the diffusion head; modulation zero-initialised (identity at start)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = layer_norm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """AdaLN output layer of the diffusion head; zero-initialised."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        for lin in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
