"""`lightgen geneval`: samples for every line of a GenEval metadata file, in GenEval's folder layout.

    <out>/<00000>/metadata.jsonl      the metadata line, byte for byte
    <out>/<00000>/samples/<0000>.png  `samples` images
    <out>/geneval_settings.json       the settings (GenEval's scripts read only the digit-named folders)

Prompts are generated in groups of ``batch_size // samples`` (at least one), each group with its own generator
seeded from ``--seed`` and the group's first line, so a rerun (after a kill) skips finished prompt folders and
redraws the rest exactly. Files are written under temporary names and renamed; metadata.jsonl comes last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lightgen.api import LightGenPipeline

SETTINGS = "geneval_settings.json"


def read_metadata(path: str | Path, field: str = "prompt") -> list[tuple[bytes, str]]:
    """(raw line bytes, prompt) per non-blank line of a GenEval-style metadata JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metadata file does not exist: {p}")
    out = []
    for lineno, raw in enumerate(p.read_bytes().splitlines(keepends=True), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}:{lineno}: not a JSON line ({e})") from None
        prompt = rec.get(field) if isinstance(rec, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{p}:{lineno}: no non-empty string field {field!r}")
        out.append((raw, prompt))
    if not out:
        raise ValueError(f"no metadata lines in {p}")
    return out


def group_seed(seed: int, first: int) -> int:
    """The generator seed of the prompt group starting at line ``first`` (a hash: groups are independent)."""
    digest = hashlib.sha256(f"lightgen-geneval:{seed}:{first}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # GenEval's readers take only <digits>.png and metadata.jsonl
    write(tmp)
    os.replace(tmp, path)


def _finished(folder: Path, line: bytes, samples: int) -> bool:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return False
    if meta.read_bytes() != line:
        raise ValueError(f"{meta} holds a different metadata line; use another --out or --overwrite")
    return all((folder / "samples" / f"{s:04d}.png").is_file() for s in range(samples))


def _check_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path = out / SETTINGS
    if overwrite:
        for d in out.iterdir() if out.is_dir() else []:
            if d.is_dir() and d.name.isdigit():
                shutil.rmtree(d)
    elif path.is_file():
        old = json.loads(path.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{out} was written with other settings {changed} (old, new); use --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def run_geneval(
    pipe: LightGenPipeline,
    metadata: str | Path,
    out: str | Path,
    *,
    samples: int = 4,
    steps: int | None = None,
    cfg: float | None = None,
    cfg_schedule: str | None = None,
    temperature: float | None = None,
    resolution: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    field: str = "prompt",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fill ``out`` in GenEval's layout for the first ``limit`` lines of ``metadata``; returns counts and timing.

    A group of prompts is ``pipe(prompts, num_images_per_prompt=samples, batch_size=batch_size,
    generator=torch.Generator().manual_seed(group_seed(seed, first)), ...)``. Sampling settings left at None take
    the model's recorded defaults (``pipe.sampling_settings``).
    """
    if samples < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"need samples, batch_size and limit >= 1, got {samples}, {batch_size}, {limit}")
    st = pipe.sampling_settings(steps, cfg, cfg_schedule, temperature)
    lines = read_metadata(metadata, field)[:limit]
    h, w = pipe.image_size(None, None, resolution)
    out = Path(out)
    settings = {
        "model_config": pipe.model.cfg.to_dict(), "vae": pipe.vae.name, "text_encoder": pipe.text_encoder.name,
        "dtype": str(pipe.dtype).removeprefix("torch."), "samples": samples, "steps": st.steps, "cfg": st.cfg,
        "cfg_schedule": st.cfg_schedule, "temperature": st.temperature, "height": h, "width": w, "seed": seed,
        "batch_size": batch_size, "field": field,
    }  # fmt: skip
    _check_settings(out, settings, overwrite)
    per_group = max(1, batch_size // samples)
    folders = [out / f"{i:05d}" for i in range(len(lines))]
    todo = [i for i in range(len(lines)) if not _finished(folders[i], lines[i][0], samples)]
    pending = set(todo)
    groups = sorted({i - i % per_group for i in todo})
    written, seconds = 0, 0.0
    with tqdm(total=len(todo), unit="prompt", desc="geneval", disable=not progress) as bar:
        for first in groups:
            idx = range(first, min(first + per_group, len(lines)))
            t0 = time.perf_counter()
            res = pipe(
                [lines[i][1] for i in idx], num_inference_steps=st.steps, guidance_scale=st.cfg,
                guidance_schedule=st.cfg_schedule, temperature=st.temperature, height=h, width=w,
                num_images_per_prompt=samples, batch_size=batch_size,
                generator=torch.Generator().manual_seed(group_seed(seed, first)),
            )  # fmt: skip
            seconds += time.perf_counter() - t0
            for j, i in enumerate(idx):
                if i not in pending:
                    continue  # finished in an earlier run: never touched again
                (folders[i] / "samples").mkdir(parents=True, exist_ok=True)
                for s in range(samples):
                    image = res.images[j * samples + s]
                    _atomic_write(folders[i] / "samples" / f"{s:04d}.png", lambda t, im=image: im.save(t, "PNG"))
                    written += 1
                _atomic_write(folders[i] / "metadata.jsonl", lambda t, i=i: t.write_bytes(lines[i][0]))
                bar.update(1)
    return {
        "prompts": len(lines),
        "skipped": len(lines) - len(todo),
        "generated": len(todo),
        "images": written,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 3) if seconds > 0 else None,
    }
