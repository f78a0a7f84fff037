"""The real models at full size on the meta device, from the published configs in ``conf/models/`` (no weights).

A spec is a folder name under ``conf/models/`` (``FLUX.1-dev``, ``stable-diffusion-3.5-large``, ``flan-t5-xxl``,
``Qwen2.5-VL-7B-Instruct``, ``lightgen``) or a local model directory laid out as the real one (its config files
are all that is read). The builders call the classes the real loaders call (`pipeline.models.teachers` loads Flux with
diffusers' ``FluxPipeline``, `pipeline.models.judges` Qwen with ``Qwen2_5_VLForConditionalGeneration``,
`lightgen_model.encoders` the VAE and text encoders) with the same config keys, under ``torch.device("meta")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "conf" / "models"
META = torch.device("meta")


def model_dir(spec: str) -> Path:
    """The conf/models folder of a bare name, else a local directory; ValueError listing conf/models otherwise."""
    if "/" not in spec and (MODELS_DIR / spec).is_dir():  # a bare name: conf/models first ("lightgen" is a package)
        return MODELS_DIR / spec
    path = Path(spec)
    if path.is_dir():
        return path
    known = sorted(p.name for p in MODELS_DIR.iterdir() if p.is_dir())
    raise ValueError(f"model {spec!r} is neither a local directory nor one of conf/models: {known}")


def flux_pipeline(spec: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A diffusers ``FluxPipeline`` whose components are built from the directory's configs on the meta device;
    no tokenizers (the dry run passes prompt embeddings its meta text encoders made)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = model_dir(spec)
    sub = lambda name: root / name
    with META:
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(sub("transformer")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sub("vae")))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(sub("text_encoder")))
        t5 = T5EncoderModel(T5Config.from_pretrained(sub("text_encoder_2")))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(sub("scheduler"))
    )
    parts = {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}
    for module in parts.values():
        module.to(dtype).eval().requires_grad_(False)
    pipe = FluxPipeline(scheduler=scheduler, tokenizer=None, tokenizer_2=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_vl(spec: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """``Qwen2_5_VLForConditionalGeneration`` from the directory's config.json on the meta device (SDPA attention)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir(spec))
    config._attn_implementation = "sdpa"
    with META:
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(dtype).eval().requires_grad_(False)


def lightgen_config(spec: str) -> Any:
    """The ``ModelConfig`` of a LightGen model directory's config.json (or of conf/models/lightgen)."""
    from lightgen_model import ModelConfig

    return ModelConfig.from_dict(json.loads((model_dir(spec) / "config.json").read_text()))


def lightgen_model(cfg: Any, dtype: torch.dtype = torch.float32) -> Any:
    """``LightGen(cfg)`` on the meta device."""
    from lightgen_model import LightGen

    with META:
        model = LightGen(cfg)
    return model.to(dtype)
