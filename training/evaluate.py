"""What the trainer generates with the model it trains: a grid of fixed captions, and the held-out ShapesWorld score.

Both take an eval-mode copy of the weights (the EMA when on, see `Trainer.inference_net`) and run on the main
process only. The held-out score is the learnability measure of BENCHMARKS.md: ShapesWorld scenes drawn as
`recipes/shapes` (the demo) draws its held-out set (`generate_prompts(n, seed=999001)`, the canonical GenEval prompt as
text), one sample per prompt and seed, judged by `shapesworld.score_image`, summarised GenEval's way (accuracy per
category, overall = their mean).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightgen_model import LightGen, ModelConfig, SamplingDefaults, pad_text
from lightgen_model.sampling import generate

from .config import EvalSection, LogSection

Autocast = Callable[[], contextlib.AbstractContextManager]


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    """(N, H, W, 3) uint8 -> one PNG grid with a 2-px white gutter."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) images in [-1, 1] -> (B, H, W, 3) uint8 (clamped, rounded), as `lightgen.api.to_pil`."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Prompts:
    """Captions with their padded text states (N, Lt, D) and mask (N, Lt), as `lightgen_model.pad_text` gives."""

    captions: list[str]
    text: Tensor
    mask: Tensor


@torch.no_grad()
def sample_images(
    net: LightGen,
    decoder: Any,
    prompts: Prompts,
    *,
    resolution: int,
    settings: SamplingDefaults,
    generator: torch.Generator,
    autocast: Autocast,
) -> np.ndarray:
    """(N, H, W, 3) uint8 images of the prompts in one batch, drawn from `generator`, decoded in float32 and
    rounded to 8 bits as `lightgen.api.LightGenPipeline` does."""
    s, dev = settings, next(net.parameters()).device
    with autocast():
        lat = generate(net, prompts.text.to(dev), prompts.mask.to(dev), resolution, **s.keywords(), generator=generator)
    return to_uint8(decoder.decode(lat.float()))


def load_decoder(spec: str) -> Any | None:
    """The image tokenizer `spec` (to decode latents), or None with a note when it cannot be loaded."""
    try:
        from lightgen_model.encoders import build_image_tokenizer

        return build_image_tokenizer(spec)
    except Exception as e:  # grids are a convenience; a missing VAE must not stop training
        print(f"note: sample grids disabled: cannot load image tokenizer {spec!r} ({e})", flush=True)
        return None


class SampleGrid:
    """`samples/step-N.png` (+ `.json` with the captions): the first `log.sample_count` captions of the data."""

    def __init__(self, cfg: LogSection, out: Path, prompts: Prompts, resolution: int, decoder: Any, seed: int) -> None:
        self.out, self.prompts, self.resolution, self.decoder, self.seed = out, prompts, resolution, decoder, seed
        self.cfg = cfg

    def __call__(self, net: LightGen, step: int, autocast: Autocast) -> Path:
        """Sample the grid with `net` in one batch (generator seeded with `train.seed`); the PNG's path."""
        c = self.cfg
        settings = net.cfg.sampling_defaults().replace(**c.sampling())
        imgs = sample_images(
            net,
            self.decoder,
            self.prompts,
            resolution=self.resolution,
            settings=settings,
            generator=torch.Generator().manual_seed(self.seed),
            autocast=autocast,
        )
        path = self.out / "samples" / f"step-{step:08d}.png"
        save_grid(imgs, path)
        path.with_suffix(".json").write_text(json.dumps({"step": step, "captions": self.prompts.captions}, indent=1))
        return path


def heldout_prompts(cfg: EvalSection) -> list[dict[str, Any]]:
    """The held-out ShapesWorld records (GenEval metadata; the text is each record's canonical `prompt`)."""
    from shapesworld import generate_prompts

    return generate_prompts(cfg.prompts, seed=cfg.prompt_seed)


class HeldOutScore:
    """The held-out ShapesWorld score of a model: {"overall", <category>: accuracy, "images", "seconds"}.

    The prompts are encoded once here (text encoder `eval.text_encoder`, default the model's), in batches of
    `eval.batch_size` padded as `LightGenPipeline` pads a batch; each call samples every prompt once per seed of
    `eval.seeds` (one generator per seed through all batches, as `LightGenPipeline(prompts, batch_size=...,
    generator=...)`), scores the images against the prompts' metadata and saves the first seed's images as
    `<out>/eval/step-N.png`."""

    def __init__(self, cfg: EvalSection, mcfg: ModelConfig, resolution: int, decoder: Any, out: Path, device: str):
        from lightgen_model.encoders import build_text_encoder

        self.cfg, self.resolution, self.decoder, self.out = cfg, resolution, decoder, out
        self.records = heldout_prompts(cfg)
        encoder = build_text_encoder(cfg.text_encoder or mcfg.text_encoder, device=device, max_len=mcfg.max_text_len)
        captions, b = [r["prompt"] for r in self.records], cfg.batch_size
        self.batches = [
            Prompts(c, *pad_text(captions=c, cfg=mcfg, encoder=encoder))
            for c in (captions[i : i + b] for i in range(0, len(captions), b))
        ]

    def images(self, net: LightGen, seed: int, autocast: Autocast) -> np.ndarray:
        """(prompts, H, W, 3) uint8: one sample of every held-out prompt, drawn from a generator seeded `seed`."""
        c, g = self.cfg, torch.Generator().manual_seed(seed)
        settings = net.cfg.sampling_defaults().replace(**c.sampling())
        return np.concatenate(
            [
                sample_images(
                    net, self.decoder, p, resolution=self.resolution, settings=settings, generator=g, autocast=autocast
                )
                for p in self.batches
            ]
        )

    def grid_path(self, step: int) -> Path:
        """Where the samples of step `step` are saved."""
        return self.out / "eval" / f"step-{step:08d}.png"

    def __call__(self, net: LightGen, step: int, autocast: Autocast) -> dict[str, float]:
        """Sample, save, score: overall and per-category accuracy (4 decimals), images scored, seconds taken."""
        from shapesworld.score import score_image, summarize

        t0, results = time.time(), []
        for k, seed in enumerate(self.cfg.seeds):
            images = self.images(net, seed, autocast)
            if k == 0:
                save_grid(images, self.grid_path(step))
            for rec, img in zip(self.records, images, strict=True):
                results.append({"metadata": rec, "tag": rec["tag"], "correct": score_image(img, rec).correct})
        summary = summarize(results)
        scores = {"overall": summary["overall"]} | {t: v["accuracy"] for t, v in summary["tasks"].items()}
        rounded = {k: round(float(v), 4) for k, v in scores.items()}
        return rounded | {"images": len(results), "seconds": round(time.time() - t0, 2)}
