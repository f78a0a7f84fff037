"""What a training run writes, read from the trainer's state: checkpoints, the exported model, sample grids and the
held-out score. `Trainer` (training/trainer.py) inherits these; `Trainer.build` sets the attributes declared here.

Under FSDP2 gathering weights is a collective: every rank calls these methods, the main process writes.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, save_pretrained

from . import checkpoint as ckpt_io
from . import dist as D
from .config import TrainConfig
from .data import Loader, ShardSet, TextPad, text_of
from .evaluate import HeldOutScore, Prompts, SampleGrid, load_decoder
from .metrics import MetricsLog, log
from .optim import EMA, LRSchedule


class TrainerOutputs:
    """Checkpoints, the exported model, sample grids and held-out scores of the weights being trained."""

    kind: str
    cfg: TrainConfig
    out: Path
    info: D.DistInfo
    mcfg: ModelConfig
    shards: ShardSet
    text_pad: TextPad
    model: LightGen  # the unwrapped model (sharded in place under FSDP2)
    wrapped: nn.Module  # what trains: the DDP wrapper, the FSDP2-sharded model, or the model itself
    fsdp: bool
    optimizer: torch.optim.Optimizer
    ema: EMA | None  # DDP: on the main process only
    schedule: LRSchedule
    loader: Loader
    metrics: MetricsLog
    grid: SampleGrid | None
    evaluator: HeldOutScore | None
    last_ckpt_step: int
    last_ckpt_time: float
    last_grid_step: int | None
    state: Any  # training.trainer.TrainState: step, elapsed_s, nonfinite, loader position, schedule length

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (train.precision bf16, or auto on CUDA), else nothing."""
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and self.info.device.type == "cuda"):
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build_generators(self) -> tuple[SampleGrid | None, HeldOutScore | None]:
        """The sample grid (log.sample_count > 0) and the held-out score (eval.every > 0), on the main process."""
        cfg, mcfg = self.cfg, self.mcfg
        if not self.info.is_main or not (cfg.log.sample_count > 0 or cfg.eval.every):
            return None, None
        res, spec = self.shards.resolutions[0], cfg.log.vae or mcfg.vae
        decoder, grid, evaluator = load_decoder(spec), None, None
        if cfg.log.sample_count > 0 and decoder is not None:
            rows, captions = text_of(self.shards, np.array(self.shards.first_rows(cfg.log.sample_count)))
            grid = SampleGrid(cfg.log, self.out, Prompts(captions, *self.text_pad(rows, captions)), res, decoder,
                              cfg.train.seed)  # fmt: skip
        if cfg.eval.every:
            if decoder is None:
                raise FileNotFoundError(f"eval.every is set, but image tokenizer {spec!r} cannot decode the samples")
            evaluator = HeldOutScore(cfg.eval, mcfg, res, decoder, self.out, str(self.info.device))
        return grid, evaluator

    def _full_states(self) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """(model state, the same with the EMA's parameters, or None) on the main process, (None, None) elsewhere."""
        state = ckpt_io.full_model_state(self.wrapped if self.fsdp else self.model, self.fsdp, self.info)
        ema = ckpt_io.with_ema(state, self.ema) if (self.ema is not None and state is not None) else None
        return (state, ema) if self.info.is_main else (None, None)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint's state.json carries besides the step: loader position, training time, counters,
        the schedule length, the resolved config."""
        s = self.state
        return {"loader": self.loader.state(), "elapsed_s": s.elapsed_s, "nonfinite": s.nonfinite, "kind": self.kind,
                "schedule_total": self.schedule.total, "config": self.cfg.to_dict()}  # fmt: skip

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """`checkpoints/step-N`: weights, EMA, optimizer and `state` (counters, loader position, ...). metrics.jsonl
        is flushed to disk first, so a resumed run finds every row up to the step it resumes from."""
        self.metrics.flush()
        weights, ema = self._full_states()
        opt = ckpt_io.full_optimizer_state(self.wrapped, self.optimizer, self.fsdp, self.info)
        if self.info.is_main:
            d = ckpt_io.save(self.out / "checkpoints", step, model=ckpt_io.holding(self.mcfg, weights), ema_state=ema,
                             optimizer_state=opt, state=state, keep_last=self.cfg.checkpoint.keep_last)  # fmt: skip
            log(f"checkpoint: {d}", self.info)
        self.last_ckpt_step, self.last_ckpt_time = step, time.time()
        D.barrier(self.info)

    def export(self) -> None:
        """`<out_dir>/model`: the final weights in `from_pretrained` layout (EMA preferred on load)."""
        weights, ema = self._full_states()
        if self.info.is_main:
            d = save_pretrained(ckpt_io.holding(self.mcfg, weights), self.out / "model", ema)
            log(f"model: {d}", self.info)
        D.barrier(self.info)

    def inference_net(self) -> LightGen | None:
        """An eval-mode copy of the weights being trained (the EMA when on) on the main process, None elsewhere."""
        if self.ema is not None:
            weights = self.ema.full()
        else:
            weights = ckpt_io.full_model_state(self.wrapped if self.fsdp else self.model, self.fsdp, self.info)
        if not self.info.is_main:
            return None
        net = LightGen(self.mcfg)  # buffers (and anything the EMA does not cover) as a fresh model has them
        net.load_state_dict(weights, strict=self.ema is None)
        return net.to(self.info.device).eval()

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The held-out ShapesWorld score of the current weights (main process; None elsewhere); its samples go to
        `eval/step-N.png` and TensorBoard."""
        net, scores = self.inference_net(), None
        if net is not None and self.evaluator is not None:
            scores = self.evaluator(net, step, self.autocast)
            self.metrics.image("eval", self.evaluator.grid_path(step), step)
        D.barrier(self.info)
        return scores

    def sample_grid(self, step: int) -> None:
        """`samples/step-N.png` of the fixed captions, also to TensorBoard (when grids are on)."""
        self.last_grid_step = step
        if self.cfg.log.sample_count <= 0:
            return
        net = self.inference_net()
        if net is not None and self.grid is not None:
            self.metrics.image("samples", self.grid(net, step, self.autocast), step)
        D.barrier(self.info)
