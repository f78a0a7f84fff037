"""`lightgen convert-reference`: a checkpoint of the public reference implementation -> our model directory.

The reference saves ``torch.save({"model", "model_ema", "optimizer", "epoch", "scaler", "args"})`` with an
argparse Namespace inside. It is read with ``torch.load(weights_only=True)``, allowing only that Namespace
class; anything else in the pickle is refused. Parameter names are the same on both sides; the config is
inferred from the tensor shapes (plus the few numbers only ``args`` holds) with the reference's behaviour
kept: ``buffer_size=0``, ``text_key_mask=False`` (it attends to padded text) and ``interpolate_offset=0.1``.
The reference's generation settings are recorded as the model's sampling defaults (``config.json``'s ``sampling``
and ``num_sampling_steps``), so a converted model samples like its authors' scripts unless told otherwise.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightgen.weights import load_torch_file
from lightgen_model import PRESETS, LightGen, ModelConfig, Stack, count_parameters, save_pretrained

# attention heads of the reference's model constructors (models/fluid_arbitrary.py), by args.model
HEADS_BY_MODEL = {"fluid_base": 12, "fluid_large": 16, "fluid_huge": 16}
STRIP_PREFIXES = ("module.", "_orig_mod.")
# how the reference's generation scripts sample (scripts/geneval.py, sample.py, dpo_sample.py, pipeline_image.py):
# 64 iterations, constant cfg 4.0, temperature 1.0; the head's steps come from args.num_sampling_steps ("100")
REFERENCE_SAMPLING = {"steps": 64, "cfg": 4.0, "cfg_schedule": "constant", "temperature": 1.0}
CONVERT_HINT = (
    "`lightgen convert-reference` converts a checkpoint of tensors, containers and the reference's argparse args: "
    "one you trust that holds more converts once it is saved again with only its 'model', 'model_ema' and 'args'"
)


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded safely (tensors, containers and argparse.Namespace only)."""
    ckpt = load_torch_file(path, allowed=[argparse.Namespace], what="checkpoint", hint=CONVERT_HINT)
    if not isinstance(ckpt, dict) or not ({"model", "model_ema"} & set(ckpt)):
        keys = sorted(map(str, ckpt))[:20] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a reference checkpoint (no 'model' or 'model_ema' entry; found {keys})")
    return ckpt


def reference_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``args`` (an argparse Namespace in the reference) as a dict; {} if it has none."""
    args = ckpt.get("args")
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"checkpoint entry 'args' is not an argparse Namespace or a dict, got {type(args).__name__}")
    return args


def clean_state(state: Any, name: str) -> dict[str, Tensor]:
    """A state dict with DDP / torch.compile prefixes removed; ValueError if it is not a dict of tensors."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"checkpoint entry {name!r} is not a state dict of tensors")
    out = {}
    for k, v in state.items():
        for prefix in STRIP_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"blocks {prefix}.* are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)


def _shape(state: dict[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"checkpoint has no {key!r}: not a reference LightGen (FLUID) state dict")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"checkpoint tensor {key!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def _number(value: Any, name: str, kind: type[int] | type[float]) -> Any:
    """``kind(value)`` for a value of the checkpoint's args; ValueError naming it if it is not a number."""
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        shown = repr(value)[:80]
        raise ValueError(
            f"checkpoint args.{name}={shown} is not {'an integer' if kind is int else 'a number'}"
        ) from None


def _pick(option: Any, args: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """An explicit option, else the first of ``names`` present in the checkpoint's args, else ``default``."""
    if option is not None:
        return option
    return next((args[n] for n in names if args.get(n) is not None), default)


def _latent_grid(
    state: dict[str, Tensor],
    args: dict[str, Any],
    token_dim: int,
    latent_channels: int | None,
    patch_size: int | None,
    vae_stride: int | None,
) -> tuple[int, int, int, int]:
    """Latent channels, patch size, VAE stride (options, else args, else defaults) and the side of the encoder's
    square token grid; an error when they do not fit `token_dim` or the grid is not square."""
    C = _number(_pick(latent_channels, args, ("vae_embed_dim",), 16), "vae_embed_dim", int)
    p = _number(_pick(patch_size, args, ("patch_size",), 2), "patch_size", int)
    stride = _number(_pick(vae_stride, args, ("vae_stride",), 8), "vae_stride", int)
    if C * p * p != token_dim:
        raise ValueError(
            f"z_proj takes {token_dim}-dim tokens, but latent_channels={C} x patch_size={p}^2 = {C * p * p}: "
            "pass --latent-channels / --patch-size"
        )
    L0 = _shape(state, "encoder_pos_embed_learned", 3)[1]
    g = math.isqrt(L0)
    if g * g != L0:
        raise ValueError(f"encoder_pos_embed_learned has {L0} positions, not a square grid")
    return C, p, stride, g


def _heads(args: dict[str, Any], heads: int | None) -> int:
    """The number of attention heads: `heads`, else args' num_heads / encoder_num_heads, else by args.model."""
    n_heads = heads or next((_number(args[n], n, int) for n in ("num_heads", "encoder_num_heads") if args.get(n)), None)
    n_heads = n_heads or HEADS_BY_MODEL.get(str(args.get("model")))
    if n_heads is None:
        raise ValueError(f"cannot tell the number of attention heads (args.model={args.get('model')!r}): pass --heads")
    return n_heads


def _head_widths(state: dict[str, Tensor], token_dim: int) -> tuple[int, int]:
    """The diffusion head's width and output channels (`token_dim`, or twice that when it learns sigma)."""
    head_width = _shape(state, "diffloss.net.input_proj.weight", 2)[0]
    out_ch = _shape(state, "diffloss.net.final_layer.linear.weight", 2)[0]
    if out_ch not in (token_dim, 2 * token_dim):
        raise ValueError(f"diffloss.net.final_layer.linear has {out_ch} outputs for {token_dim}-dim tokens")
    return head_width, out_ch


def infer_config(
    state: dict[str, Tensor],
    args: dict[str, Any],
    heads: int | None = None,
    latent_channels: int | None = None,
    patch_size: int | None = None,
    vae_stride: int | None = None,
    vae: str = PRESETS["lightgen"]["vae"],
    text_encoder: str = PRESETS["lightgen"]["text_encoder"],
) -> ModelConfig:
    """The ModelConfig of a reference state dict: widths and depths from shapes, the rest from args/options."""
    enc_dim, token_dim = _shape(state, "z_proj.weight", 2)
    C, p, stride, g = _latent_grid(state, args, token_dim, latent_channels, patch_size, vae_stride)
    n_heads = _heads(args, heads)
    enc_depth = _depth(state, "encoder_blocks")
    ratio = _shape(state, "encoder_blocks.0.mlp.fc1.weight", 2)[0] / enc_dim if enc_depth else 4.0
    head_width, out_ch = _head_widths(state, token_dim)
    return ModelConfig(
        latent_channels=C,
        vae_stride=stride,
        patch_size=p,
        base_resolution=g * stride * p,
        encoder=Stack(enc_dim, enc_depth, n_heads),
        decoder=Stack(_shape(state, "decoder_embed.weight", 2)[0], _depth(state, "decoder_blocks"), n_heads),
        cross=Stack(_shape(state, "last_embed.weight", 2)[0], _depth(state, "cross_attn_blocks"), n_heads),
        mlp_ratio=ratio,
        attn_dropout=_number(args.get("attn_dropout", 0.1), "attn_dropout", float),
        proj_dropout=_number(args.get("proj_dropout", 0.1), "proj_dropout", float),
        buffer_size=0,
        text_dim=_shape(state, "text_emb.text_proj.linear_1.weight", 2)[1],
        text_aligner_depth=_depth(state, "text_emb.text_aligner"),
        max_text_len=_number(args.get("max_length") or 128, "max_length", int),
        text_drop_prob=_number(args.get("text_drop_prob", 0.1), "text_drop_prob", float),
        text_key_mask=False,
        mask_ratio_min=_number(args.get("mask_ratio_min", 0.7), "mask_ratio_min", float),
        head_width=head_width,
        head_depth=_depth(state, "diffloss.net.res_blocks"),
        diffusion_batch_mul=_number(args.get("diffusion_batch_mul") or 4, "diffusion_batch_mul", int),
        num_sampling_steps=head_steps_spec(args.get("num_sampling_steps")),
        prediction="eps",
        sampling=dict(REFERENCE_SAMPLING),
        learn_sigma=out_ch == 2 * token_dim,
        interpolate_offset=0.1,
        vae=vae,
        text_encoder=text_encoder,
    )


def head_steps_spec(value: Any) -> int | str:
    """The reference's ``num_sampling_steps`` (a string there: "100", "ddim25", "10,20") as our spec: plain counts
    become ints, the other forms stay strings (``space_timesteps`` reads them); missing = 100."""
    if value is None or value == "":
        return 100
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def check_keys(state: dict[str, Tensor], model: LightGen, name: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key of ``state`` for ``model``."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {want[k]}"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != want[k]
    ]
    problems = [
        f"{len(xs)} {what}: {', '.join(xs[:20])}{' ...' if len(xs) > 20 else ''}"
        for what, xs in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes))
        if xs
    ]
    if problems:
        raise ValueError(f"checkpoint entry {name!r} does not fit the inferred model: " + "; ".join(problems))


def _json_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}


def convert_reference(
    checkpoint: str | Path, out: str | Path, head_steps: int | str | None = None, **overrides: Any
) -> dict[str, Any]:
    """Write ``config.json`` + ``model.safetensors`` (+ ``model_ema.safetensors``) to ``out``; returns a summary.

    ``from_pretrained(out)`` then loads the EMA weights when the checkpoint had them. ``head_steps`` replaces
    the head's sampling steps taken from ``args.num_sampling_steps`` (a count, "ddimN" or "a,b,..."); the
    ``overrides`` are :func:`infer_config`'s (heads, latent_channels, patch_size, vae_stride, vae, text_encoder).
    """
    ckpt = load_reference_checkpoint(checkpoint)
    args = reference_args(ckpt)
    raw = clean_state(ckpt["model"], "model") if "model" in ckpt else None
    ema = clean_state(ckpt["model_ema"], "model_ema") if "model_ema" in ckpt else None
    cfg = infer_config(ema or raw, args, **overrides)
    if head_steps is not None:
        cfg = cfg.replace(num_sampling_steps=head_steps_spec(head_steps))
    epoch = ckpt.get("epoch") if _json_args({"epoch": ckpt.get("epoch")}) else None  # only a plain value
    cfg.extra = {"converted_from": str(checkpoint), "epoch": epoch, "reference_args": _json_args(args)}
    with torch.device("meta"):  # shapes only; the checkpoint's tensors are assigned below
        model = LightGen(cfg)
    for name, state in (("model", raw), ("model_ema", ema)):
        if state is not None:
            check_keys(state, model, name)
    model.load_state_dict(raw if raw is not None else ema, strict=True, assign=True)
    save_pretrained(model, out, ema_state=ema if raw is not None else None)
    return {
        "out": str(out),
        "weights": ["model"] * (raw is not None) + ["model_ema"] * (ema is not None),
        "loads": "model_ema" if ema is not None else "model",
        "parameters": count_parameters(model)["total"],
        "epoch": epoch,
        "config": cfg.to_dict(),
    }
