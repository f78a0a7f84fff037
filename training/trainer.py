"""The training loop shared by `pretrain.py` and `dpo.py`, in torchtitan's shape.

`Trainer.run()` = `build()` then `train()`. `build()` sets up everything a run holds, as attributes of the trainer
declared where they are set: process, the output directory's lock (training/rundir.py), resume point, model config,
data, the weights being trained (`Weights`: model, DDP / FSDP2 wrapper, AdamW, EMA), the loader, the lr schedule,
metrics and the writers of checkpoints, grids and held-out scores (`Outputs`, training/outputs.py). `train()` is a
short loop: `train_step()` (grad_accum x `forward_backward_step()`, clipping, the non-finite check, the optimizer
and EMA step), the joint stop decision (time budget, SIGTERM/SIGINT; the ranks agree on the training time),
`after_step()` (metrics row and reports, evaluation, grids, periodic checkpoints); `finish()` writes the last
checkpoint, grid and the exported model.

What a checkpoint resumes besides tensors is `Trainer.state_dict()`: the counters (`TrainState`) and the loader's
position, each owned by its component (`state_dict()` / `load_state_dict()`).

A task subclasses the trainer and supplies its data (`shard_set`, `collate`) and its loss (`loss`; DPO overrides
it, the step around it stays).

Randomness is positional: step s of rank r seeds torch with (seed, r, s) and the data loader seeds batch k of epoch
e with (seed, e, r, k), so a resumed run repeats the uninterrupted one exactly (bit-exact on a CPU) without
carrying generator states.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, load_config, pad_text, preset

from . import checkpoint as ckpt_io
from . import dist as D
from . import rundir
from .config import TrainConfig
from .data import Collate, Loader, ShardSet, TextPad, check_shards, reference_text_pad, seed_of, to_device
from .metrics import MetricsLog, count_flops, log
from .optim import EMA, LRSchedule, build_optimizer, clip_grad, peak_lr
from .outputs import Outputs, Weights, autocast
from .sources import ShardCache, byte_count, describe, local_model_dir
from .state import TrainState


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row (the entry points report it as an
    `error:` line with exit code 2)."""


@dataclass
class StepResult:
    """One optimizer step as logged: loss (mean over ranks and micro-batches), lr, gradient norm, task metrics."""

    loss: float
    lr: float
    grad_norm: float
    skipped: bool
    extra: dict[str, float]


class Trainer:
    """Subclasses set `kind` and implement `shard_set`, `collate` and `loss`. Its state is `state_dict()`: the
    counters (`TrainState`) and the loader's position, each owned by its component."""

    kind = "pretrain"
    init_prefers_ema = False  # start from the EMA weights of `model.init_from` (DPO) or the raw ones
    find_unused_parameters: bool | None = None  # DDP: None = only when the encoder can be skipped

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.train.out_dir)
        self.info = D.DistInfo()  # this process's place, set by `run`
        self.text_pad: TextPad = pad_text  # bound to the model in `build` (see `text_padding`)
        self.state = TrainState()
        self.stopped_by: str | None = None
        self.consecutive_bad = 0  # non-finite steps in a row
        self.lock: rundir.OutDirLock | None = None  # on the main process, from `build` to the end of `run`
        self._init_dir: str | None = None  # model.init_from as a local folder (a copy when it is a URI)

    # -- task hooks --------------------------------------------------------------------------------
    def shard_set(self, mcfg: ModelConfig) -> ShardSet:
        """The training shards (validated against the model's tokenizer and text encoder)."""
        raise NotImplementedError

    def collate(self) -> Collate:
        """(shards, refs, generator) -> a batch dictionary."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss to minimise, extra per-step metrics as 0-d tensors)."""
        raise NotImplementedError

    def check_config(self) -> None:
        """Raise ValueError naming a missing or bad setting before any work starts."""
        if not self.cfg.data.shards:
            raise ValueError("data.shards is empty: name encode-latents output directories (data.shards=[DIR])")

    def setup_task(self, model: LightGen, info: D.DistInfo) -> None:
        """Called once the model is built and initialised, before wrapping (DPO builds its reference here)."""

    # -- what to start from ------------------------------------------------------------------------
    def init_dir(self) -> str | None:
        """`model.init_from` as a local folder: itself, or for a URI its config and weights copied once into the
        node's model cache (`$LIGHTGEN_CACHE`, default ~/.cache/lightgen/models)."""
        if self.cfg.model.init_from and self._init_dir is None:
            self._init_dir = local_model_dir(self.cfg.model.init_from)
        return self._init_dir

    def model_config(self, resume: Path | None) -> ModelConfig:
        """The checkpoint's config when resuming, else `model.init_from`'s or the preset's, with overrides."""
        m = self.cfg.model
        if resume is not None:
            return load_config(resume)
        if m.init_from:
            return load_config(self.init_dir()).replace(**m.overrides)
        return preset(m.preset, **m.overrides)

    def initial_weights(self) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """(weights, EMA weights) of `model.init_from`, or (None, None)."""
        if not self.cfg.model.init_from:
            return None, None
        return ckpt_io.initial_weights(self.init_dir(), self.init_prefers_ema)

    def shard_cache(self) -> ShardCache | None:
        """The local cache of shard files (`data.cache_dir`, capped at `data.cache_bytes`), or None."""
        d = self.cfg.data
        return ShardCache(d.cache_dir, byte_count(d.cache_bytes, "data.cache_bytes")) if d.cache_dir else None

    def text_padding(self, mcfg: ModelConfig, shards: ShardSet, info: D.DistInfo) -> TextPad:
        """``lightgen_model.pad_text`` bound to the model, so training pads text as generation does.

        Key-masked models: the shards' rows zero-padded to the batch's longest. ``text_key_mask=False`` models
        (converted reference checkpoints): the captions re-encoded and padded to ``max_text_len`` as the
        reference did, by ``data.text_encoder`` (default the model config's; see ``reference_text_pad``)."""
        if mcfg.text_key_mask:
            return pad_text
        spec = self.cfg.data.text_encoder or mcfg.text_encoder
        pad, name = reference_text_pad(spec, mcfg, shards, str(info.device))
        log(f"text: padded to {mcfg.max_text_len} tokens with {name}'s own states (reference padding)", info)
        return pad

    # -- build -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Join the process group, build, train; the run's summary."""
        info = D.init(self.cfg.train.device)
        try:
            with D.peer_failures(info):  # a rank whose peer died: one error line, not a traceback
                self.build(info)
                return self.train()
        finally:
            if self.lock is not None:
                self.lock.release()
            D.shutdown()

    def build(self, info: D.DistInfo) -> None:
        """Everything before the first step, in order."""
        cfg, self.info = self.cfg, info
        # 1. the process: threads, deterministic kernels, TF32
        D.configure(info, cfg.train.deterministic, cfg.train.threads)
        # 2. out_dir locked for this run (one trainer per directory), a killed run's leftovers removed
        self.lock = rundir.claim(self.out, info)
        # 3. where to start: a checkpoint to resume (checkpoint.resume) or a fresh / finetune start
        self.resumed_from: Path | None = self._find_resume()
        self.mcfg: ModelConfig = self.model_config(self.resumed_from)
        # 4. the data, checked against the model (sha256 checked as each shard is read); text padded as generation
        self.shards: ShardSet = self.shard_set(self.mcfg)
        for d in self.shards.unverified:
            log(f"warning: the manifest in {d} lists no sha256 of its shards: they are read unverified", info)
        check_shards(self.shards, self.mcfg)
        self.text_pad = self.text_padding(self.mcfg, self.shards, info)
        # 5. the model with its starting weights, the task's own pieces, the FLOPs of one image
        loaded = ckpt_io.load(self.resumed_from) if self.resumed_from is not None else None
        model, ema_init = self._build_model(loaded)
        # 6. compile, DDP / FSDP2, AdamW (its state when resuming), EMA
        self.weights: Weights = self._parallelize(model, loaded, ema_init)
        # 7. the loader; resuming, the counters and the loader's position (`load_state_dict`)
        self.loader = Loader(cfg.data, self.shards, self.collate(), info, cfg.train.seed)
        if loaded is not None:
            self.load_state_dict(loaded["state"])  # validated by `ckpt_io.load`
            log(f"resuming from {self.resumed_from} (step {self.state.step})", info)
        # 8. the lr schedule (its length fixed by the run that started it)
        self.schedule = LRSchedule(
            cfg.optim, self.peak_lr, cfg.train.max_steps, cfg.train.budget_minutes, self.state.schedule_total
        )
        self.state.schedule_total = self.schedule.total
        # 9. outputs: the resolved config, metrics, sample grids, the held-out evaluation
        self._build_outputs()

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint's state.json body: the counters at its top level, the loader's position, kind and config."""
        return self.state.state_dict() | {
            "loader": self.loader.state_dict(),
            "kind": self.kind,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state document: each component takes its own part."""
        self.state.load_state_dict(state)
        self.loader.load_state_dict(state["loader"])

    def _find_resume(self) -> Path | None:
        """The checkpoint to resume from; every process must find the same one (on several nodes out_dir is a
        folder they all see: a ValueError saying so when they do not agree)."""
        found, skipped = ckpt_io.find_resume(self.cfg.checkpoint.resume, self.out / "checkpoints")
        for d, why in skipped:
            log(f"warning: skipping damaged checkpoint {d}: {why}", self.info)
        step = -1 if found is None else ckpt_io.step_of(found)
        low, high = D.all_reduce_max_each([-step, step], self.info)
        if -low != high:
            show = lambda s: "none" if s < 0 else f"step {s:.0f}"
            raise ValueError(
                f"the processes do not agree on the checkpoint to resume from ({show(-low)} to {show(high)} under "
                f"train.out_dir={self.out}): on several nodes train.out_dir must be one folder every node sees (a "
                "shared mount)"
            )
        return found

    def _build_model(self, loaded: dict[str, Any] | None) -> tuple[LightGen, dict[str, Tensor] | None]:
        """The model with the checkpoint's or `model.init_from`'s weights (else seeded ones) on the device; the
        task's pieces; the FLOPs of one image. (model, the weights to start the EMA from)."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(seed_of(cfg.train.seed, 5))  # the same initial weights on every rank and every run
        model = LightGen(self.mcfg)
        if cfg.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if loaded is not None:
            ckpt_io.load_weights(model, loaded["model"], self.resumed_from)
            ema_init = loaded["ema"]
        else:
            start, ema_init = self.initial_weights()
            if start is not None:
                ckpt_io.load_weights(model, start, describe(cfg.model.init_from))
                log(f"initialised from {describe(cfg.model.init_from)}", info)
        self.setup_task(model, info)
        model.to(info.device).train()
        self.flops_per_image: float | None = self._flops_per_image(model, self.shards, info) if info.is_main else None
        return model, ema_init

    def _parallelize(self, model: LightGen, loaded: dict[str, Any] | None, ema_init: dict | None) -> Weights:
        """compile, DDP / FSDP2, AdamW at its peak lr (with the checkpoint's state), the EMA."""
        cfg, info = self.cfg, self.info
        if cfg.train.compile:
            D.compile_blocks(model)
        fsdp = cfg.train.parallel == "fsdp" and info.distributed
        wrapped = D.wrap(model, cfg.train.parallel, info, self.find_unused_parameters)
        self.global_batch = cfg.data.batch_size * info.world * cfg.optim.grad_accum
        self.peak_lr = peak_lr(cfg.optim, self.global_batch)
        optimizer = build_optimizer(wrapped, cfg.optim, self.peak_lr, info.device)
        if loaded is not None:
            ckpt_io.load_optimizer_state(wrapped, optimizer, loaded["optimizer"], fsdp)
        ema = None
        if cfg.optim.ema_decay > 0 and (info.is_main or fsdp):  # DDP: ranks hold equal weights
            ema = EMA(wrapped if fsdp else model, cfg.optim.ema_decay)
            if ema_init is not None:
                ema.load(ema_init)
        return Weights(self.mcfg, model, wrapped, optimizer, ema, fsdp, info)

    def _build_outputs(self) -> None:
        """The resolved config, the metrics log, signal handling, the checkpoint and grid writers."""
        cfg, info, mcfg = self.cfg, self.info, self.mcfg
        self.out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            doc = {"train": cfg.to_dict(), "model": mcfg.to_dict()}
            (self.out / "train_config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        params = sum(p.numel() for p in self.weights.model.parameters()) / 1e6
        log(
            f"{self.kind}: {params:.2f} M params | {self.shards.rows} rows in {len(self.shards.shards)} shards | "
            f"{info.world} process(es) on {info.device.type} | global batch {self.global_batch} | lr "
            f"{self.peak_lr:.3g} | {self.loader.steps_per_epoch} steps/epoch",
            info,
        )
        self.metrics = MetricsLog(cfg, info, self.kind, self.state.step, self.flops_per_image)
        self.signals = D.StopSignals()
        self.last_ckpt_step, self.last_ckpt_time = self.state.step, time.time()
        self.last_grid_step: int | None = None
        self.outputs = Outputs(cfg, self.weights, self.metrics, self.shards, self.text_pad)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Step until `train.max_steps`, the time budget or a signal; then `finish()`."""
        self.batches = iter(self.loader)
        try:
            with self.signals:
                self.stopped_by = self._stop_reason()
                while self.stopped_by is None and self.state.step < self.cfg.train.max_steps:
                    result = self.train_step()
                    self.stopped_by = self._stop_reason()
                    self.after_step(result)
            return self.finish()
        finally:
            self.batches.close()  # stops the loader's threads
            self.metrics.close()

    def _stop_reason(self) -> str | None:
        """'signal' or 'budget' as soon as any rank has one (decided jointly: all ranks stop after the same step).
        The ranks also agree on the training time (the slowest rank's), which a time budget's schedule follows."""
        s, budget = self.state, self.cfg.train.budget_minutes
        if s.step >= self.cfg.train.max_steps:
            return None
        signal, s.elapsed_s = D.all_reduce_max_each([float(self.signals.received is not None), s.elapsed_s], self.info)
        if signal:
            return "signal"
        return "budget" if budget is not None and s.elapsed_s >= 60 * budget else None

    def train_step(self) -> StepResult:
        """One optimizer step: lr, seed, grad_accum x `forward_backward_step`, clipping, the non-finite check
        (a step with a non-finite loss or gradient on any rank is skipped everywhere), AdamW, EMA."""
        cfg, info, s, w = self.cfg, self.info, self.state, self.weights
        t0 = time.time()
        lr = self.schedule.lr(s.step, s.elapsed_s)
        for group in w.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed_of(cfg.train.seed, info.rank, s.step, 3))
        loss, extra = self._accumulate()
        gnorm = clip_grad(w.wrapped, cfg.optim.grad_clip)
        flags = torch.stack([loss, (~torch.isfinite(loss) | ~torch.isfinite(gnorm)).float()])
        flags = D.all_reduce_mean(flags, info)
        bad = float(flags[1]) > 0
        if bad:
            self._skip_step()
        else:
            self.consecutive_bad = 0
            w.step()
        s.step += 1
        s.elapsed_s += time.time() - t0
        extra_vals = {k: float(D.all_reduce_mean(v, info)) for k, v in extra.items()}
        return StepResult(float(flags[0]), lr, float(gnorm), bad, extra_vals)

    def _accumulate(self) -> tuple[Tensor, dict[str, Tensor]]:
        """grad_accum micro-batches (DDP all-reduces gradients on the last only): mean loss and task metrics."""
        n, dev, wrapped = self.cfg.optim.grad_accum, self.info.device, self.weights.wrapped
        loss_sum, extra_sum = torch.zeros((), device=dev), {}
        for k in range(n):
            batch = to_device(next(self.batches), dev)
            last = k == n - 1
            with contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync():
                loss, extra = self.forward_backward_step(batch)
            loss_sum += loss.detach().float() / n
            for key, v in extra.items():
                extra_sum[key] = extra_sum.get(key, 0) + v.detach().float() / n
        return loss_sum, extra_sum

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (train.precision bf16, or auto on CUDA), else nothing."""
        return autocast(self.cfg.train.precision, self.info.device)

    def forward_backward_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The task's loss on one micro-batch (under bf16 autocast when on), then its backward (scaled by 1 /
        grad_accum); (loss, task metrics)."""
        with self.autocast():
            loss, extra = self.loss(self.weights.wrapped, batch)
        (loss / self.cfg.optim.grad_accum).backward()
        return loss, extra

    def _skip_step(self) -> None:
        s, limit = self.state, self.cfg.train.max_nonfinite
        s.nonfinite += 1
        self.consecutive_bad += 1
        self.weights.optimizer.zero_grad(set_to_none=True)
        log(f"warning: non-finite loss/gradient at step {s.step + 1}: step skipped ({s.nonfinite} so far)", self.info)
        if self.consecutive_bad >= limit:
            raise NonFiniteError(
                f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient (last at step "
                f"{s.step + 1}); lower optim.blr / check the data; the last good checkpoint is kept"
            )

    def after_step(self, r: StepResult) -> None:
        """The step's metrics row (with the held-out score when due), sample grids, periodic checkpoints."""
        s, final = self.state, self.stopped_by is not None or self.state.step == self.cfg.train.max_steps
        row = {"step": s.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "skipped": r.skipped} | r.extra
        if self._due(self.cfg.eval.every, final):
            t0 = time.time()
            scores = self.outputs.evaluate(s.step)
            if scores is not None:
                row["eval"] = scores
            self.metrics.pause(time.time() - t0)
        self.metrics.record(row, s.nonfinite, s.elapsed_s)
        if self._due(self.cfg.log.sample_every, final):
            t0 = time.time()
            self.sample_grid(s.step)
            self.metrics.pause(time.time() - t0)
        if not final and self._checkpoint_due():
            self.save_checkpoint(s.step, self.state_dict())

    def _due(self, every: int, final: bool) -> bool:
        """Every `every` steps, and (when `every` is set) after the last step unless a signal stopped the run."""
        return bool(every) and (self.state.step % every == 0 or (final and self.stopped_by != "signal"))

    def _checkpoint_due(self) -> bool:
        c, s = self.cfg.checkpoint, self.state
        due = bool(c.every_steps) and s.step - self.last_ckpt_step >= c.every_steps
        if c.every_minutes:  # decided jointly: a rank alone in a checkpoint's barrier would hang
            late = time.time() - self.last_ckpt_time >= 60 * c.every_minutes
            due = D.all_reduce_max(float(late), self.info) > 0 or due
        return due

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """`checkpoints/step-N` with `state` as its state.json body (see `Outputs.save_checkpoint`)."""
        self.outputs.save_checkpoint(step, state)
        self.last_ckpt_step, self.last_ckpt_time = step, time.time()

    def sample_grid(self, step: int) -> None:
        """`samples/step-N.png` of the fixed captions (when grids are on)."""
        self.last_grid_step = step
        self.outputs.sample_grid(step)

    def export(self) -> None:
        """`<out_dir>/model`: the final weights in `from_pretrained` layout."""
        self.outputs.export()

    def finish(self) -> dict[str, Any]:
        """The last checkpoint; unless a signal stopped the run, the last sample grid and the exported model."""
        s = self.state
        if s.step != self.last_ckpt_step or self.resumed_from is None:
            self.save_checkpoint(s.step, self.state_dict())
        if self.stopped_by == "signal":
            log(f"stopped by signal at step {s.step}: checkpoint written; rerun the same command to resume", self.info)
        else:
            if self.last_grid_step != s.step:
                self.sample_grid(s.step)
            self.export()
        summary = {
            "step": s.step,
            "elapsed_s": s.elapsed_s,
            "nonfinite": s.nonfinite,
            "stopped_by": self.stopped_by or "max_steps",
        }
        if self.info.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # -- helpers that read the state ---------------------------------------------------------------
    def _flops_per_image(self, model: LightGen, shards: ShardSet, info: D.DistInfo) -> float | None:
        """Forward + backward FLOPs of one training image, counted once on two real samples."""
        try:
            refs = np.array(shards.first_rows(2))
            batch = to_device(self.collate()(shards, refs, torch.Generator().manual_seed(0)), info.device)
            return count_flops(lambda: self.loss(model, batch)[0], model) / len(refs)
        except Exception as e:  # the estimate is optional; training is not
            log(f"note: FLOP count unavailable ({e}); MFU not reported", info)
            model.zero_grad(set_to_none=True)
            return None
