"""Python API in the diffusers style: ``LightGenPipeline.from_pretrained(dir)(prompt).images``.

The pipeline joins the three parts a saved model needs: the LightGen network (``lightgen_model``), the image
tokenizer that maps pixels to its latents and back, and the frozen text encoder. Every ``lightgen`` command
that makes images (generate, inpaint, geneval) calls this class, so the CLI and the API share one code path.

    pipe = LightGenPipeline.from_pretrained("runs/model", device="cuda", dtype="bfloat16")
    images = pipe("a red cube", num_inference_steps=64, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightgen_model import LightGen, from_pretrained, generate, inpaint, load_config, pad_text, pixel_mask_to_tokens
from lightgen_model.config import SamplingDefaults, check_sampling
from lightgen_model.encoders import resolve_device, resolve_dtype
from lightgen_model.hub import EMA_NAME, weights_file
from lightgen_model.text import check_text

__all__ = [
    "LightGenOutput",
    "LightGenPipeline",
    "check_prompts",
    "check_sampling",
    "from_pil",
    "mask_from_pil",
    "to_pil",
]

BUILTIN_VAES = ("pixel",)
BUILTIN_TEXT_ENCODERS = ("minilm",)


@dataclass
class LightGenOutput:
    """What a pipeline call returns: ``images`` (PIL, RGB) and the normalised ``latents`` (B, C, h, w)."""

    images: list[Image.Image]
    latents: Tensor


def resolve_component(spec: str, model_dir: Path, builtins: Sequence[str], kind: str, option: str, given: bool) -> str:
    """A built-in name or an existing local directory for a component named ``spec``.

    ``given``: the name came from the caller (an override), not from the model's config.json. Relative paths are
    tried from the working directory, then from the model directory (so a model may ship its tokenizer beside
    its weights). Anything else is an error naming the value and the override option.
    """
    if spec in builtins:
        return spec
    if not spec:
        raise ValueError(f"the model's config.json names no {kind}: pass {option} (one of {list(builtins)} or a path)")
    for candidate in (Path(spec), model_dir / spec):
        if candidate.exists():
            return str(candidate)
    if given:
        raise ValueError(f"{kind} {spec!r} is neither one of {list(builtins)} nor an existing local directory")
    raise ValueError(
        f"{kind} {spec!r} (from {model_dir / 'config.json'}) is neither one of {list(builtins)} nor a local "
        f"directory; weights are never downloaded: pass {option} PATH"
    )


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [-1, 1] -> PIL RGB images (values clamped, rounded to 8 bits)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(image: Image.Image | np.ndarray) -> Tensor:
    """A PIL image (any mode) or an (H, W, 3) uint8 array -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB image or an (H, W, 3) uint8 array, got {arr.dtype} of shape {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def mask_from_pil(mask: Image.Image | np.ndarray) -> Tensor:
    """A mask image (white = regenerate; any mode, alpha ignored) or an (H, W) array -> (1, H, W) bool."""
    arr = np.asarray(mask.convert("L")) if isinstance(mask, Image.Image) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"expected a mask image or an (H, W) array, got shape {arr.shape}")
    return torch.from_numpy(arr > (127 if arr.dtype == np.uint8 else 0.5))[None]


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_prompts(prompts: list[Any], what: str = "prompt", start: int = 0) -> list[str]:
    """``prompts`` unchanged if each is a non-empty string UTF-8 can encode; else a ValueError naming the first
    bad one by ``what`` and position (counted from ``start``) and giving its repr."""
    if not prompts:
        raise ValueError(f"no {what} given")
    for i, p in enumerate(prompts, start=start):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{what} {i} is empty or not a string: {p!r}")
        check_text(p, f"{what} {i}")
    return prompts


class LightGenPipeline:
    """Text-to-image and zero-shot inpainting with a saved LightGen model, its image tokenizer and text encoder.

    ``vae`` is an ``ImageTokenizer`` (``lightgen_model.encoders``: "pixel" or a diffusers ``AutoencoderKL``) and
    ``text_encoder`` a ``TextEncoder`` ("minilm" or a transformers encoder); their shapes are checked against
    the model's config. ``weights`` names the weights the model was loaded from ("ema" or "raw"; None when it was
    built in memory), for the records that samples carry.
    """

    def __init__(self, model: LightGen, vae: Any, text_encoder: Any, weights: str | None = None) -> None:
        cfg = model.cfg
        if vae.latent_channels != cfg.latent_channels or vae.stride != cfg.vae_stride:
            raise ValueError(
                f"image tokenizer {vae.name!r} gives {vae.latent_channels} channels at stride {vae.stride}, the "
                f"model expects latent_channels={cfg.latent_channels}, vae_stride={cfg.vae_stride}"
            )
        if text_encoder.dim != cfg.text_dim:
            raise ValueError(
                f"text encoder {text_encoder.name!r} gives {text_encoder.dim}-dim states, the model expects "
                f"text_dim={cfg.text_dim}"
            )
        self.model, self.vae, self.text_encoder, self.weights = model.eval(), vae, text_encoder, weights
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        vae: str | Any | None = None,
        text_encoder: str | Any | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        use_ema: bool = True,
        component_dtype: str = "float32",
        head_steps: int | str | None = None,
    ) -> LightGenPipeline:
        """Load ``config.json`` + weights (EMA when present) from a local directory.

        ``vae`` / ``text_encoder``: a built-in name ("pixel", "minilm"), a local model directory, or an already
        built object; by default the names in the model's config.json. ``device``: "auto" (default: cuda when
        visible), "cpu", "cuda[:N]". ``dtype`` applies to the LightGen network ("float32", "bfloat16", "float16",
        "auto" = bfloat16 on a GPU; default: as stored); the tokenizer and text encoder run in ``component_dtype``.
        ``head_steps`` replaces the config's ``num_sampling_steps`` (a count, "ddimN" or "a,b,...").
        """
        from lightgen_model.encoders import build_image_tokenizer, build_text_encoder

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"model directory does not exist: {d}")
        cfg = load_config(d)
        dev = resolve_device(device or "auto")
        if vae is None or isinstance(vae, str):
            spec = resolve_component(vae or cfg.vae, d, BUILTIN_VAES, "image tokenizer", "--vae / vae=", bool(vae))
            vae = build_image_tokenizer(spec, device=dev, dtype=component_dtype)
        if text_encoder is None or isinstance(text_encoder, str):
            spec = text_encoder or cfg.text_encoder
            opt = "--text-encoder / text_encoder="
            spec = resolve_component(spec, d, BUILTIN_TEXT_ENCODERS, "text encoder", opt, bool(text_encoder))
            text_encoder = build_text_encoder(spec, device=dev, dtype=component_dtype, max_len=cfg.max_text_len)
        net_dtype = None if dtype is None else resolve_dtype(dtype, dev)
        model = from_pretrained(d, use_ema=use_ema, device=dev, dtype=net_dtype, head_steps=head_steps)
        weights = "ema" if weights_file(d, use_ema).name == EMA_NAME else "raw"
        return cls(model, vae, text_encoder, weights=weights)

    # -- sampling settings ---------------------------------------------------------------------------
    def sampling_settings(
        self,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
    ) -> SamplingDefaults:
        """The settings a call uses: the given ones, else the model's recorded defaults (``config.json``'s
        ``sampling``: a converted reference model records the reference's constant cfg 4.0), else the library's."""
        return self.model.cfg.sampling_defaults().replace(
            steps=num_inference_steps, cfg=guidance_scale, cfg_schedule=guidance_schedule, temperature=temperature
        )

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> text states (B, Lt, text_dim) in the model's dtype and a padding mask (B, Lt, True = token).

        Through ``lightgen_model.pad_text``, as the trainer: models with ``text_key_mask`` get rows zero-padded to
        the longest prompt; converted reference models (``text_key_mask=False``) get every prompt padded to
        ``max_text_len`` with the text encoder's own states at the padded positions, as the reference did.
        """
        prompts = _as_list(prompts)
        check_prompts(prompts)
        text, mask = pad_text(captions=prompts, cfg=self.model.cfg, encoder=self.text_encoder)
        return text.to(self.device, self.dtype), mask.to(self.device)

    # -- images --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, H, W) float32 on the CPU, nominally in [-1, 1]."""
        return self.vae.decode(latents.float()).float().cpu()

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised posterior means (B, C, h, w) float32 on the CPU."""
        moments = self.vae(images)
        return moments[:, : self.model.cfg.latent_channels].float()

    def image_size(self, height: int | None, width: int | None, resolution: int | None) -> tuple[int, int]:
        """(height, width) in pixels: the given sizes, else `resolution`, else the model's base resolution."""
        base = self.model.cfg.base_resolution if resolution is None else resolution
        h, w = base if height is None else height, base if width is None else width  # 0 is refused, not a default
        self.model.cfg.grid_for(h, w)  # raises naming the size if it does not tile into tokens
        return h, w

    # -- text to image -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution: int | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> LightGenOutput:
        """Generate ``num_images_per_prompt`` images per prompt, ``batch_size`` images at a time (default: all).

        Images come in prompt order (all images of prompt 0 first). ``generator`` (any device) drives all the
        randomness: the same seed, prompts and batch size give the same images. ``height``/``width`` (or a square
        ``resolution``) default to the model's ``base_resolution``; they must be multiples of
        ``vae_stride * patch_size``. ``callback(step, tokens)`` runs after every sampling step. Sampling settings
        left at None take the model's recorded defaults (see ``sampling_settings``).
        """
        if num_images_per_prompt < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"need num_images_per_prompt >= 1 and batch_size >= 1, got {num_images_per_prompt}, {batch_size}"
            )
        check_prompts(_as_list(prompt))
        prompts = [p for p in _as_list(prompt) for _ in range(num_images_per_prompt)]
        st = self.sampling_settings(num_inference_steps, guidance_scale, guidance_schedule, temperature)
        size = self.image_size(height, width, resolution)
        bs = batch_size or len(prompts)
        latents = []
        for i in range(0, len(prompts), bs):
            text, mask = self.encode_prompt(prompts[i : i + bs])
            latents.append(
                generate(self.model, text, mask, size, **st.keywords(), generator=generator, callback=callback)
            )
        lat = torch.cat(latents)
        return LightGenOutput(to_pil(self.decode(lat)), lat)

    # -- inpainting ----------------------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(
        self,
        image: Image.Image | list[Image.Image],
        mask_image: Image.Image | list[Image.Image],
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> LightGenOutput:
        """Regenerate the white part of ``mask_image`` (same size as ``image``) to match ``prompt``.

        Every token with at least one masked pixel is regenerated; outside the mask the output equals the
        tokenizer's round trip of the input (for the "pixel" tokenizer: the input itself). Lists of images,
        masks and prompts are batched; a single one of any is repeated to the batch size. Sampling settings left
        at None take the model's recorded defaults.
        """
        st = self.sampling_settings(num_inference_steps, guidance_scale, guidance_schedule, temperature)
        images, masks, prompts = _as_list(image), _as_list(mask_image), check_prompts(_as_list(prompt))
        B = max(len(images), len(masks), len(prompts))
        for name, xs in (("image", images), ("mask_image", masks), ("prompt", prompts)):
            if len(xs) not in (1, B):
                raise ValueError(f"got {len(xs)} {name}s for a batch of {B}")
        x = torch.cat([from_pil(im) for im in images]).expand(B, -1, -1, -1)  # (B, 3, H, W)
        pix = torch.cat([mask_from_pil(m) for m in masks]).expand(B, -1, -1)  # (B, H, W)
        H, W = x.shape[-2:]
        if pix.shape[-2:] != (H, W):
            raise ValueError(f"mask size {pix.shape[-1]}x{pix.shape[-2]} (WxH) differs from image size {W}x{H}")
        p = self.model.cfg.pixels_per_token
        if H % p or W % p:
            raise ValueError(f"image size {W}x{H} (WxH) is not a multiple of the model's token size {p} px")
        if not bool(pix.flatten(1).any(1).all()):
            raise ValueError("mask has no white (regenerate) pixel")
        clean = self.encode_image(x)  # (B, C, h, w)
        tok_mask = pixel_mask_to_tokens(pix, p)  # (B, H/p, W/p)
        text, tmask = self.encode_prompt(prompts * B if len(prompts) == 1 else prompts)
        lat = inpaint(
            self.model,
            clean.to(self.device, self.dtype),
            tok_mask.to(self.device),
            text,
            tmask,
            **st.keywords(),
            generator=generator,
        )
        out = torch.where(pix[:, None], self.decode(lat), self.decode(clean))  # paste the round trip outside
        return LightGenOutput(to_pil(out), lat)
