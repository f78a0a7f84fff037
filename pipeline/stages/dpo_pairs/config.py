"""`build-dpo-pairs` settings: `PairsConfig` (the command's options), their up-front checks, and what the LightGen
checkpoint implies (`resolve`: encoders, resolution, sampling) — all without loading weights.

The judge stage (`pipeline.stages.dpo_pairs.judging`) and the pairs stage (`pipeline.stages.dpo_pairs.pairs`) share this config; each
checks and digests the settings that determine its own rows (`check_judge_options` / `judge_content`,
`resolve` / `PairsStage.content`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import shards, storage
from pipeline.core.options import DeviceOption, ImageLimits, StageConfig, opt
from pipeline.core.schema import JUDGEMENT_SCHEMA_VERSION
from pipeline.models.judges import BACKENDS, PROMPT_VERSION, judge_name

MODEL_DEFAULT = "the --model's recorded sampling settings (config.json), else 64, 4.0, linear, 1.0"

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PairsConfig(DeviceOption, ImageLimits, StageConfig):
    """Everything `build-dpo-pairs` needs (both stages); written, resolved, into the manifests."""

    shared_defaults = {
        "inputs": ([], "Images with captions: webdataset .tar, image folders, Parquet files, globs (repeat)."),
        "output": ("", "Output folder: pair shards, judgements/, rejects, report, manifest."),
        "batch_size": (8, "Images per judge / encoder / generation call."),
        "seed": (0, "Run seed; each loser's seed is a hash of it and the row id."),
    }

    model: str = opt(
        "", "LightGen checkpoint directory (save_pretrained; a path or a URI) that draws the losers.", required=True
    )
    judge_backend: str = opt("transformers", "transformers, vllm (Qwen2.5-VL), shapes (ShapesWorld).")
    judge_model: str | None = opt(None, "Qwen2.5-VL directory, a path or a URI (transformers, vllm).", show="none")
    min_judge_score: float = opt(
        0.8, "Keep images the judge scores at least this, in [0, 1] ('Score: N' = N/10, yes = 1, no = 0)."
    )
    judge_losers: bool = opt(
        False,
        "Judge each loser too; keep a pair only when the judge scores its loser below its winner (the rest are "
        "rejects, reason loser_not_worse).",
    )
    judge_max_new_tokens: int = opt(16, "Tokens the judge may answer with.")
    judge_max_pixels: int = opt(1024 * 1024, "Images are resized to at most this many pixels for Qwen.")
    judge_dtype: str = opt("auto", "Judge dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    vllm_gpu_memory_utilization: float = opt(0.85, "vLLM's share of a GPU's memory (vllm backend).")
    vllm_max_model_len: int = opt(4096, "vLLM context length (vllm backend).")
    min_aesthetic: float | None = opt(
        None, "Reject rows whose aesthetic score is lower (or missing).", show="no aesthetic filter"
    )
    aesthetic_field: str | None = opt(
        None, "Field / column of the aesthetic score.", show="aesthetic, aesthetic_score, AESTHETIC_SCORE"
    )
    caption_field: str | None = opt(None, "Caption column of Parquet inputs.", show="caption, prompt, text, TEXT")
    image_field: str | None = opt(
        None, "Image column of Parquet inputs (bytes or {bytes, path}).", show="image, jpg, png, ..."
    )
    vae: str | None = opt(
        None, "Image tokenizer: 'pixel' or a diffusers VAE directory (a path or a URI).", show="the --model's vae"
    )
    text_encoder: str | None = opt(
        None, "'minilm' or a transformers encoder directory (a path or a URI).", show="the --model's text_encoder"
    )
    resolution: int | None = opt(
        None, "Side of winner crops and loser images, in pixels.", show="the --model's base_resolution"
    )
    max_text_len: int | None = opt(None, "Text tokens kept per caption.", show="the --model's max_text_len")
    steps: int | None = opt(None, "Loser sampling iterations (masked-generation steps).", show=MODEL_DEFAULT)
    cfg: float | None = opt(None, "Loser classifier-free guidance scale.", show=MODEL_DEFAULT)
    cfg_schedule: str | None = opt(None, "Guidance schedule: linear, linear-reference, constant.", show=MODEL_DEFAULT)
    temperature: float | None = opt(None, "Loser sampling temperature.", show=MODEL_DEFAULT)
    use_ema: bool = opt(True, "Draw losers with the EMA weights when the checkpoint has them.")
    dtype: str = opt("float32", "LightGen + encoder compute dtype: float32, bfloat16, float16.")


def _abs(path: str) -> str:
    """An existing path resolved to absolute; a URI without credentials; other specs unchanged."""
    if storage.is_uri(path):
        return storage.public(path)
    return str(Path(path).resolve()) if Path(path).exists() else path


def _check_device(device: str) -> None:
    """The device string is one a worker can resolve (the driver may see no GPU, so it is not resolved here)."""
    if device != "auto" and device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown --device {device!r}: expected auto, cpu, cuda[:N] or mps")


# ---------------------------------------------------------------------------------------------------- the judge


def check_judge_options(cfg: PairsConfig) -> None:
    """The judge stage's settings, checked up front (errors name the bad value); no weights loaded."""
    for name in ("max_pixels", "min_size", "judge_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.min_judge_score <= 1.0:
        raise ValueError(
            f"--min-judge-score must be in [0, 1] (an answer 'Score: N' scores N/10), got {cfg.min_judge_score}"
        )
    if cfg.min_aesthetic is not None and not math.isfinite(cfg.min_aesthetic):
        raise ValueError(f"--min-aesthetic must be a finite number, got {cfg.min_aesthetic}")
    if cfg.judge_max_pixels < 3136:
        raise ValueError(f"--judge-max-pixels must be >= 3136 (4 Qwen tokens of 28x28), got {cfg.judge_max_pixels}")
    if cfg.judge_dtype not in ("auto", *DTYPES):
        raise ValueError(f"unknown --judge-dtype {cfg.judge_dtype!r}: expected auto, float32, float16 or bfloat16")
    _check_device(cfg.device)
    if cfg.judge_backend not in BACKENDS:
        raise ValueError(f"unknown --judge-backend {cfg.judge_backend!r}: expected one of {BACKENDS}")
    judge_name(cfg.judge_backend, cfg.judge_model)  # checks the model directory
    if cfg.judge_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--judge-backend vllm needs the optional vllm extra (pip install 'lightgen[vllm]')")


def judge_content(cfg: PairsConfig) -> dict[str, Any]:
    """The settings that determine the judgements (a changed prompt or judge model changes them too)."""
    keys = ("judge_backend", "min_judge_score", "judge_max_new_tokens", "judge_max_pixels", "judge_dtype")
    keys += ("min_aesthetic", "aesthetic_field", "caption_field", "image_field", "max_pixels", "min_size")
    out = {k: getattr(cfg, k) for k in keys}
    out["judge_model"] = _abs(cfg.judge_model) if cfg.judge_model else None
    if cfg.judge_backend == "vllm":
        out["vllm_max_model_len"] = cfg.vllm_max_model_len
    judge = judge_name(cfg.judge_backend, cfg.judge_model)
    return {**out, "judge": judge, "prompt_version": PROMPT_VERSION, "schema_version": JUDGEMENT_SCHEMA_VERSION}


# ------------------------------------------------------------------------------------------- the loser model


@dataclass(frozen=True)
class Resolved:
    """What the pairs settings mean once the checkpoint's config is read: encoders, sizes, identities."""

    vae: str
    text_encoder: str
    vae_name: str
    text_encoder_name: str
    resolution: int
    max_text_len: int
    loser_model: str  # weights file : its sha256 @ config hash
    weights: str
    weights_sha256: str
    sampling: dict[str, Any]
    shown: dict[str, str] = dataclasses.field(default_factory=dict)  # local copy -> the URI it came from

    def public(self, path: str) -> str:
        """`path` as recorded: a file of a remote folder's local copy under that folder's URI."""
        for local, uri in self.shown.items():
            if path == local or path.startswith(local + os.sep):
                return uri + path[len(local) :].replace(os.sep, "/")
        return path


def _text_dim(spec: str) -> int:
    """Width of a text encoder's states, from its config (no weights loaded)."""
    if spec == "minilm":
        return 384
    path = Path(spec) / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    dim = cfg.get("d_model") or cfg.get("hidden_size")
    if not dim:
        raise ValueError(f"--text-encoder {spec!r}: no config.json with d_model / hidden_size")
    return int(dim)


def _vae_geometry(spec: str) -> tuple[int, int]:
    """(latent channels, stride) of an image tokenizer, from its config (no weights loaded)."""
    if spec == "pixel":
        return 3, 1
    from lightgen_model.encoders import find_vae_dir

    cfg = json.loads((find_vae_dir(spec) / "config.json").read_text())
    return int(cfg.get("latent_channels", 4)), 2 ** (len(cfg.get("block_out_channels", [0])) - 1)


def _check_sampling(cfg: PairsConfig) -> None:
    """Range checks of the loser sampling options (`cfg` with the model's defaults filled in)."""
    from lightgen_model.config import check_sampling

    check_sampling(cfg.steps, cfg.cfg, cfg.cfg_schedule, cfg.temperature)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}: expected float32, float16 or bfloat16")
    _check_device(cfg.device)


def _encoders(cfg: PairsConfig, model_dir: Path, mcfg: Any, shown: dict[str, str]) -> tuple[str, str]:
    """(image tokenizer, text encoder) specs, as `LightGenPipeline` resolves them, checked against the model; remote
    folders given as URIs are copied locally (and recorded in `shown`)."""
    from lightgen.api import BUILTIN_TEXT_ENCODERS, BUILTIN_VAES, resolve_component

    given_vae, given_text = (_local(spec, shown) if spec else spec for spec in (cfg.vae, cfg.text_encoder))
    cfg = dataclasses.replace(cfg, vae=given_vae, text_encoder=given_text)
    vae = resolve_component(cfg.vae or mcfg.vae, model_dir, BUILTIN_VAES, "image tokenizer", "--vae", bool(cfg.vae))
    text = cfg.text_encoder or mcfg.text_encoder
    given = bool(cfg.text_encoder)
    text = resolve_component(text, model_dir, BUILTIN_TEXT_ENCODERS, "text encoder", "--text-encoder", given)
    vae, text = _abs(vae), _abs(text)
    channels, stride = _vae_geometry(vae)
    if (channels, stride) != (mcfg.latent_channels, mcfg.vae_stride):
        raise ValueError(
            f"image tokenizer {vae!r} gives {channels} channels at stride {stride}, the --model expects "
            f"{mcfg.latent_channels} at stride {mcfg.vae_stride}"
        )
    if _text_dim(text) != mcfg.text_dim:
        raise ValueError(
            f"text encoder {text!r} gives {_text_dim(text)}-dim states, the --model expects {mcfg.text_dim}"
        )
    return vae, text


def resolve(cfg: PairsConfig) -> Resolved:
    """Check the pairs settings up front (errors name the bad value) and resolve what the checkpoint implies."""
    from lightgen_model.encoders import image_tokenizer_name, text_encoder_name
    from lightgen_model.hub import CONFIG_NAME, WEIGHTS_NAME, load_config, weights_file

    shown: dict[str, str] = {}
    if cfg.model and storage.is_remote(cfg.model) and not storage.is_file(storage.join(cfg.model, CONFIG_NAME)):
        raise ValueError(
            f"--model {storage.public(cfg.model)!r} is not a LightGen checkpoint directory (no {CONFIG_NAME})"
        )
    model_dir = Path(_local(cfg.model, shown)) if cfg.model else Path(cfg.model)
    if not cfg.model or not (model_dir / CONFIG_NAME).is_file():
        raise ValueError(f"--model {cfg.model!r} is not a LightGen checkpoint directory (no {CONFIG_NAME})")
    mcfg = load_config(model_dir)
    recorded = dataclasses.asdict(mcfg.sampling_defaults())
    given = {k: getattr(cfg, k) for k in recorded}
    cfg = dataclasses.replace(cfg, **{k: recorded[k] if v is None else v for k, v in given.items()})
    _check_sampling(cfg)
    weights = weights_file(model_dir, cfg.use_ema)
    if not weights.is_file():
        raise ValueError(f"--model {cfg.model!r} has no {WEIGHTS_NAME}")
    weights_sha256 = shards.sha256_file(weights)
    vae, text = _encoders(cfg, model_dir, mcfg, shown)
    resolution = mcfg.base_resolution if cfg.resolution is None else cfg.resolution
    try:
        mcfg.grid_for(resolution, resolution)
    except ValueError as e:
        raise ValueError(f"--resolution {resolution}: {e}") from None
    max_text_len = mcfg.max_text_len if cfg.max_text_len is None else cfg.max_text_len
    if max_text_len < 1:
        raise ValueError(f"--max-text-len must be >= 1, got {max_text_len}")
    sampling = {
        "steps": cfg.steps,
        "cfg": cfg.cfg,
        "cfg_schedule": cfg.cfg_schedule,
        "temperature": cfg.temperature,
        "resolution": resolution,
        "head_sampling_steps": mcfg.num_sampling_steps,
        "weights": weights.name,
        "dtype": cfg.dtype,
        "generator": "LightGenPipeline, one torch CPU generator per image, seeded with loser_seed",
    }
    return Resolved(
        vae=vae,
        text_encoder=text,
        vae_name=image_tokenizer_name(vae),
        text_encoder_name=text_encoder_name(text),
        resolution=resolution,
        max_text_len=max_text_len,
        # what the model is, not where it lives: the same checkpoint on a disk or a store makes the same rows
        loser_model=f"{weights.name}:{weights_sha256[:16]}@{shards.digest(mcfg.to_dict())[:12]}",
        weights=str(weights.resolve()),
        weights_sha256=weights_sha256,
        sampling=sampling,
        shown=shown,
    )


def _local(spec: str, shown: dict[str, str]) -> str:
    """A local path for a model folder spec (a remote one copied once per node), the copy recorded in `shown`."""
    if not storage.is_remote(spec):
        return spec
    local = storage.local_copy(spec)
    shown[local] = storage.public(spec)
    return local


def loser_seed(seed: int, row_id: str) -> int:
    """The generation seed of the loser for record `row_id` in a run with `--seed seed` (63 bits)."""
    return int(shards.digest(["dpo-loser", seed, row_id])[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF
