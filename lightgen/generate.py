"""`lightgen generate` and `inpaint`: prompts (and an image) -> PNGs + a JSON sidecar of the settings, through
``LightGenPipeline``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from lightgen.api import LightGenPipeline, check_prompts
from lightgen_model import SamplingDefaults, check_text

SIDECAR = "generation.json"


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a file: one a line (blank lines skipped), or JSONL objects whose ``field`` is the prompt
    (``.jsonl`` / ``.json`` files, e.g. GenEval metadata). Errors name the file and line: a bad line (not JSON, no
    prompt, a prompt that is not valid text) stops the whole run before any image is made, none is skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file does not exist: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e})") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{p}:{lineno}: not JSON ({type(e).__name__}: {e})") from None
            value = rec.get(field) if isinstance(rec, dict) else rec
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{p}:{lineno}: no non-empty string field {field!r}")
            prompts.append(check_text(value.strip(), f"{p}:{lineno}: prompt"))
        else:
            prompts.append(line.strip())  # strict UTF-8 decoding above: no lone surrogate here
    if not prompts:
        raise ValueError(f"no prompts in {p} (the file is empty or has only blank lines)")
    return prompts


def components(pipe: LightGenPipeline) -> dict[str, Any]:
    """What a sidecar records of the loaded pipeline: head steps, the weights (EMA or raw), the network's dtype,
    tokenizer and text encoder."""
    return {
        "head_steps": pipe.model.cfg.num_sampling_steps,
        "weights": pipe.weights,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "vae": pipe.vae.name,
        "text_encoder": pipe.text_encoder.name,
    }


def _sampling_kwargs(st: SamplingDefaults) -> dict[str, Any]:
    """The keyword arguments of ``pipe(...)`` / ``pipe.inpaint(...)`` that the sampling settings ``st`` give."""
    return {
        "num_inference_steps": st.steps,
        "guidance_scale": st.cfg,
        "guidance_schedule": st.cfg_schedule,
        "temperature": st.temperature,
    }


def timed_call(
    pipe: LightGenPipeline, prompts: list[str], st: SamplingDefaults, size: tuple[int, int], **kwargs: Any
) -> tuple[list[Image.Image], float]:
    """``pipe(prompts, ...)`` with the sampling settings ``st`` at ``size`` (H, W): its images and seconds."""
    t0 = time.perf_counter()
    res = pipe(prompts, **_sampling_kwargs(st), height=size[0], width=size[1], **kwargs)
    return res.images, time.perf_counter() - t0


def per_second(n: int, seconds: float) -> float | None:
    """Images per second, rounded (None when nothing was timed)."""
    return round(n / seconds, 3) if seconds > 0 else None


def run_generate(
    pipe: LightGenPipeline,
    prompts: list[str],
    out: str | Path,
    *,
    settings: SamplingDefaults | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<out>/<00000>.png`` (prompt order, ``images_per_prompt`` each) and ``<out>/generation.json``.

    Exactly ``pipe(prompts, num_images_per_prompt=images_per_prompt, batch_size=batch_size,
    generator=torch.Generator().manual_seed(seed), ...)``, one batch at a time. ``settings`` default to the model's
    recorded ones (``pipe.sampling_settings()``). Returns the sidecar's content.
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"need images_per_prompt >= 1 and batch_size >= 1, got {images_per_prompt}, {batch_size}")
    check_prompts(prompts)
    st = settings or pipe.sampling_settings()
    size = pipe.image_size(height, width, None)
    jobs = [(i, k, p) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    Path(out).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    entries, seconds = [], 0.0
    with tqdm(total=-(-len(jobs) // batch_size) * st.steps, unit="step", desc="generate", disable=not progress) as bar:
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b : b + batch_size]
            images, took = timed_call(
                pipe, [p for *_, p in chunk], st, size, generator=generator, callback=lambda *_: bar.update(1)
            )
            seconds += took
            for j, ((i, k, p), image) in enumerate(zip(chunk, images, strict=True)):
                image.save(Path(out) / f"{b + j:05d}.png")
                entries.append({"file": f"{b + j:05d}.png", "prompt": p, "prompt_index": i, "sample": k})
            bar.set_postfix(images=len(entries))
    run = {"seed": seed, **dataclasses.asdict(st), "height": size[0], "width": size[1]}
    run |= {"images_per_prompt": images_per_prompt, "batch_size": batch_size, "device": str(pipe.device)}
    sidecar = {
        **(record or {}),
        "settings": run | components(pipe),
        "images": entries,
        "seconds": round(seconds, 3),
        "images_per_second": per_second(len(entries), seconds),
    }
    (Path(out) / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return sidecar


def run_inpaint(
    pipe: LightGenPipeline,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    out: str | Path,
    *,
    settings: SamplingDefaults | None = None,
    seed: int = 0,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``pipe.inpaint(image, mask, prompt, generator=torch.Generator().manual_seed(seed), ...)`` to the PNG
    ``out`` and its settings to the ``.json`` beside it (``settings`` default to the model's recorded ones)."""
    st = settings or pipe.sampling_settings()
    res = pipe.inpaint(image, mask, prompt, **_sampling_kwargs(st), generator=torch.Generator().manual_seed(seed))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res.images[0].save(out, format="PNG")
    sidecar = {**(record or {}), "prompt": prompt, **dataclasses.asdict(st), "seed": seed, **components(pipe)}
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return sidecar
