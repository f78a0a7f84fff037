"""`lightgen geneval`: samples for every line of a GenEval metadata file, in GenEval's folder layout.

    <out>/<00000>/metadata.jsonl      the metadata line, byte for byte
    <out>/<00000>/samples/<0000>.png  `samples` images
    <out>/geneval_settings.json       the settings (GenEval's scripts read only the digit-named folders)

Prompts are generated in groups of ``batch_size // samples`` (at least one), each group with its own generator
seeded from ``--seed`` and the group's first line, so a rerun (after a kill) skips finished prompt folders and
redraws the rest exactly. Files are written under temporary names and renamed; metadata.jsonl comes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from lightgen.api import LightGenPipeline
from lightgen.generate import components, per_second, timed_call
from lightgen_model import SamplingDefaults, check_text

SETTINGS = "geneval_settings.json"


def read_metadata(path: str | Path, field: str = "prompt") -> list[tuple[bytes, str]]:
    """(raw line bytes, prompt) per non-blank line of a GenEval-style metadata JSONL file; a bad line (not JSON, no
    prompt, a prompt that is not valid text) is an error naming the file and line, before any image is made."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metadata file does not exist: {p}")
    out = []
    for lineno, raw in enumerate(p.read_bytes().splitlines(keepends=True), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{p}:{lineno}: not a JSON line ({e})") from None
        prompt = rec.get(field) if isinstance(rec, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{p}:{lineno}: no non-empty string field {field!r}")
        out.append((raw, check_text(prompt, f"{p}:{lineno}: field {field!r}")))
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


def _write_prompt(folder: Path, line: bytes, images: list[Image.Image]) -> None:
    """One prompt's folder: the samples, then its metadata line (last: it marks the folder finished)."""
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for s, image in enumerate(images):
        _atomic_write(folder / "samples" / f"{s:04d}.png", lambda t, im=image: im.save(t, "PNG"))
    _atomic_write(folder / "metadata.jsonl", lambda t: t.write_bytes(line))


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


def _generate_groups(
    pipe: LightGenPipeline,
    lines: list[tuple[bytes, str]],
    folders: list[Path],
    todo: list[int],
    st: SamplingDefaults,
    size: tuple[int, int],
    samples: int,
    batch_size: int,
    seed: int,
    done: Callable[[int], Any],
) -> float:
    """Generate every group of ``batch_size // samples`` prompts that holds a line of ``todo`` and write the folders
    of those lines (``done(1)`` after each); returns the seconds spent generating."""
    per_group = max(1, batch_size // samples)
    pending, seconds = set(todo), 0.0
    for first in sorted({i - i % per_group for i in todo}):
        idx = range(first, min(first + per_group, len(lines)))
        generator = torch.Generator().manual_seed(group_seed(seed, first))
        prompts = [lines[i][1] for i in idx]
        images, took = timed_call(
            pipe, prompts, st, size, num_images_per_prompt=samples, batch_size=batch_size, generator=generator
        )
        seconds += took
        for j, i in enumerate(idx):
            if i in pending:  # a folder finished in an earlier run is never touched again
                _write_prompt(folders[i], lines[i][0], images[j * samples : (j + 1) * samples])
                done(1)
    return seconds


def run_geneval(
    pipe: LightGenPipeline,
    metadata: str | Path,
    out: str | Path,
    *,
    settings: SamplingDefaults | None = None,
    seed: int = 0,
    samples: int = 4,
    resolution: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    field: str = "prompt",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fill ``out`` in GenEval's layout for the first ``limit`` lines of ``metadata``; returns counts and timing.

    A group of prompts is ``pipe(prompts, num_images_per_prompt=samples, batch_size=batch_size,
    generator=torch.Generator().manual_seed(group_seed(seed, first)), ...)``. ``settings`` default to the model's
    recorded ones (``pipe.sampling_settings()``).
    """
    if samples < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"need samples, batch_size and limit >= 1, got {samples}, {batch_size}, {limit}")
    st = settings or pipe.sampling_settings()
    lines = read_metadata(metadata, field)[:limit]
    size = pipe.image_size(None, None, resolution)
    out = Path(out)
    record = {k: v for k, v in components(pipe).items() if k != "head_steps"}  # head steps: in model_config
    record |= {"model_config": pipe.model.cfg.to_dict(), "samples": samples, **dataclasses.asdict(st)}
    record |= {"height": size[0], "width": size[1], "seed": seed, "batch_size": batch_size, "field": field}
    _check_settings(out, record, overwrite)
    folders = [out / f"{i:05d}" for i in range(len(lines))]
    todo = [i for i in range(len(lines)) if not _finished(folders[i], lines[i][0], samples)]
    with tqdm(total=len(todo), unit="prompt", desc="geneval", disable=not progress) as bar:
        seconds = _generate_groups(pipe, lines, folders, todo, st, size, samples, batch_size, seed, bar.update)
    return {
        "prompts": len(lines),
        "skipped": len(lines) - len(todo),
        "generated": len(todo),
        "images": len(todo) * samples,
        "seconds": round(seconds, 3),
        "images_per_second": per_second(len(todo) * samples, seconds),
    }
