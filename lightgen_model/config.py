"""Model configuration and the named size presets (one table)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .diffusion import space_timesteps

CFG_SCHEDULES = ("linear", "constant", "linear-reference")


@dataclass(frozen=True)
class SamplingDefaults:
    """Generation settings a model is sampled with unless the caller says otherwise.

    ``cfg_schedule``: "linear" grows the guidance from 1 to ``cfg`` as tokens are revealed (Muse); "constant";
    "linear-reference" is linear with the reference code's last step, which uses ``1 + (cfg - 1)(L - 1)/L`` (its
    mask length is clamped to at least 1) instead of ``cfg``.
    """

    steps: int = 64  # masked-generation iterations
    cfg: float = 4.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(self.steps, self.cfg, self.cfg_schedule, self.temperature)

    def replace(self, **given: Any) -> SamplingDefaults:
        """A copy with the given (not None) settings changed."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


def check_sampling(steps: int, cfg: float, cfg_schedule: str, temperature: float) -> None:
    """Raise ValueError naming the first bad sampling setting."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps (num_inference_steps) must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f"cfg (guidance_scale) must be a finite number >= 0, got {cfg}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule (guidance_schedule) must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


@dataclass
class ModelConfig:
    """Everything that defines a LightGen network, and the generation defaults recorded with it; serialised as
    ``config.json`` beside the weights."""

    # image tokens: latents (C, H/stride, W/stride) are cut into patch x patch tokens of C*patch^2 dims
    latent_channels: int = 16
    vae_stride: int = 8
    patch_size: int = 2
    base_resolution: int = 256  # pixel size the positional tables are learned at
    # transformer stacks
    encoder_dim: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_dim: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    cross_dim: int = 1024
    cross_depth: int = 16
    cross_heads: int = 16
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    buffer_size: int = 0  # learned always-visible tokens prepended to the encoder (MAR); 0 = reference shape
    pos_embed_init: str = "normal"  # "normal" (std 0.02, reference) or "sincos" (2-D sin-cos start, still learned)
    # text
    text_dim: int = 4096  # width of the frozen text encoder's last_hidden_state
    text_aligner_depth: int = 6
    max_text_len: int = 128
    text_drop_prob: float = 0.1  # classifier-free guidance dropout in training
    text_key_mask: bool = True  # False reproduces the reference, which attends to padded text
    # masking during training: one ratio per batch from a truncated normal on [mask_ratio_min, 1]
    mask_ratio_min: float = 0.7
    mask_ratio_std: float = 0.25
    # per-token diffusion head
    head_width: int = 1536
    head_depth: int = 8
    diffusion_batch_mul: int = 4
    num_train_timesteps: int = 1000
    # the head's respaced sampling steps: a count or the reference's "ddimN" / "a,b,..." (see space_timesteps)
    num_sampling_steps: int | str = 100
    noise_schedule: str = "cosine"
    prediction: str = "eps"  # "eps" (reference) or "v"
    learn_sigma: bool = True  # learned variance range + hybrid VLB loss, as in the reference
    # positional-table interpolation: 0 uses the exact target size; >0 reproduces DINO's scale-factor kludge
    interpolate_offset: float = 0.0
    grad_checkpointing: bool = False
    # free-form names recorded with the weights (which tokenizer / text encoder the model expects)
    vae: str = ""
    text_encoder: str = ""
    # generation defaults recorded with the weights (keys of SamplingDefaults); missing keys = the library's
    sampling: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def token_dim(self) -> int:
        """Channels of one image token."""
        return self.latent_channels * self.patch_size**2

    @property
    def pixels_per_token(self) -> int:
        """Pixel stride of one token (VAE stride x patch size)."""
        return self.vae_stride * self.patch_size

    @property
    def base_grid(self) -> tuple[int, int]:
        """(h, w) token grid of the learned positional tables."""
        g = self.base_resolution // self.pixels_per_token
        return g, g

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an image of ``height`` x ``width`` pixels; raises on sizes that do not tile."""
        p = self.pixels_per_token
        if height <= 0 or width <= 0 or height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of {p} px (vae_stride*patch)")
        return height // p, width // p

    # -- checks and (de)serialisation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("encoder", "decoder", "cross"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if dim % heads:
                raise ValueError(f"{name}_dim={dim} is not divisible by {name}_heads={heads}")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.pos_embed_init not in ("normal", "sincos"):
            raise ValueError(f"pos_embed_init must be 'normal' or 'sincos', got {self.pos_embed_init!r}")
        if self.noise_schedule not in ("cosine", "linear"):
            raise ValueError(f"noise_schedule must be 'cosine' or 'linear', got {self.noise_schedule!r}")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        if self.base_resolution % self.pixels_per_token:
            raise ValueError(
                f"base_resolution={self.base_resolution} is not a multiple of vae_stride*patch_size"
                f"={self.pixels_per_token}"
            )
        if self.diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")
        try:
            space_timesteps(self.num_train_timesteps, self.num_sampling_steps)
        except ValueError as e:
            raise ValueError(f"num_sampling_steps: {e}") from None
        self.sampling_defaults()  # raises on unknown keys or bad values

    def sampling_defaults(self) -> SamplingDefaults:
        """The generation settings recorded in ``sampling``, the library defaults for the rest."""
        unknown = sorted(set(self.sampling) - {f.name for f in dataclasses.fields(SamplingDefaults)})
        if unknown:
            raise ValueError(f"unknown sampling keys {unknown}; known: steps, cfg, cfg_schedule, temperature")
        return SamplingDefaults(**self.sampling)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dictionary; unknown keys are an error (they usually are typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **overrides: Any) -> ModelConfig:
        """Copy with some fields changed (validated, unknown keys rejected)."""
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


def _stack(dim: int, depth: int, heads: int, aligner: int) -> dict[str, int]:
    return {
        "encoder_dim": dim, "encoder_depth": depth, "encoder_heads": heads,
        "decoder_dim": dim, "decoder_depth": depth, "decoder_heads": heads,
        "cross_dim": dim, "cross_depth": depth, "cross_heads": heads,
        "text_aligner_depth": aligner,
    }  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    # < 2 M parameters: unit tests and smoke runs (pixel tokens of a 32-px image, 384-dim MiniLM text)
    "debug": {
        "latent_channels": 3, "vae_stride": 1, "patch_size": 4, "base_resolution": 32,
        **_stack(64, 1, 4, 1), "text_dim": 384, "max_text_len": 32,
        "head_width": 64, "head_depth": 2, "diffusion_batch_mul": 2,
        "num_sampling_steps": 20, "prediction": "v", "buffer_size": 1,
        "vae": "pixel", "text_encoder": "minilm",
    },
    # ShapesWorld on a CPU: 32-px canvas, 64 pixel tokens of 48 dims; chosen by measurement (BENCHMARKS.md):
    # CPU training is FLOP-bound (~2.4 GFLOP/img at width 256 gave ~25 img/s), so width 128 x 2+2+2 blocks;
    # sin-cos-initialised positional tables learned ~4x better held-out scores at 150 k images
    "shapes": {
        "latent_channels": 3, "vae_stride": 1, "patch_size": 4, "base_resolution": 32,
        **_stack(128, 2, 4, 1), "text_dim": 384, "max_text_len": 32,
        "head_width": 128, "head_depth": 3, "diffusion_batch_mul": 1,
        "num_sampling_steps": 50, "prediction": "v", "buffer_size": 4,
        "mask_ratio_min": 0.5, "pos_embed_init": "sincos",
        "vae": "pixel", "text_encoder": "minilm",
    },
    # the released LightGen shape (reference fluid_large, SD3.5 VAE tokens, flan-T5-XXL text): ~0.79 B
    "lightgen": {
        **_stack(1024, 16, 16, 6), "text_dim": 4096, "max_text_len": 128,
        "head_width": 1536, "head_depth": 8, "diffusion_batch_mul": 4,
        "attn_dropout": 0.1, "proj_dropout": 0.1, "buffer_size": 16,
        "vae": "stabilityai/stable-diffusion-3.5-large/vae", "text_encoder": "google/flan-t5-xxl",
    },
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
