"""The dry runs behind `lightgen plan`: one per stage kind, remembered per process (and in an optional JSON cache,
so that a plan for three GPU types counts each stage once)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

GIB = 1024**3
_MEMO: dict[str, Any] = {}
_CACHE: Path | None = None


def use_cache(path: str | Path | None) -> None:
    """Read (and later extend) dry-run results in the JSON file ``path``; None: this process only."""
    global _CACHE
    _CACHE = None if path is None else Path(path)
    if _CACHE is not None and _CACHE.is_file():
        _MEMO.update(json.loads(_CACHE.read_text()))


def remembered(key: dict[str, Any], fn: Any) -> Any:
    """``fn()`` once per key (a JSON-able dict)."""
    k = json.dumps(key, sort_keys=True)
    if k not in _MEMO:
        _MEMO[k] = fn()
        if _CACHE is not None:
            _CACHE.write_text(json.dumps(_MEMO))
    return _MEMO[k]


def inference_memory(report: dict[str, Any]) -> float:
    """GiB: every model's parameters resident at once plus the largest activation peak of the batch."""
    items = report["items"].values()
    params = sum(v["param_bytes"] for v in items)
    return (params + max((v["peak_activation_bytes"] for v in items), default=0)) / GIB


SYNTH = {
    "teacher": "flux",
    "dtype": "auto",
    "batch_size": 4,
    "resolution": 512,
    "steps": 28,
    "guidance": 3.5,
    "max_sequence_length": 512,
}
ENCODE = {"dtype": "bfloat16", "batch_size": 64, "resolution": 256, "max_text_len": 128}
PAIRS = {
    "judge_backend": "transformers",
    "judge_model": "Qwen2.5-VL-7B-Instruct",
    "judge_max_pixels": 1024 * 1024,
    "vae": None,
    "text_encoder": None,
    "resolution": None,
    "max_text_len": None,
    "steps": None,
    "cfg": None,
    "dtype": "bfloat16",
    "batch_size": 8,
}


def synthesize(s: dict[str, Any]) -> dict[str, Any]:
    """The synthesize dry run with the recipe's settings."""
    from pipeline.core.dryrun import dry_synthesize

    return dry_synthesize(SimpleNamespace(**(SYNTH | s)))


def encode(s: dict[str, Any]) -> dict[str, Any]:
    """The encode-latents dry run."""
    from pipeline.core.dryrun import dry_encode

    return dry_encode(SimpleNamespace(**(ENCODE | s)))


def pairs(s: dict[str, Any]) -> dict[str, Any]:
    """The build-dpo-pairs dry run."""
    from pipeline.core.dryrun import dry_pairs

    return dry_pairs(SimpleNamespace(**(PAIRS | s)))


def sample(s: dict[str, Any]) -> dict[str, Any]:
    """GenEval-style sampling: prompts through the text encoder, `generate`, the VAE decode."""
    import torch

    from lightgen.fullsize import lightgen_config, lightgen_model
    from lightgen.meta import measure
    from pipeline.core.dryrun import (
        check_lightgen_pairing,
        encoders,
        item_figures,
        resolve_spec,
        sample_items,
        stage_report,
    )

    mcfg = lightgen_config(resolve_spec(s.get("model", "lightgen")))
    res, B = s.get("resolution", mcfg.base_resolution), s.get("batch_size", 64)
    d = mcfg.sampling_defaults().replace(steps=s.get("steps"), cfg=s.get("cfg"))
    enc = encoders(
        s.get("vae") or mcfg.vae, s.get("text_encoder") or mcfg.text_encoder, "bfloat16", mcfg.max_text_len, res
    )
    check_lightgen_pairing(mcfg, enc)
    with torch.no_grad():
        m, _ = measure(lambda: enc.text.states(["prompt"] * B)[0])
    items = {"text encoder": item_figures(m, enc.text.model, B)}
    model = lightgen_model(mcfg, torch.bfloat16).eval()
    gen, latents = sample_items(model, B, res, d.steps, d.cfg, mcfg.max_text_len)
    items |= gen
    dec, _ = measure(lambda: enc.tokenizer.decode(latents))
    items["vae.decode"] = item_figures(dec, enc.tokenizer.vae, B)
    return stage_report("sample", B, items)


def train(s: dict[str, Any], gpus: int) -> dict[str, Any]:
    """A trainer dry run: ``config`` (a conf/ YAML) with ``overrides``; ``global_batch`` sets grad_accum."""
    from lightgen.plan import accum_for
    from training.config import load_config
    from training.dryrun import dry_train

    over = list(s.get("overrides", []))
    cfg = load_config(s["config"], over)
    if "global_batch" in s:
        accum = accum_for(s["global_batch"], cfg.data.batch_size, gpus)
        cfg = load_config(s["config"], [*over, f"optim.grad_accum={accum}"])
    if s.get("trainer", "pretrain") == "dpo":
        from training.dpo import DPOTrainer as cls
    else:
        from training.pretrain import PretrainTrainer as cls
    return dry_train(cls, cfg, gpus, s.get("resolution"), s.get("text_len"))


def run(kind: str, settings: dict[str, Any], gpus: int) -> tuple[float, float | None, str]:
    """(FLOPs per item, memory per GPU in GiB, how that memory is held: ddp / fsdp2 / inference) of a stage."""
    if kind == "train":
        r = remembered({"kind": kind, "gpus": gpus, **settings}, lambda: train(settings, gpus))
        mode = "fsdp2" if r.get("parallel", settings.get("parallel", "ddp")) == "fsdp" else "ddp"
        return r["flops_per_item"], r["memory_per_gpu_bytes"][mode] / GIB, mode
    fn = {"synthesize": synthesize, "encode": encode, "pairs": pairs, "sample": sample}[kind]
    r = remembered({"kind": kind, **settings}, lambda: fn(settings))
    return r["flops_per_item"], inference_memory(r), ""
