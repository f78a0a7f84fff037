"""Weights on disk: ``config.json`` + ``model.safetensors`` (+ ``model_ema.safetensors``). No pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .mar import LightGen

CONFIG_NAME, WEIGHTS_NAME, EMA_NAME = "config.json", "model.safetensors", "model_ema.safetensors"


def _save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def save_pretrained(
    model: LightGen, directory: str | os.PathLike, ema_state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the config, the raw weights and (optionally) EMA weights with the same keys, atomically.

    A new directory is assembled under a temporary name beside it and renamed into place, so it appears complete
    or not at all. Into an existing directory each file is written beside its final name and renamed over it,
    weights first and ``config.json`` last; an EMA file left from an earlier save is removed when ``ema_state`` is
    None, so that ``from_pretrained`` never pairs these weights with a stale EMA.
    """
    d = Path(directory)
    target = d
    if not d.exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        d = d.parent / f".{d.name}.tmp-{os.getpid()}"
        d.mkdir(exist_ok=True)  # a crashed save's leftovers are overwritten below
    _save_state(model.state_dict(), d / WEIGHTS_NAME)
    if ema_state is not None:
        _save_state(ema_state, d / EMA_NAME)
    elif (d / EMA_NAME).exists():
        (d / EMA_NAME).unlink()
    tmp = d / (CONFIG_NAME + ".tmp")
    tmp.write_text(model.cfg.to_json() + "\n")
    os.replace(tmp, d / CONFIG_NAME)
    if d != target:
        os.replace(d, target)
    return target


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a saved model directory; ValueError naming the file if it is not a valid config."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in model directory {directory!s}")
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ValueError(f"{path}: not a JSON config ({type(e).__name__}: {e})") from None
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class WeightsMismatchError(ValueError):
    """Weights that do not fit a model: the message is one line with the counts and the first few keys of each
    kind; ``missing``, ``unexpected`` and ``mismatched`` ("key: shape in the file vs the model's") list them all."""

    SHOWN = 3  # keys of each kind named in the message

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [
            f"{len(keys)} {what if len(keys) == 1 else many} ({self._first(keys)})"
            for what, many, keys in self.kinds()
            if keys
        ]
        super().__init__(f"{source}: {', '.join(parts)}")

    def kinds(self) -> list[tuple[str, str, list[str]]]:
        """(what one is, what several are, keys) for the missing keys, unexpected ones and those of another shape."""
        return [
            ("missing key", "missing keys", self.missing),
            ("unexpected key", "unexpected keys", self.unexpected),
            ("key of another shape", "keys of another shape", self.mismatched),
        ]

    @classmethod
    def _first(cls, keys: list[str]) -> str:
        shown = ", ".join(keys[: cls.SHOWN])
        return shown if len(keys) <= cls.SHOWN else f"{shown} and {len(keys) - cls.SHOWN} more"

    def details(self) -> list[str]:
        """Every key that does not fit, one a line: ``missing key: KEY``, ``unexpected key: KEY``, ..."""
        return [f"{what}: {k}" for what, _, keys in self.kinds() for k in keys]


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``WeightsMismatchError`` (message starting with ``source``) unless ``state`` has exactly the model's keys,
    each with the model's shape (what ``load_state_dict(strict=True)`` needs)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched)


def load_weights(model: LightGen, path: Path) -> None:
    """Load the safetensors file ``path`` into ``model`` (strict); ValueError naming the file if it is damaged,
    ``WeightsMismatchError`` if it does not fit the model's config."""
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    check_fit(model, state, f"{path}: weights do not fit config.json")
    model.load_state_dict(state, strict=True)


def weights_file(directory: str | os.PathLike, use_ema: bool = True) -> Path:
    """The weights file ``from_pretrained`` loads: the EMA's when present and ``use_ema``, else the raw ones."""
    d = Path(directory)
    return d / EMA_NAME if use_ema and (d / EMA_NAME).is_file() else d / WEIGHTS_NAME


def from_pretrained(
    directory: str | os.PathLike,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    head_steps: int | str | None = None,
) -> LightGen:
    """Load a model for inference (eval mode); the EMA weights are used when present and ``use_ema``.

    ``head_steps`` replaces the config's ``num_sampling_steps`` (the head's respaced sampling steps; they are
    not part of the weights).

    On a CPU this also turns on flush-to-zero for denormal floats (``torch.set_flush_denormal``), process-wide:
    a trained model's sampling was up to 6x slower with denormals (BENCHMARKS.md) and they never matter here."""
    d = Path(directory)
    cfg = load_config(d)
    if head_steps is not None:
        cfg = cfg.replace(num_sampling_steps=head_steps)
    weights = weights_file(d, use_ema)
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in model directory {d}")
    if torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)
    model = LightGen(cfg)
    load_weights(model, weights)
    model.to(device=device, dtype=dtype).eval()
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters in total and per part of the network."""
    parts = {
        "encoder": ("z_proj", "encoder_", "buffer_tokens"),
        "decoder": ("decoder_", "mask_token"),
        "text_aligner": ("text_emb", "fake_latent"),
        "cross": ("last_", "cross_"),
        "diffusion_head": ("diffloss",),
    }
    out = {k: 0 for k in parts} | {"total": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out["total"] += p.numel()
        part = next((k for k, prefixes in parts.items() if name.startswith(prefixes)), None)
        if part is None:
            raise AssertionError(f"parameter {name} belongs to no part")
        out[part] += p.numel()
    return out
