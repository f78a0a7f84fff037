"""Teachers: captions (+ metadata) and per-image seeds -> images. Loaded once per worker by the `synthesize` stage.

- `flux`: a diffusers `FluxPipeline` from a local directory (bf16 on a GPU, float32 on a CPU by default).
- `diffusers`: any local diffusers text-to-image pipeline directory, through `AutoPipelineForText2Image`.
- `shapes`: the ShapesWorld renderer; it draws the caption's GenEval metadata, not its text.
Every teacher returns (B, H, W, 3) uint8 images and one NSFW flag per image (False where it cannot tell).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TEACHERS = ("flux", "diffusers", "shapes")


class Teacher(Protocol):
    """What `synthesize` calls: captions, their metadata and one seed each -> images and NSFW flags."""

    name: str

    def __call__(
        self, captions: list[str], metadata: list[str | None], seeds: list[int]
    ) -> tuple[np.ndarray, list[bool]]: ...


class ShapesTeacherModel:
    """The ShapesWorld teacher: renders each caption's metadata with its seed (the caption text is not read)."""

    needs_metadata = True

    def __init__(self, resolution: int = 64, **_: Any) -> None:
        from shapesworld.render import ShapesTeacher

        self.teacher = ShapesTeacher(resolution)
        self.name = "shapes"

    def __call__(
        self, captions: list[str], metadata: list[str | None], seeds: list[int]
    ) -> tuple[np.ndarray, list[bool]]:
        """(B, R, R, 3) uint8 renders and all-False NSFW flags."""
        metas = [json.loads(m) for m in metadata]
        return self.teacher.batch(metas, seeds), [False] * len(captions)


class DiffusersTeacher:
    """A local diffusers text-to-image pipeline directory (`AutoPipelineForText2Image`), batched, seeded per image."""

    needs_metadata = False

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        steps: int = 28,
        guidance: float = 3.5,
        resolution: int = 512,
        max_sequence_length: int = 512,
    ) -> None:
        from lightgen_model.encoders import resolve_device, resolve_dtype

        if not Path(model).is_dir() or not (Path(model) / "model_index.json").is_file():
            raise ValueError(f"--model {model!r} is not a local diffusers pipeline directory (no model_index.json)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipe = self._load(model).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.resolution = steps, guidance, resolution
        accepted = inspect.signature(self.pipe.__call__).parameters
        # T5-based pipelines (Flux, SD3) take a text length; others would reject the keyword.
        self.extra = {"max_sequence_length": max_sequence_length} if "max_sequence_length" in accepted else {}
        self.name = Path(model).resolve().name

    def _load(self, model: str) -> Any:
        """The pipeline object (subclasses pick a specific class)."""
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(model, dtype=self.dtype)

    def __call__(
        self, captions: list[str], metadata: list[str | None], seeds: list[int]
    ) -> tuple[np.ndarray, list[bool]]:
        """(B, R, R, 3) uint8 images and the pipeline's NSFW flags (False where it has no safety checker)."""
        import torch

        # One CPU generator per image: its noise depends on its own seed only, whatever the batch it lands in.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(captions),
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=generators,
                output_type="np",
                **self.extra,
            )
        images = np.clip(np.rint(np.asarray(out.images, np.float32) * 255.0), 0, 255).astype(np.uint8)  # (B,H,W,3)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(captions)
        return images, [bool(f) for f in flags]


class FluxTeacher(DiffusersTeacher):
    """Flux (`FluxPipeline`) from a local directory: bf16 on a GPU, one pipeline per worker/GPU."""

    def _load(self, model: str) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline.from_pretrained(model, dtype=self.dtype)


def build_teacher(teacher: str, **kwargs: Any) -> Teacher:
    """`flux` / `diffusers` / `shapes` -> a loaded teacher; `ValueError` for other names."""
    if teacher == "shapes":
        return ShapesTeacherModel(resolution=kwargs["resolution"])
    if teacher == "flux":
        return FluxTeacher(**kwargs)
    if teacher == "diffusers":
        return DiffusersTeacher(**kwargs)
    raise ValueError(f"unknown --teacher {teacher!r}: expected one of {TEACHERS}")


def is_blank(image: np.ndarray, min_std: float = 2.0) -> bool:
    """True for a (near-)constant image: pixel standard deviation below `min_std` (of 255)."""
    return float(image.astype(np.float32).std()) < min_std
