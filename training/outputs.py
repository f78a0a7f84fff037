"""What a training run writes besides its metrics: checkpoints, the exported model, sample grids and the held-out
score, from the weights being trained (`Weights`).

Under FSDP2 gathering weights is a collective: every rank calls these methods, the main process writes.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, save_pretrained

from . import checkpoint as ckpt_io
from . import dist as D
from .config import TrainConfig
from .data import ShardSet, TextPad, text_of
from .evaluate import HeldOutScore, Prompts, SampleGrid, load_decoder
from .metrics import MetricsLog, log
from .optim import EMA


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (train.precision bf16, or auto on CUDA), else nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Weights:
    """The weights being trained: the model (sharded in place under FSDP2), what trains (the DDP wrapper, the
    FSDP2-sharded model, or the model itself), AdamW and the EMA (DDP: on the main process only)."""

    mcfg: ModelConfig
    model: LightGen
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    fsdp: bool
    info: D.DistInfo

    @property
    def tracked(self) -> nn.Module:
        """What the EMA follows and checkpoints gather: the sharded model under FSDP2, else the model."""
        return self.wrapped if self.fsdp else self.model

    def step(self) -> None:
        """AdamW's step, gradients cleared, the EMA updated."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.tracked)

    def full_states(self) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """(model state, the same with the EMA's parameters, or None) on the main process, (None, None) elsewhere."""
        state = ckpt_io.full_model_state(self.tracked, self.fsdp, self.info)
        ema = ckpt_io.with_ema(state, self.ema) if (self.ema is not None and state is not None) else None
        return (state, ema) if self.info.is_main else (None, None)

    def full_optimizer_state(self) -> dict | None:
        """AdamW's full state dict on the main process (a collective under FSDP2)."""
        return ckpt_io.full_optimizer_state(self.wrapped, self.optimizer, self.fsdp, self.info)

    def inference_net(self) -> LightGen | None:
        """An eval-mode copy of the weights being trained (the EMA when on) on the main process, None elsewhere."""
        if self.ema is not None:
            weights = self.ema.full()
        else:
            weights = ckpt_io.full_model_state(self.tracked, self.fsdp, self.info)
        if not self.info.is_main:
            return None
        net = LightGen(self.mcfg)  # buffers (and anything the EMA does not cover) as a fresh model has them
        net.load_state_dict(weights, strict=self.ema is None)
        return net.to(self.info.device).eval()


def build_generators(
    cfg: TrainConfig, mcfg: ModelConfig, shards: ShardSet, text_pad: TextPad, info: D.DistInfo
) -> tuple[SampleGrid | None, HeldOutScore | None]:
    """The sample grid (log.sample_count > 0) and the held-out score (eval.every > 0), on the main process."""
    if not info.is_main or not (cfg.log.sample_count > 0 or cfg.eval.every):
        return None, None
    out, res, spec = Path(cfg.train.out_dir), shards.resolutions[0], cfg.log.vae or mcfg.vae
    decoder, grid, evaluator = load_decoder(spec), None, None
    if cfg.log.sample_count > 0 and decoder is not None:
        rows, captions = text_of(shards, np.array(shards.first_rows(cfg.log.sample_count)))
        prompts = Prompts(captions, *text_pad(rows, captions))
        grid = SampleGrid(cfg.log, out, prompts, res, decoder, cfg.train.seed)
    if cfg.eval.every:
        if decoder is None:
            raise FileNotFoundError(f"eval.every is set, but image tokenizer {spec!r} cannot decode the samples")
        evaluator = HeldOutScore(cfg.eval, mcfg, res, decoder, out, str(info.device))
    return grid, evaluator


class Outputs:
    """Checkpoints, the exported model, sample grids and held-out scores of the weights being trained."""

    def __init__(self, cfg: TrainConfig, weights: Weights, metrics: MetricsLog, shards: ShardSet, text_pad: TextPad):
        self.cfg, self.weights, self.metrics, self.info = cfg, weights, metrics, weights.info
        self.out = Path(cfg.train.out_dir)
        self.autocast = functools.partial(autocast, cfg.train.precision, self.info.device)
        self.grid, self.evaluator = build_generators(cfg, weights.mcfg, shards, text_pad, self.info)

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """`checkpoints/step-N`: weights, EMA, optimizer and `state` (state.json's body). metrics.jsonl is flushed to
        disk first, so a resumed run finds every row up to the step it resumes from."""
        self.metrics.flush()
        weights, ema = self.weights.full_states()
        opt = self.weights.full_optimizer_state()
        if self.info.is_main:
            model = ckpt_io.holding(self.weights.mcfg, weights)
            d = ckpt_io.save(
                self.out / "checkpoints",
                step,
                model=model,
                ema_state=ema,
                optimizer_state=opt,
                state=state,
                keep_last=self.cfg.checkpoint.keep_last,
            )
            log(f"checkpoint: {d}", self.info)
        D.barrier(self.info)

    def export(self) -> None:
        """`<out_dir>/model`: the final weights in `from_pretrained` layout (EMA preferred on load)."""
        weights, ema = self.weights.full_states()
        if self.info.is_main:
            d = save_pretrained(ckpt_io.holding(self.weights.mcfg, weights), self.out / "model", ema)
            log(f"model: {d}", self.info)
        D.barrier(self.info)

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The held-out ShapesWorld score of the current weights (main process; None elsewhere); its samples go to
        `eval/step-N.png` and TensorBoard."""
        net, scores = self.weights.inference_net(), None
        if net is not None and self.evaluator is not None:
            scores = self.evaluator(net, step, self.autocast)
            self.metrics.image("eval", self.evaluator.grid_path(step), step)
        D.barrier(self.info)
        return scores

    def sample_grid(self, step: int) -> None:
        """`samples/step-N.png` of the fixed captions, also to TensorBoard (when grids are on)."""
        if self.cfg.log.sample_count <= 0:
            return
        net = self.weights.inference_net()
        if net is not None and self.grid is not None:
            self.metrics.image("samples", self.grid(net, step, self.autocast), step)
        D.barrier(self.info)
