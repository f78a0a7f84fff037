"""Reading weight files a user gives us, safely: safetensors, or a torch file through torch's restricted unpickler.

Nothing is ever unpickled with ``weights_only=False``: ``torch.load(weights_only=True)`` rebuilds only tensors,
containers and the classes a caller allows (``allowed``), and refuses any other global. Whatever a damaged or
foreign file makes the readers raise becomes a ``ValueError`` naming the file.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

# torch's refusal goes on to advise rerunning with weights_only=False or allowlisting the global "if you trust"
# it: the one thing never to do with a downloaded file, so that advice is cut from every message shown
ADVICE = ("Please use `torch.serialization", "Weights only load failed", "weights_only")
CONVERT_HINT = (
    "To use weights you trust: save their tensors as .safetensors, or convert a reference checkpoint with "
    "`lightgen convert-reference`"
)


def _reason(e: BaseException) -> str:
    """The informative line of a reader's message: torch's refusals start with a paragraph of boilerplate and end
    with advice to unpickle anyway (``ADVICE``), both dropped."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(ADVICE[0], 1)[0].strip() or "it holds something other than tensors"
    kept = [line for line in lines if not any(a in line for a in ADVICE)]
    return f"{type(e).__name__}: {kept[0]}" if kept else type(e).__name__


def check_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError if it is not a file, ValueError if it is empty."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} does not exist: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file, not a {what}")
    return p


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file; ValueError naming the file if it is truncated or not safetensors."""
    from safetensors.torch import load_file

    p = check_file(path, "weights file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{p}: not a readable safetensors file ({_reason(e)})") from None


def load_torch_file(
    path: str | Path, allowed: Sequence[type] = (), what: str = "checkpoint", hint: str = CONVERT_HINT
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with the classes ``allowed`` besides tensors and
    containers; a pickle holding anything else is refused unexecuted. ValueError naming the file on any failure;
    a refusal says what the file is, that it was not loaded, and ``hint`` (how to convert a trusted one).

    Zip-format files are memory-mapped (tensors are read when used); legacy (non-zip) files are read whole.
    """
    p = check_file(path, what)
    with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickles it will refuse; the refusal is reported below
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{p}: not loaded: this {what} is a pickle holding more than tensors ({_reason(e)}); unpickling it "
                f"could run any code, so it was refused by torch.load(weights_only=True) without running any. {hint}"
            ) from None
        except Exception as e:  # a damaged file makes the unpickler raise almost anything (IndexError, struct.error…)
            raise ValueError(f"{p}: not a readable torch {what} ({_reason(e)})") from None
