"""`lightgen generate`: prompts -> PNGs + a JSON sidecar of the settings, through ``LightGenPipeline``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lightgen.api import LightGenPipeline

SIDECAR = "generation.json"


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a file: one a line (blank lines skipped), or JSONL objects whose ``field`` is the prompt
    (``.jsonl`` / ``.json`` files, e.g. GenEval metadata). Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file does not exist: {p}")
    prompts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not JSON ({e})") from None
            value = rec.get(field) if isinstance(rec, dict) else rec
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{p}:{lineno}: no non-empty string field {field!r}")
            prompts.append(value.strip())
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"no prompts in {p} (the file is empty or has only blank lines)")
    return prompts


def run_generate(
    pipe: LightGenPipeline,
    prompts: list[str],
    out: str | Path,
    *,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    cfg_schedule: str | None = None,
    temperature: float | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<out>/<00000>.png`` (prompt order, ``images_per_prompt`` each) and ``<out>/generation.json``.

    Exactly ``pipe(prompts, num_images_per_prompt=images_per_prompt, batch_size=batch_size,
    generator=torch.Generator().manual_seed(seed), ...)``, one batch at a time. Sampling settings left at None
    take the model's recorded defaults (``pipe.sampling_settings``). Returns the sidecar's content.
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"need images_per_prompt >= 1 and batch_size >= 1, got {images_per_prompt}, {batch_size}")
    st = pipe.sampling_settings(steps, cfg, cfg_schedule, temperature)
    h, w = pipe.image_size(height, width, None)
    jobs = [(i, k, p) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    n_batches = -(-len(jobs) // batch_size)
    entries, seconds = [], 0.0
    with tqdm(total=n_batches * st.steps, unit="step", desc="generate", disable=not progress) as bar:
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b : b + batch_size]
            t0 = time.perf_counter()
            res = pipe(
                [p for _, _, p in chunk], num_inference_steps=st.steps, guidance_scale=st.cfg,
                guidance_schedule=st.cfg_schedule, temperature=st.temperature, height=h, width=w, generator=generator,
                callback=lambda *_: bar.update(1),
            )  # fmt: skip
            seconds += time.perf_counter() - t0
            for j, ((i, k, p), image) in enumerate(zip(chunk, res.images, strict=True)):
                name = f"{b + j:05d}.png"
                image.save(out / name)
                entries.append({"file": name, "prompt": p, "prompt_index": i, "sample": k})
            bar.set_postfix(images=len(entries))
    settings = {
        "seed": seed, "steps": st.steps, "cfg": st.cfg, "cfg_schedule": st.cfg_schedule, "temperature": st.temperature,
        "head_steps": pipe.model.cfg.num_sampling_steps, "height": h, "width": w, "images_per_prompt": images_per_prompt, "batch_size": batch_size,
        "dtype": str(pipe.dtype).removeprefix("torch."), "device": str(pipe.device),
        "vae": pipe.vae.name, "text_encoder": pipe.text_encoder.name,
    }  # fmt: skip
    sidecar = {
        **(record or {}),
        "settings": settings,
        "images": entries,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(entries) / seconds, 3) if seconds > 0 else None,
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return sidecar
