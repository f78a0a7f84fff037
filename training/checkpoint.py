"""Training checkpoints: one directory per step, written atomically, verified on load, no pickle.

`<out_dir>/checkpoints/step-00001234/` holds
- `model.safetensors`, `model_ema.safetensors`, `config.json`: loadable as is by `lightgen_model.from_pretrained`;
- `optimizer.safetensors`: every tensor of the optimizer state (`state/<param index or name>/<name>`);
- `state.json`: step, data-loader position, elapsed time, counters, the optimizer's param groups and non-tensor
  state, the resolved training config, and the size + CRC-32 of every file above (written last).
The directory is assembled under a temporary name and renamed, so a crash never leaves a half-written
`step-*` directory; a damaged one (truncated, edited) fails verification and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
PREFIX = "step-"


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors by name, JSON part: param groups and non-tensor values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`."""
    state: dict[int | str, dict[str, Any]] = {}
    key = lambda idx: int(idx) if idx.isdigit() else idx  # plain optimizers use indices, FSDP2 parameter names
    for name, t in tensors.items():
        _, idx, k = name.split("/", 2)
        state.setdefault(key(idx), {})[k] = t
    for name, v in meta.get("scalars", {}).items():
        idx, k = name.rsplit("/", 1)
        state.setdefault(key(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """`step-*` directories under root, oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    out = [p for p in r.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(out, key=lambda p: int(p.name[len(PREFIX) :]))


def save(
    root: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    model_config_json: str,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` under root atomically, then delete all but the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "model_ema.safetensors"))
    (tmp / "config.json").write_text(model_config_json + "\n")
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc(p)} for p in sorted(tmp.iterdir())}
    doc = {**state, "step": step, "optimizer": opt_meta, "files": files}
    with open(tmp / STATE, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(directory: str | Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    d = Path(directory)
    try:
        doc = json.loads((d / STATE).read_text())
    except FileNotFoundError:
        return f"no {STATE} (incomplete checkpoint)"
    except (OSError, ValueError) as e:
        return f"{STATE} unreadable: {e}"
    files = doc.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return f"{STATE} lists no files"
    for name, meta in files.items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, expected {meta.get('bytes')}"
        if _crc(p) != meta.get("crc32"):
            return f"{name} fails its CRC-32 check"
    return None


def latest_valid(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint under root (or None) and the damaged newer ones skipped, with reasons."""
    skipped = []
    for d in reversed(checkpoint_dirs(root)):
        reason = verify(d)
        if reason is None:
            return d, skipped
        skipped.append((d, reason))
    return None, skipped


def load(directory: str | Path) -> dict[str, Any]:
    """Read a verified checkpoint: model/EMA/optimizer tensors and the state document."""
    d = Path(directory)
    reason = verify(d)
    if reason is not None:
        raise ValueError(f"checkpoint {d} is damaged: {reason}")
    doc = json.loads((d / STATE).read_text())
    ema = d / "model_ema.safetensors"
    return {
        "model": load_file(str(d / "model.safetensors")),
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "optimizer": unflatten_optimizer(load_file(str(d / "optimizer.safetensors")), doc["optimizer"]),
        "state": doc,
    }
