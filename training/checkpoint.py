"""Training checkpoints: one directory per step, written atomically, verified on load, no pickle.

`<out_dir>/checkpoints/step-00001234/` holds
- `model.safetensors`, `model_ema.safetensors`, `config.json`: written by `lightgen_model.save_pretrained`, so
  loadable as is by `lightgen_model.from_pretrained`;
- `optimizer.safetensors`: every tensor of the optimizer state (`state/<param index or name>/<name>`);
- `state.json`: step, data-loader position, elapsed time, counters, the optimizer's param groups and non-tensor
  state, the resolved training config, the size + CRC-32 of every file above (written last), and `checksum`: the
  sha256 of its own canonical JSON without that field.
The directory is assembled under a temporary name and renamed, so a crash never leaves a half-written
`step-*` directory; a damaged one (truncated, edited; a state.json of the wrong shape or types, or whose checksum
does not match) fails verification and the previous one is used.

Also here: the full (gathered) model, EMA and optimizer states of a DDP or FSDP2 run, and the weights a run
starts from (`model.init_from`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, save_pretrained
from lightgen_model.hub import EMA_NAME, WEIGHTS_NAME, check_fit

from .data import Loader
from .dist import DistInfo
from .optim import EMA
from .state import TrainState

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
PREFIX = "step-"
CHECKSUM = "checksum"


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
    model: LightGen,
    ema_state: dict[str, Tensor] | None,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` under root atomically, then delete all but the newest `keep_last`.

    `model` is saved with `save_pretrained` (it may be a `holding` wrapper of a gathered state dict)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()  # save_pretrained then writes inside it: a kill leaves only this `.tmp-step-*`, which start-up removes
    save_pretrained(model, tmp, ema_state)
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / OPTIMIZER))
    files = {p.name: {"bytes": p.stat().st_size, "crc32": _crc(p)} for p in sorted(tmp.iterdir())}
    doc = {**state, "step": step, "optimizer": opt_meta, "files": files}
    doc[CHECKSUM] = state_checksum(doc)
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


def state_checksum(doc: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a state document without its checksum field."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _natural(v: Any) -> bool:
    return type(v) is int and v >= 0


def _files_ok(files: Any) -> bool:
    """{plain file name: {"bytes": n, "crc32": n}}, the weights among them."""
    return (
        isinstance(files, dict)
        and WEIGHTS_NAME in files
        and all(isinstance(m, dict) and _natural(m.get("bytes")) and _natural(m.get("crc32")) for m in files.values())
        and all(n not in ("", ".", "..") and "/" not in n and "\\" not in n for n in files)
    )


def state_problem(doc: Any, directory: Path) -> str | None:
    """Why a parsed state.json is not one `save` wrote for this checkpoint directory (None when it is): not an
    object, a checksum that does not match, a missing or mistyped field (the `TrainState` fields and the loader's
    position are checked by their owners), a step other than the directory's."""
    if not isinstance(doc, dict):
        return f"{STATE} is not a JSON object"
    if CHECKSUM not in doc:
        return f"{STATE} has no checksum (edited, or written by an older version)"
    if doc[CHECKSUM] != state_checksum(doc):
        return f"{STATE} does not match its checksum (edited or damaged)"
    opt = doc.get("optimizer")
    ok = {
        "loader": Loader.valid_state(doc.get("loader")),
        "kind": isinstance(doc.get("kind"), str),
        "optimizer": isinstance(opt, dict)
        and isinstance(opt.get("param_groups"), list)
        and all(isinstance(g, dict) for g in opt["param_groups"])
        and isinstance(opt.get("scalars", {}), dict),
        "files": _files_ok(doc.get("files")),
    }
    bad = TrainState.problems(doc) + [k for k, good in ok.items() if not good or k not in doc]
    if bad:
        return f"{STATE}: {', '.join(bad)} missing or of the wrong type"
    name = directory.name
    if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and int(name[len(PREFIX) :]) != doc["step"]:
        return f"{STATE} says step {doc['step']}, the directory is {name}"
    return None


def verify(directory: str | Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    d = Path(directory)
    try:
        doc = json.loads((d / STATE).read_text())
    except FileNotFoundError:
        return f"no {STATE} (incomplete checkpoint)"
    except (OSError, ValueError, RecursionError) as e:
        return f"{STATE} unreadable: {e}"
    problem = state_problem(doc, d)
    if problem is not None:
        return problem
    for name, meta in doc["files"].items():
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {meta['bytes']}"
        if _crc(p) != meta["crc32"]:
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


def find_resume(resume: str, root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint `checkpoint.resume` names ("auto": the newest intact one under root, "never": None) and the
    damaged ones skipped on the way; ValueError when a named checkpoint is damaged."""
    if resume == "never":
        return None, []
    if resume != "auto":
        reason = verify(resume)
        if reason is not None:
            raise ValueError(f"checkpoint.resume={resume}: {reason}")
        return Path(resume), []
    return latest_valid(root)


def step_of(directory: str | Path) -> int:
    """The step a verified checkpoint directory's state.json records."""
    return int(json.loads((Path(directory) / STATE).read_text())["step"])


def load(directory: str | Path) -> dict[str, Any]:
    """Read a verified checkpoint: model/EMA/optimizer tensors and the state document."""
    d = Path(directory)
    reason = verify(d)
    if reason is not None:
        raise ValueError(f"checkpoint {d} is damaged: {reason}")
    doc = json.loads((d / STATE).read_text())
    ema = d / EMA_NAME
    return {
        "model": load_file(str(d / WEIGHTS_NAME)),
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "optimizer": unflatten_optimizer(load_file(str(d / OPTIMIZER)), doc["optimizer"]),
        "state": doc,
    }


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """`model.load_state_dict(state, strict=True)`; a ValueError (`WeightsMismatchError`) naming `source`, the
    counts and the first few keys when the tensors do not fit."""
    check_fit(model, state, f"{source}: its weights do not fit its config")
    model.load_state_dict(state, strict=True)


def initial_weights(directory: str | Path, prefers_ema: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights to start from, EMA weights to start the EMA from) of a model or checkpoint directory: its EMA
    weights first when `prefers_ema` (DPO post-trains the released weights), else its raw ones; whichever exists."""
    d = Path(directory)
    raw, ema = d / WEIGHTS_NAME, d / EMA_NAME
    if not raw.is_file() and not ema.is_file():
        raise FileNotFoundError(f"model.init_from={d}: no {WEIGHTS_NAME} or {EMA_NAME} there")
    w_raw = load_file(str(raw)) if raw.is_file() else None
    w_ema = load_file(str(ema)) if ema.is_file() else None
    start = (w_ema or w_raw) if prefers_ema else (w_raw or w_ema)
    return start, (w_ema or w_raw)


# -- the full state of a (possibly sharded) run -------------------------------------------------------------
def full_model_state(model: nn.Module, fsdp: bool, info: DistInfo) -> dict[str, Tensor] | None:
    """The model's full state dict on the main process: gathered to the CPU under FSDP2 (a collective: every rank
    calls it, the others get {}), else the main process's own (None on the others)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict() if info.is_main else None


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool, info: DistInfo) -> dict | None:
    """The optimizer's full state dict, as `full_model_state` (parameters keyed by name under FSDP2)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, opt, options=opts)
    return opt.state_dict() if info.is_main else None


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a full optimizer state dict (written by `full_optimizer_state`), sharding it under FSDP2."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def with_ema(model_state: dict[str, Tensor], ema: EMA) -> dict[str, Tensor]:
    """The model's state dict with the EMA values in place of the parameters (buffers as they are). `ema.full()`
    is a collective under FSDP2: every rank calls this (the others with their empty state)."""
    full = ema.full()
    return {k: (full[k].to(v.dtype) if k in full else v) for k, v in model_state.items()}


def holding(cfg: ModelConfig, state: dict[str, Tensor]) -> LightGen:
    """A LightGen whose parameters and buffers are the tensors of `state` (built on the meta device: no copy, no
    initialisation), for `save_pretrained`."""
    with torch.device("meta"):
        net = LightGen(cfg)
    net.load_state_dict(state, strict=True, assign=True)
    return net
