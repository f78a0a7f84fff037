"""The LightGen network: masked autoregressive (MAR) encoder-decoder with a text cross stack and a
per-token diffusion head.

    tokens ─z_proj─▶ encoder (visible tokens only) ─▶ decoder (mask tokens fill the rest)
           ─last_embed─▶ cross stack (image queries, aligned-text keys/values) ─▶ z ─▶ diffusion head

Encoder and decoder never see text, so under classifier-free guidance they run once for both branches.
Parameter names follow the public reference so its checkpoints map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .diffusion import DiffusionHead
from .layers import Block, CrossBlock, layer_norm
from .rng import rand

# per cross block, the keys and values (B, h, Lt, d) of the aligned text
CrossContext = list[tuple[Tensor, Tensor]]


class TextProjection(nn.Module):
    """Linear -> tanh-GELU -> Linear from the text encoder's width to the model's."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Lt, in_dim) -> (B, Lt, dim)."""
        return self.linear_2(self.act_1(self.linear_1(x)))


class TextAligner(nn.Module):
    """Projection + self-attention blocks + LayerNorm over the frozen encoder's text states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.cross.dim
        self.text_proj = TextProjection(cfg.text_dim, d)
        self.text_aligner = nn.ModuleList(
            Block(d, cfg.cross.heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.text_aligner_depth)
        )
        self.text_aligner_norm = layer_norm(d)

    def forward(self, text: Tensor, key_mask: Tensor | None, ckpt: bool = False) -> Tensor:
        """Text states (B, Lt, text_dim), key mask (B, Lt) or None -> aligned context (B, Lt, D)."""
        x = self.text_proj(text)  # (B, Lt, D)
        for blk in self.text_aligner:
            x = checkpoint(blk, x, key_mask, use_reentrant=False) if ckpt else blk(x, key_mask)
        return self.text_aligner_norm(x)


class LightGen(nn.Module):
    """MAR text-to-image network; ``forward`` returns the training loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L0 = cfg.base_grid[0] * cfg.base_grid[1]
        de, dd, dc = cfg.encoder.dim, cfg.decoder.dim, cfg.cross.dim
        blocks = lambda kind, s: nn.ModuleList(
            kind(s.dim, s.heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout) for _ in range(s.depth)
        )
        # encoder
        self.z_proj = nn.Linear(cfg.token_dim, de)
        self.z_proj_ln = layer_norm(de)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L0, de))
        if cfg.buffer_size:
            self.buffer_tokens = nn.Parameter(torch.zeros(1, cfg.buffer_size, de))
        self.encoder_blocks = blocks(Block, cfg.encoder)
        self.encoder_norm = layer_norm(de)
        # decoder
        self.decoder_embed = nn.Linear(de, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L0, dd))
        self.decoder_blocks = blocks(Block, cfg.decoder)
        self.decoder_norm = layer_norm(dd)
        # text and cross stack
        self.text_emb = TextAligner(cfg)
        self.fake_latent = nn.Parameter(torch.zeros(1, 1, dc))  # the learned null text for CFG
        self.last_embed = nn.Linear(dd, dc)
        self.last_pos_embed_learned = nn.Parameter(torch.zeros(1, L0, dc))
        self.cross_attn_blocks = blocks(CrossBlock, cfg.cross)
        self.cross_norm = layer_norm(dc)
        self._init_weights()
        self.diffloss = DiffusionHead(
            cfg.token_dim,
            dc,
            cfg.head_width,
            cfg.head_depth,
            cfg.num_train_timesteps,
            cfg.num_sampling_steps,
            cfg.noise_schedule,
            cfg.prediction,
            cfg.learn_sigma,
        )
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def _init_weights(self) -> None:
        tables = (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.last_pos_embed_learned)
        for p in (self.fake_latent, self.mask_token, *tables):
            nn.init.normal_(p, std=0.02)
        if self.cfg.pos_embed_init == "sincos":  # still learned, but starting from a 2-D sin-cos table
            with torch.no_grad():
                for p in tables:
                    p.copy_(sincos_table(p.shape[-1], self.cfg.base_grid)[None])
        if self.cfg.buffer_size:
            nn.init.normal_(self.buffer_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory, costs ~1/3 more compute)."""
        self.grad_checkpointing = enabled
        self.diffloss.net.grad_checkpointing = enabled

    # -- tokens and positions -----------------------------------------------------------------------
    def patchify(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) latents -> (B, h*w, C*p*p) tokens, row-major over the (h, w) grid."""
        B, C, H, W = latents.shape
        p = self.cfg.patch_size
        if C != self.cfg.latent_channels or H % p or W % p:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not fit latent_channels={self.cfg.latent_channels}, "
                f"patch_size={p}"
            )
        x = latents.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, h*w, C*p*p) tokens -> (B, C, h*p, w*p) latents."""
        (h, w), p, C = grid, self.cfg.patch_size, self.cfg.latent_channels
        x = tokens.reshape(tokens.shape[0], h, w, C, p, p)
        return torch.einsum("bhwcpq->bchpwq", x).reshape(tokens.shape[0], C, h * p, w * p)

    def latent_grid(self, latents: Tensor) -> tuple[int, int]:
        """Token grid (h, w) of a latent tensor."""
        return latents.shape[-2] // self.cfg.patch_size, latents.shape[-1] // self.cfg.patch_size

    def pos_embed(self, table: Tensor, grid: tuple[int, int]) -> Tensor:
        """A learned (1, h0*w0, D) table at the token grid (h, w): bicubic, correct for non-square grids."""
        (h0, w0), (h, w) = self.cfg.base_grid, grid
        if (h, w) == (h0, w0):
            return table
        D = table.shape[-1]
        t = table.float().reshape(1, h0, w0, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
        off = self.cfg.interpolate_offset
        if off:  # the reference's DINO-style scale factors, with height and width in the right order
            t = F.interpolate(t, scale_factor=((h + off) / h0, (w + off) / w0), mode="bicubic")
        else:
            t = F.interpolate(t, size=(h, w), mode="bicubic")
        return t.permute(0, 2, 3, 1).reshape(1, h * w, D).to(table.dtype)

    # -- the three stacks ---------------------------------------------------------------------------
    def _run(self, blk: nn.Module, *args: Tensor | tuple[Tensor, Tensor] | None) -> Tensor:
        if self.grad_checkpointing and self.training:
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Frozen-encoder states (B, Lt, text_dim) + mask (B, Lt, True = real token) -> aligned context."""
        key_mask = text_mask.bool() if (text_mask is not None and self.cfg.text_key_mask) else None
        ckpt = self.grad_checkpointing and self.training
        return self.text_emb(text, key_mask, ckpt), key_mask

    def null_context(self, like: Tensor) -> Tensor:
        """The learned null text, shaped like an aligned context ``like`` (B, Lt, D)."""
        return self.fake_latent.to(like.dtype).expand_as(like)

    def encode_decode(self, tokens: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """Image-only part. tokens (B, L, C), mask (B, L) True = unknown. Returns decoder states (B, L, Dd).

        The encoder sees only visible tokens (plus buffer tokens); per-sample visible counts may differ
        (inpainting), in which case the shorter rows are padded and masked out as keys.
        """
        B, L, _ = tokens.shape
        nb = self.cfg.buffer_size
        visible = ~mask.bool()
        n_vis = visible.sum(1)  # (B,)
        n_max = int(n_vis.max())
        x = self.z_proj_ln(self.z_proj(tokens) + self.pos_embed(self.encoder_pos_embed_learned, grid))
        mask_tok = self.mask_token.to(x.dtype)
        if n_max == 0 and nb == 0:  # first sampling step: nothing to encode, the decoder sees only mask tokens
            dec_in = mask_tok.expand(B, L, -1)
            buf = None
        else:
            idx, valid = select_rows(visible)  # visible tokens first, in raster order
            xv = gather_rows(x, idx)  # (B, n_max, De)
            key_mask = None
            if bool((n_vis != n_max).any()):
                key_mask = valid
                key_mask[:, 0] |= n_vis == 0  # a row with no key at all would give NaN; its output is unused
            if nb:
                xv = torch.cat([self.buffer_tokens.to(xv.dtype).expand(B, -1, -1), xv], dim=1)
                if key_mask is not None:
                    key_mask = torch.cat([key_mask.new_ones(B, nb), key_mask], dim=1)
            for blk in self.encoder_blocks:
                xv = self._run(blk, xv, key_mask)
            xv = self.decoder_embed(self.encoder_norm(xv))  # (B, nb + n_max, Dd)
            buf, xv = xv[:, :nb], xv[:, nb:]
            if n_max == 0:
                dec_in = mask_tok.expand(B, L, -1)
            else:
                rank = (visible.long().cumsum(1) - 1).clamp(min=0)  # index of each visible token in xv
                back = gather_rows(xv, rank)  # (B, L, Dd)
                dec_in = torch.where(visible[..., None], back, mask_tok)
        x = dec_in + self.pos_embed(self.decoder_pos_embed_learned, grid)
        if nb:
            x = torch.cat([buf, x], dim=1)
        for blk in self.decoder_blocks:
            x = self._run(blk, x)
        return self.decoder_norm(x)[:, nb:]

    def cross(self, x: Tensor, ctx: Tensor | CrossContext, ctx_mask: Tensor | None, pos: Tensor) -> Tensor:
        """Cross stack: decoder states (B, m, Dd) at positions whose embeddings are ``pos`` (B or 1, m, Dc)
        attend to aligned text (B, Lt, Dc), or to its keys and values from ``cross_context`` -> z (B, m, Dc).

        Image tokens never attend to each other here, so any subset of positions gives the same z as the
        full grid: training runs it on the masked tokens only, sampling on the tokens it predicts.
        """
        x = self.last_embed(x) + pos
        for i, blk in enumerate(self.cross_attn_blocks):
            x = self._run(blk, x, ctx if isinstance(ctx, Tensor) else ctx[i], ctx_mask)
        return self.cross_norm(x)

    def cross_context(self, ctx: Tensor) -> CrossContext:
        """Each cross block's keys and values (B, h, Lt, d) of the aligned text ctx (B, Lt, Dc): sampling computes
        them once and every iteration's ``cross`` reuses them."""
        return [blk.context(ctx) for blk in self.cross_attn_blocks]

    def cross_pos(self, grid: tuple[int, int], index: Tensor | None = None) -> Tensor:
        """Cross-stack positional embeddings at the grid, (1, L, Dc), or gathered at ``index`` (B, m)."""
        pos = self.pos_embed(self.last_pos_embed_learned, grid)
        return pos if index is None else pos[0][index]

    # -- training -----------------------------------------------------------------------------------
    def sample_mask_ratio(self, generator: torch.Generator | None = None) -> float:
        """One masking ratio from a normal(1, std) truncated to [mask_ratio_min, 1] (inverse CDF)."""
        lo, std = self.cfg.mask_ratio_min, self.cfg.mask_ratio_std
        a = torch.special.ndtr(torch.tensor((lo - 1.0) / std, dtype=torch.float64))
        u = rand((1,), generator, "cpu").double()[0]
        r = 1.0 + std * torch.special.ndtri(a + u * (0.5 - a))
        return float(r.clamp(lo, 1.0))

    def random_mask(self, B: int, L: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """(B, L) bool, True = masked; one ratio for the batch, a random order per sample."""
        n_mask = max(1, math.ceil(L * self.sample_mask_ratio(generator)))
        order = torch.argsort(rand((B, L), generator, device), dim=1)
        return torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, order[:, :n_mask], True)

    def forward(
        self,
        latents: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        draws: tuple[Tensor, Tensor, Tensor] | None = None,
        reduction: str = "mean",
        vlb: bool = True,
    ) -> Tensor:
        """Diffusion loss on the masked tokens: the mean (``reduction="mean"``) or one per sample, (B,) ("none").

        latents (B, C, H, W) normalised; text (B, Lt, text_dim). Everything random is drawn from ``generator``: the
        token mask, caption dropout (in training mode), timesteps and noise. ``draws`` = (mask (B, L) with the same
        count m per row, t (mul, B, m), noise (mul, B, m, C)) gives them instead, without caption dropout:
        Diffusion-DPO scores winner and loser, policy and reference, under the same draws, through ``forward`` so
        that DDP / FSDP wrappers see the call. ``vlb=False`` keeps the MSE term only (no learned-variance bound).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        tokens = self.patchify(latents)  # (B, L, C)
        B, L, _ = tokens.shape
        if draws is None:
            mask, t, noise = self.random_mask(B, L, tokens.device, generator), None, None
        else:
            mask, t, noise = draws
        text_drop = self.training and draws is None
        z, target = self.masked_states(tokens, mask, self.latent_grid(latents), text, text_mask, text_drop, generator)
        mul = self.cfg.diffusion_batch_mul if t is None else t.shape[0]
        per_draw = self.diffloss.loss(
            target.flatten(0, 1),
            z.flatten(0, 1),
            mul,
            generator,
            reduction="none",
            vlb=vlb,
            t=None if t is None else t.reshape(-1),
            noise=None if noise is None else noise.reshape(-1, noise.shape[-1]),
        )  # (mul * B * m,), repeat-major
        if reduction == "mean":
            return per_draw.mean()
        return per_draw.view(mul, B, -1).mean(dim=(0, 2))

    def masked_states(
        self,
        tokens: Tensor,
        mask: Tensor,
        grid: tuple[int, int],
        text: Tensor,
        text_mask: Tensor | None,
        text_drop: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The diffusion head's inputs at the masked positions: conditions z (B, m, Dc) and clean tokens (B, m, C).

        tokens (B, L, C); mask (B, L) True = masked, the same count m per row. ``text_drop``: each caption becomes
        the null text with probability ``text_drop_prob`` (caption dropout, which teaches the unconditional branch).
        """
        ctx, ctx_mask = self.encode_text(text, text_mask)
        if text_drop and self.cfg.text_drop_prob > 0:
            drop = rand((tokens.shape[0],), generator, ctx.device) < self.cfg.text_drop_prob
            ctx = torch.where(drop[:, None, None], self.null_context(ctx), ctx)
        x = self.encode_decode(tokens, mask, grid)  # (B, L, Dd)
        idx, _ = select_rows(mask)  # (B, m)
        z = self.cross(gather_rows(x, idx), ctx, ctx_mask, self.cross_pos(grid, idx))  # (B, m, Dc)
        return z, gather_rows(tokens, idx)

    def sample_losses(
        self,
        latents: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        mask: Tensor,
        t: Tensor,
        noise: Tensor,
        vlb: bool = False,
    ) -> Tensor:
        """Per-sample losses (B,) under the given draws, MSE term only by default (Diffusion-DPO):
        ``self(latents, text, text_mask, draws=(mask, t, noise), reduction="none", vlb=vlb)``."""
        return self(latents, text, text_mask, draws=(mask, t, noise), reduction="none", vlb=vlb)


def sincos_table(dim: int, grid: tuple[int, int]) -> Tensor:
    """(h*w, dim) 2-D sine-cosine positions in raster order: the first half of the channels encodes the row,
    the second half the column; each half is [sin(p*f_k), cos(p*f_k)] over frequencies f_k = 10000^(-k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    h, w = grid
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w).reshape(-1, 1) * freqs
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w).reshape(-1, 1) * freqs
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def select_rows(sel: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of ``sel`` (B, L), packed left in raster order: (B, m_max) indices
    and a (B, m_max) validity mask (rows with fewer entries are padded with other positions)."""
    counts = sel.sum(1)
    m_max = int(counts.max()) if sel.numel() else 0
    idx = torch.argsort((~sel).int(), dim=1, stable=True)[:, :m_max]
    valid = torch.arange(m_max, device=sel.device)[None] < counts[:, None]
    return idx, valid


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, D) at positions idx (B, m) -> (B, m, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
