"""Random draws on a generator's own device, so one CPU ``torch.Generator`` reproduces results anywhere."""

from __future__ import annotations

import torch
from torch import Tensor


def _gen_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device | str:
    return generator.device if generator is not None else device


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``."""
    return torch.randn(shape, generator=generator, device=_gen_device(generator, device)).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` on ``device``."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator, device)).to(device)


def randint(high: int, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """n uniform integers in [0, high) on ``device``."""
    return torch.randint(0, high, (n,), generator=generator, device=_gen_device(generator, device)).to(device)
