"""`--dry-run` of the stages that run a model: their models at full size on the meta device, one batch.

No weights are read and nothing is written. Each stage builds its models with the loaders it uses for real runs
(`pipeline.stages.encode_latents.Encoders`, diffusers' ``FluxPipeline``, ``Qwen2_5_VLForConditionalGeneration``,
`lightgen_model`'s sampler) from config files only: a local model directory or a folder of ``conf/models``. Per
model call the report gives FLOPs (counted), parameter bytes, the activation peak (estimated: see lightgen/meta.py)
and output shapes. A wrong pairing (a text encoder whose width the model does not expect, a VAE with other
channels or stride) is a ``ValueError`` of one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lightgen.fullsize import flux_pipeline, lightgen_config, lightgen_model, model_dir, qwen_vl
from lightgen.meta import measure, param_bytes

BF16 = torch.bfloat16


def resolve_spec(spec: str) -> str:
    """A model spec as a directory: itself, a conf/models folder, or (for names recorded in a LightGen config such
    as ``stabilityai/stable-diffusion-3.5-large/vae``) the conf/models folder of one of its path parts."""
    if spec in ("pixel", "minilm"):
        return spec
    try:
        return str(model_dir(spec))
    except ValueError:
        for part in reversed([p for p in spec.split("/") if p and p != "vae"]):
            try:
                return str(model_dir(part))
            except ValueError:
                continue
        raise


def item_figures(measured: Any, module: torch.nn.Module | None, batch: int, **extra: Any) -> dict[str, Any]:
    out = measured.as_dict(batch)
    out["param_bytes"] = param_bytes(module) if module is not None else 0
    return out | extra


def _stage_dtype(dtype: str) -> torch.dtype:
    """The compute dtype a GPU worker would use: auto -> bfloat16."""
    from lightgen_model.encoders import torch_dtype

    return BF16 if dtype == "auto" else torch_dtype(dtype)


def stage_report(stage: str, batch: int, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = sum(v["flops"] for v in items.values())
    return {"dry_run": stage, "batch_size": batch, "flops_per_item": total / batch, "items": items}


# ------------------------------------------------------------------------------------------------- synthesize


def check_flux_pairing(pipe: Any) -> None:
    """The Flux transformer's expected text widths and latent channels against its encoders and VAE."""
    tc = pipe.transformer.config
    t5, clip, vae = pipe.text_encoder_2.config.d_model, pipe.text_encoder.config.hidden_size, pipe.vae.config
    if t5 != tc.joint_attention_dim:
        raise ValueError(f"text_encoder_2 width {t5} != the transformer's joint_attention_dim {tc.joint_attention_dim}")
    if clip != tc.pooled_projection_dim:
        raise ValueError(
            f"text_encoder width {clip} != the transformer's pooled_projection_dim {tc.pooled_projection_dim}"
        )
    if 4 * vae.latent_channels != tc.in_channels:
        raise ValueError(
            f"VAE latent_channels {vae.latent_channels} x 4 != the transformer's in_channels {tc.in_channels}"
        )


def flux_images(pipe: Any, batch: int, resolution: int, steps: int, guidance: float, text_len: int) -> dict:
    """Text encoders, ``FluxPipeline.__call__`` (latents out) and the VAE decode of one batch, on meta tensors.

    The denoising loop is run with 1 and 2 steps and extrapolated to ``steps`` (every step has the same shapes, so
    the step's FLOPs are exact); the activation peak is the larger of the two runs."""
    ids = lambda n: torch.zeros(batch, n, dtype=torch.long, device="meta")
    t5, t5_out = measure(lambda: pipe.text_encoder_2(input_ids=ids(text_len)).last_hidden_state)
    clip, pooled = measure(lambda: pipe.text_encoder(input_ids=ids(77)).pooler_output)
    call = lambda n: (
        pipe(
            prompt_embeds=t5_out,
            pooled_prompt_embeds=pooled,
            height=resolution,
            width=resolution,
            num_inference_steps=n,
            guidance_scale=guidance,
            output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in range(batch)],
        ).images
    )
    one, latents = measure(lambda: call(1))
    two, _ = measure(lambda: call(2))
    one.flops += (steps - 1) * (two.flops - one.flops)
    one.peak_bytes = max(one.peak_bytes, two.peak_bytes)
    vae = pipe.vae

    def decode() -> torch.Tensor:  # FluxPipeline's own output path, before its numpy conversion
        z = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z, return_dict=False)[0]

    dec, _ = measure(decode)
    return {
        "text_encoder_2 (T5)": item_figures(t5, pipe.text_encoder_2, batch),
        "text_encoder (CLIP)": item_figures(clip, pipe.text_encoder, batch),
        "transformer": item_figures(one, pipe.transformer, batch, steps=steps),
        "vae.decode": item_figures(dec, None, batch),
    }


def dry_synthesize(cfg: Any) -> dict[str, Any]:
    """synthesize: the teacher at ``--resolution`` and ``--steps`` for one batch of ``--batch-size`` captions."""
    if cfg.teacher == "shapes":
        return stage_report("synthesize", cfg.batch_size, {})  # the procedural teacher runs no model
    if not cfg.model:
        raise ValueError("--dry-run of a flux/diffusers teacher needs --model (a directory or a conf/models name)")
    index = json.loads((Path(resolve_spec(cfg.model)) / "model_index.json").read_text())
    if index.get("_class_name") != "FluxPipeline":
        raise ValueError(f"--dry-run builds Flux pipelines only; {cfg.model} is a {index.get('_class_name')}")
    with torch.no_grad():
        pipe = flux_pipeline(resolve_spec(cfg.model), _stage_dtype(cfg.dtype))
        check_flux_pairing(pipe)
        items = flux_images(pipe, cfg.batch_size, cfg.resolution, cfg.steps, cfg.guidance, cfg.max_sequence_length)
    return stage_report("synthesize", cfg.batch_size, items)


# ---------------------------------------------------------------------------------------------- encode-latents


def encoders(vae: str, text_encoder: str, dtype: str, max_text_len: int, resolution: int) -> Any:
    """The stage's own `Encoders` on the meta device."""
    from pipeline.stages.encode_latents import Encoders

    return Encoders(resolve_spec(vae), resolve_spec(text_encoder), "meta", dtype, max_text_len, resolution)


def encode_items(enc: Any, batch: int, resolution: int) -> dict[str, dict[str, Any]]:
    """Moments of a batch of images and their flips, and the text states of a batch of full-length captions."""
    from lightgen_model.encoders import PixelTokenizer, encode_with_flip

    images = lambda: torch.empty(batch, 3, resolution, resolution, device="meta", dtype=torch.float32)
    tok, text = enc.tokenizer, enc.text
    items: dict[str, dict[str, Any]] = {}
    if not isinstance(tok, PixelTokenizer):
        m, _ = measure(lambda: dict(zip(("moments", "moments_flip"), encode_with_flip(tok, images()), strict=True)))
        items["vae.encode (image + flip)"] = item_figures(m, tok.vae, batch)
    with torch.no_grad():
        m, _ = measure(lambda: text.states(["caption"] * batch)[0])
    items["text encoder"] = item_figures(m, text.model, batch, tokens=text.max_len)
    return items


def dry_encode(cfg: Any) -> dict[str, Any]:
    """encode-latents: one batch of ``--batch-size`` images (and flips) and captions."""
    enc = encoders(cfg.vae, cfg.text_encoder, cfg.dtype, cfg.max_text_len, cfg.resolution)
    return stage_report("encode-latents", cfg.batch_size, encode_items(enc, cfg.batch_size, cfg.resolution))


# --------------------------------------------------------------------------------------------- build-dpo-pairs


def check_lightgen_pairing(mcfg: Any, enc: Any) -> None:
    """The LightGen model's expected text width, latent channels and stride against the encoders."""
    tok, text = enc.tokenizer, enc.text
    if text.dim != mcfg.text_dim:
        raise ValueError(
            f"text encoder {text.name} gives {text.dim}-dim states; the model expects text_dim {mcfg.text_dim}"
        )
    if (tok.latent_channels, tok.stride) != (mcfg.latent_channels, mcfg.vae_stride):
        raise ValueError(
            f"image tokenizer {tok.name} has {tok.latent_channels} channels, stride {tok.stride}; the model expects "
            f"latent_channels {mcfg.latent_channels}, vae_stride {mcfg.vae_stride}"
        )


def sample_items(model: Any, batch: int, resolution: int, steps: int, cfg: float, text_len: int) -> dict:
    """`lightgen_model.sampling.generate` for one batch, CFG on. The head's ancestral loop runs one step here; its
    other steps are each one pass of the head network over every token of the batch, conditional and
    unconditional (each token is drawn once over the iterations), counted on one such pass."""
    from lightgen_model.sampling import generate

    head, mcfg = model.diffloss, model.cfg
    keep = head.sample_schedule
    dtype = next(model.parameters()).dtype
    text = torch.empty(batch, text_len, mcfg.text_dim, device="meta", dtype=dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    run = lambda: generate(
        model, text, mask.to("meta"), resolution, num_iter=steps, cfg=cfg, generator=torch.Generator().manual_seed(0)
    )
    try:
        with torch.device("meta"):
            head.sample_schedule = type(keep).respaced(_betas(mcfg), 1)
        m, latents = measure(run)
    finally:
        head.sample_schedule = keep
    rows = (2 if cfg != 1.0 else 1) * batch * mcfg.grid_for(resolution, resolution)[0] ** 2
    x = lambda: torch.empty(rows, mcfg.token_dim, device="meta", dtype=dtype)
    y = lambda: torch.empty(rows, mcfg.head_width, device="meta", dtype=dtype)
    with torch.no_grad():
        step, _ = measure(lambda: head.net(x(), y()))
    m.flops += (keep.num_steps - 1) * step.flops  # the peak stays the loop's own (one iteration's rows at a time)
    return {"lightgen.generate": item_figures(m, model, batch, iterations=steps, head_steps=keep.num_steps)}, latents


def _betas(mcfg: Any) -> Any:
    """The training betas of a model config (what `DiffusionHead` respaces)."""
    from lightgen_model.diffusion import cosine_betas, linear_betas

    return (cosine_betas if mcfg.noise_schedule == "cosine" else linear_betas)(mcfg.num_train_timesteps)


def judge_items(spec: str, batch: int, max_pixels: int, prompt_tokens: int = 120) -> dict[str, Any]:
    """Qwen2.5-VL's prefill of one batch: images resized (as Qwen's processor does) to at most ``max_pixels``, 28-px
    patches merged 2x2 into tokens, plus ``prompt_tokens`` of chat template and prompt (an estimate: the prompt of
    pipeline/models/judges.py with a caption). The answer's few decoding steps are not run (under 1 % of the prefill)."""
    model = qwen_vl(resolve_spec(spec))
    vc = model.config.vision_config
    side = int((max_pixels**0.5) // 28) * 28  # smart_resize of a square image within max_pixels
    g = side // vc.patch_size  # patches per side
    n_img = (g // vc.spatial_merge_size) ** 2  # tokens per image after the 2x2 merge
    cid = model.config.image_token_id
    ids = torch.cat([torch.full((batch, n_img), cid), torch.zeros(batch, prompt_tokens, dtype=torch.long)], 1)
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    grid = torch.tensor([[1, g, g]] * batch)
    pixels = lambda: torch.empty(batch * g * g, patch_dim, device="meta", dtype=BF16)
    fwd = lambda: (
        model(
            input_ids=ids.to("meta"),
            attention_mask=torch.ones_like(ids).to("meta"),
            pixel_values=pixels(),
            image_grid_thw=grid.to("meta"),
            use_cache=False,
        ).logits
    )
    with torch.no_grad():
        m, _ = measure(fwd)
    return {"judge (Qwen2.5-VL prefill)": item_figures(m, model, batch, tokens=n_img + prompt_tokens, image_side=side)}


def dry_pairs(cfg: Any) -> dict[str, Any]:
    """build-dpo-pairs: the judge on a batch, the model drawing a batch of losers, and both sides encoded."""
    mcfg = lightgen_config(resolve_spec(cfg.model))
    res = cfg.resolution or mcfg.base_resolution
    text_len = cfg.max_text_len or mcfg.max_text_len
    enc = encoders(cfg.vae or mcfg.vae, cfg.text_encoder or mcfg.text_encoder, cfg.dtype, text_len, res)
    check_lightgen_pairing(mcfg, enc)
    items: dict[str, dict[str, Any]] = {}
    if cfg.judge_backend != "shapes":
        items |= judge_items(cfg.judge_model or "Qwen2.5-VL-7B-Instruct", cfg.batch_size, cfg.judge_max_pixels)
    s = mcfg.sampling_defaults().replace(steps=cfg.steps, cfg=cfg.cfg)
    model = lightgen_model(mcfg, _stage_dtype(cfg.dtype)).eval()
    sampled, latents = sample_items(model, cfg.batch_size, res, s.steps, s.cfg, text_len)
    items |= sampled
    dec, _ = measure(lambda: enc.tokenizer.decode(latents))
    items["vae.decode (losers)"] = item_figures(dec, None, cfg.batch_size)
    for name, v in encode_items(enc, 2 * cfg.batch_size, res).items():  # winners and losers
        items[name + " (winner + loser)"] = v
    return stage_report("build-dpo-pairs", cfg.batch_size, items)
