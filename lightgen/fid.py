"""`lightgen fid`: Fréchet Inception Distance between two image folders, with torchmetrics.

The Inception-v3 weights of the FID protocol (torch-fidelity's / pytorch-fid's ``pt_inception-2015-12-05``
file, a state dict) cannot be downloaded on our machines, so they come from a local path and are loaded
with ``torch.load(weights_only=True)`` (or from safetensors): a pickle that holds anything but tensors is
refused, never executed. Any ``nn.Module`` mapping uint8 images (B, 3, H, W) to (B, D) features can stand
in for Inception (tests use a small random network).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lightgen.images import read_image
from lightgen.weights import load_safetensors, load_torch_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_FEATURES = (64, 192, 768, 2048)
WEIGHTS_ENV = "LIGHTGEN_INCEPTION_WEIGHTS"
NO_WEIGHTS = (
    "FID needs the Inception-v3 weights of the FID protocol (pt_inception-2015-12-05-6726825d.pth, as shipped "
    "by torch-fidelity / pytorch-fid), which cannot be downloaded here: pass --inception-weights PATH "
    f"(or set {WEIGHTS_ENV})"
)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, so GenEval layouts work), sorted; hidden files skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    paths = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if len(paths) < 2:
        raise ValueError(f"{root}: FID needs at least 2 images, found {len(paths)} ({'/'.join(IMAGE_SUFFIXES)})")
    return paths


def load_image(path: Path) -> Tensor:
    """(3, H, W) uint8 RGB; ValueError naming the file if it cannot be decoded or is a decompression bomb."""
    arr = np.asarray(read_image(path, "RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_batches(paths: list[Path], batch_size: int) -> Iterator[Tensor]:
    """(B, 3, H, W) uint8 batches of up to ``batch_size`` consecutive images of one size."""
    batch: list[Tensor] = []
    for p in paths:
        img = load_image(p)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A tensor state dict from ``.safetensors`` or a torch file, without ever unpickling arbitrary objects."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_safetensors(p)
    state = load_torch_file(p, what="weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def load_inception(weights: str | Path | None, feature: int = 2048, antialias: bool = False) -> nn.Module:
    """torchmetrics' Inception-v3 feature extractor (``feature`` = 64, 192, 768 or 2048 dims) with local weights.

    ``antialias=False`` resizes to 299 px like the original TensorFlow graph (comparable FID numbers).
    """
    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"feature must be one of {INCEPTION_FEATURES}, got {feature}")
    weights = weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        raise ValueError(NO_WEIGHTS)
    state = load_state_dict_file(weights)
    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity reads the file itself with weights_only=False; hand it the safely loaded dict instead.
    with mock.patch.object(torch, "load", lambda *args, **kwargs: state):
        try:
            net = NoTrainInceptionV3("inception-v3-compat", [str(feature)], str(weights), antialias=antialias)
        except RuntimeError as e:
            raise ValueError(f"{weights}: not Inception-v3 FID weights: {str(e)[:1000]}") from None
    net.num_features = feature
    return net


def compute_fid(
    real: list[Path],
    fake: list[Path],
    feature: nn.Module,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> float:
    """FID between two lists of image files, with ``feature`` (uint8 (B, 3, H, W) -> (B, D)) as the network."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    metric = FrechetInceptionDistance(feature=feature, normalize=False).to(device)
    with tqdm(total=len(real) + len(fake), unit="img", desc="fid", disable=not progress) as bar:
        for paths, is_real in ((real, True), (fake, False)):
            for batch in image_batches(paths, batch_size):
                metric.update(batch.to(device), real=is_real)
                bar.update(len(batch))
    return float(metric.compute())


def run_fid(
    real: str | Path,
    fake: str | Path,
    weights: str | Path | None = None,
    feature: int = 2048,
    batch_size: int = 50,
    device: str = "cpu",
    antialias: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """FID between the images of two folders with the Inception network; returns the value and the counts."""
    real_paths, fake_paths = list_images(real), list_images(fake)
    net = load_inception(weights, feature, antialias)
    value = compute_fid(real_paths, fake_paths, net, batch_size, device, progress)
    return {"fid": value, "real_images": len(real_paths), "fake_images": len(fake_paths), "feature": feature}
