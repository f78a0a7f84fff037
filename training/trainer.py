"""The training loop shared by `pretrain.py` and `dpo.py`.

A task (pretraining, DPO) supplies its data and its loss; the `Trainer` does the rest: process group, model
construction / init / resume, DDP or FSDP2 wrapping, AdamW + schedule + EMA, bf16 autocast, gradient accumulation
and clipping, non-finite detection, logging (stdout, `metrics.jsonl`, TensorBoard, progress bar, MFU), sample
grids, atomic checkpoints with `keep_last`, `resume=auto`, and SIGTERM/SIGINT handling.

Randomness is positional: step s of rank r seeds torch with (seed, r, s) and the data loader seeds batch k of epoch
e with (seed, e, r, k), so a resumed run repeats the uninterrupted one exactly (bit-exact on a CPU) without
carrying generator states.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, load_config, pad_text, preset
from lightgen_model.sampling import generate

from . import checkpoint as ckpt_io
from . import dist as D
from .config import TrainConfig
from .data import Collate, Loader, ShardSet, TextPad, seed_of, text_of
from .optim import EMA, build_optimizer, lr_at, peak_lr

# dense bf16 peak FLOP/s by device-name substring (for the MFU estimate; unknown devices report none)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def log(msg: str, info: D.DistInfo | None = None) -> None:
    if info is None or info.is_main:
        print(msg, flush=True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


class Trainer:
    """Subclasses set `kind` and implement `shard_set`, `collate` and `loss`."""

    kind = "pretrain"
    init_prefers_ema = False  # start from the EMA weights of `model.init_from` (DPO) or the raw ones
    find_unused_parameters: bool | None = None  # DDP: None = only when the encoder can be skipped

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.train.out_dir)
        self._signal: int | None = None
        self.text_pad: TextPad = pad_text  # bound to the model in `_run` (see `text_padding`)

    # -- task hooks --------------------------------------------------------------------------------
    def shard_set(self, mcfg: ModelConfig) -> ShardSet:
        raise NotImplementedError

    def collate(self) -> Collate:
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

    # -- model ---------------------------------------------------------------------------------------
    def model_config(self, resume: Path | None) -> ModelConfig:
        m = self.cfg.model
        if resume is not None:
            return load_config(resume)
        if m.init_from:
            return load_config(m.init_from).replace(**m.overrides)
        return preset(m.preset, **m.overrides)

    def initial_weights(self) -> tuple[dict[str, Tensor] | None, dict[str, Tensor] | None]:
        """(weights, EMA weights) of `model.init_from`, or (None, None)."""
        if not self.cfg.model.init_from:
            return None, None
        from safetensors.torch import load_file

        d = Path(self.cfg.model.init_from)
        raw, ema = d / "model.safetensors", d / "model_ema.safetensors"
        if not raw.is_file() and not ema.is_file():
            raise FileNotFoundError(f"model.init_from={d}: no model.safetensors or model_ema.safetensors there")
        w_raw = load_file(str(raw)) if raw.is_file() else None
        w_ema = load_file(str(ema)) if ema.is_file() else None
        start = (w_ema or w_raw) if self.init_prefers_ema else (w_raw or w_ema)
        return start, (w_ema or w_raw)

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        info = D.init(cfg.train.device)
        try:
            return self._run(info)
        finally:
            D.shutdown()

    def _environment(self, info: D.DistInfo) -> None:
        if info.device.type == "cuda":
            # cuDNN attention is CPU-bound for our masked attention (BENCHMARKS.md); flash / mem-efficient stay on
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            if self.cfg.train.deterministic:  # multi-threaded CPU backward is otherwise not bit-reproducible
                torch.use_deterministic_algorithms(True, warn_only=True)
            torch.set_flush_denormal(True)  # denormals cost up to 6x on our CPUs (BENCHMARKS.md)
            n = self.cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world))
            torch.set_num_threads(n)

    def _find_resume(self, info: D.DistInfo) -> Path | None:
        r = self.cfg.checkpoint.resume
        if r == "never":
            return None
        if r != "auto":
            reason = ckpt_io.verify(r)
            if reason is not None:
                raise ValueError(f"checkpoint.resume={r}: {reason}")
            return Path(r)
        found, skipped = ckpt_io.latest_valid(self.out / "checkpoints")
        for d, why in skipped:
            log(f"warning: skipping damaged checkpoint {d}: {why}", info)
        return found

    def _check_data(self, shards: ShardSet, mcfg: ModelConfig) -> None:
        from pipeline.schema import IncompatibleShardsError

        dec = shards.decoded(0)
        m = dec.moments[shards.moment_columns[0]]
        if m.shape[1] != 2 * mcfg.latent_channels:
            raise IncompatibleShardsError(
                f"shards hold {m.shape[1] // 2}-channel latents, the model expects latent_channels="
                f"{mcfg.latent_channels}"
            )
        if dec.text.shape[1] != mcfg.text_dim:
            raise IncompatibleShardsError(
                f"shards hold {dec.text.shape[1]}-dim text states, the model expects text_dim={mcfg.text_dim}"
            )
        for res in shards.resolutions:
            mcfg.grid_for(res, res)  # raises when the resolution does not tile into tokens

    def text_padding(self, mcfg: ModelConfig, shards: ShardSet, info: D.DistInfo) -> TextPad:
        """``lightgen_model.pad_text`` bound to the model, so training pads text as generation does.

        Key-masked models: the shards' rows zero-padded to the batch's longest. ``text_key_mask=False`` models
        (converted reference checkpoints) attend to padding, and the reference trained on captions padded to
        ``max_text_len`` with the encoder's own padding states: the captions are re-encoded by the text encoder
        (``data.text_encoder``, default the model config's), which must be the one the shards were made with."""
        if mcfg.text_key_mask:
            return pad_text
        from lightgen_model.encoders import build_text_encoder, text_encoder_name
        from pipeline.schema import IncompatibleShardsError

        spec = self.cfg.data.text_encoder or mcfg.text_encoder
        if spec != "minilm" and not Path(spec).is_dir():
            raise FileNotFoundError(
                f"the model attends to padded text (text_key_mask=false), so captions are re-encoded to pad them as "
                f"the reference did; text encoder {spec!r} is not a local directory: set data.text_encoder=DIR"
            )
        name, made = text_encoder_name(spec), sorted({str(m.get("text_encoder")) for m in shards.manifests})
        if made != [name]:
            raise IncompatibleShardsError(
                f"text encoder {spec!r} ({name}) is not the one the shards were encoded with ({made}): set "
                "data.text_encoder to that encoder"
            )
        encoder = build_text_encoder(spec, device=str(info.device), max_len=mcfg.max_text_len)
        log(f"text: padded to {mcfg.max_text_len} tokens with {name}'s own states (reference padding)", info)
        return functools.partial(pad_text, cfg=mcfg, encoder=encoder)

    def _run(self, info: D.DistInfo) -> dict[str, Any]:
        cfg = self.cfg
        self._environment(info)
        resume = self._find_resume(info)
        mcfg = self.model_config(resume)
        shards = self.shard_set(mcfg)
        self._check_data(shards, mcfg)
        self.text_pad = self.text_padding(mcfg, shards, info)
        torch.manual_seed(seed_of(cfg.train.seed, 5))  # the same initial weights on every rank and every run
        model = LightGen(mcfg)
        if cfg.train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        state: dict[str, Any] = {"step": 0, "loader": {"epoch": 0, "index": 0}, "elapsed_s": 0.0, "nonfinite": 0,
                                 "schedule_total": None}  # fmt: skip
        ema_init = None
        loaded = None
        if resume is not None:
            loaded = ckpt_io.load(resume)
            model.load_state_dict(loaded["model"], strict=True)
            ema_init = loaded["ema"]
            state.update({k: loaded["state"][k] for k in state if k in loaded["state"]})
            log(f"resuming from {resume} (step {state['step']})", info)
        else:
            start, ema_init = self.initial_weights()
            if start is not None:
                model.load_state_dict(start, strict=True)
                log(f"initialised from {cfg.model.init_from}", info)
        self.setup_task(model, info)
        model.to(info.device).train()
        flops_per_img = self._flops_per_image(model, shards, info) if info.is_main else None
        if cfg.train.compile:
            for stack in (model.encoder_blocks, model.decoder_blocks, model.cross_attn_blocks):
                for blk in stack:
                    blk.compile()
            model.diffloss.net.compile()
        fsdp = cfg.train.parallel == "fsdp" and info.distributed
        wrapped = D.wrap(model, cfg.train.parallel, info, self.find_unused_parameters)
        micro = cfg.data.batch_size
        global_batch = micro * info.world * cfg.optim.grad_accum
        peak = peak_lr(cfg.optim, global_batch)
        opt = build_optimizer(wrapped, cfg.optim, peak, info.device)
        if loaded is not None:
            self._load_optimizer(wrapped, opt, loaded["optimizer"], fsdp)
        ema = None
        if cfg.optim.ema_decay > 0 and (info.is_main or fsdp):
            ema = EMA(wrapped if fsdp else model, cfg.optim.ema_decay)
            if ema_init is not None:
                ema.load(ema_init)
        loader = Loader(
            shards, self.collate(), batch_size=micro, rank=info.rank, world=info.world, seed=cfg.train.seed,
            window=cfg.data.shuffle_window, prefetch=cfg.data.prefetch, workers=cfg.data.workers, **state["loader"],
        )  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            (self.out / "train_config.json").write_text(
                json.dumps({"train": cfg.to_dict(), "model": mcfg.to_dict()}, indent=2, sort_keys=True) + "\n"
            )
        metrics_path = self.out / "metrics.jsonl"
        if info.is_main:
            self._truncate_metrics(metrics_path, state["step"])
        log(
            f"{self.kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params | {shards.rows} rows in "
            f"{len(shards.shards)} shards | {info.world} process(es) on {info.device.type} | global batch "
            f"{global_batch} | lr {peak:.3g} | {loader.steps_per_epoch} steps/epoch",
            info,
        )
        tb = self._tensorboard(info)
        sampler = self._sample_set(shards, mcfg)
        old_handlers = self._install_signals()
        autocast = self._autocast(info)
        peak_f = peak_flops(info.device)
        step, elapsed, nonfinite, consecutive = state["step"], float(state["elapsed_s"]), int(state["nonfinite"]), 0
        total = cfg.train.max_steps
        sched_total = state["schedule_total"] or cfg.optim.schedule_steps or total
        estimate_at = None  # the step at which a budget run fixes the length of its cosine schedule
        budget_cosine = cfg.optim.schedule == "cosine" and cfg.train.budget_minutes
        if state["schedule_total"] is None and cfg.optim.schedule_steps is None and budget_cosine:
            estimate_at = step + max(10, min(50, cfg.optim.warmup_steps // 4))
        session_t, session_step = 0.0, step
        bar = self._progress(info, step, total)
        it = iter(loader)
        last_ckpt_step, last_ckpt_time = step, time.time()
        window_t, window_imgs, window_loss, window_n = time.time(), 0, 0.0, 0
        stopped_by = None
        mf = open(metrics_path, "a") if info.is_main else None  # noqa: SIM115
        try:
            while step < total:
                t0 = time.time()
                budget_hit = cfg.train.budget_minutes is not None and elapsed >= 60 * cfg.train.budget_minutes
                if D.all_reduce_max(float(self._signal is not None or budget_hit), info) > 0:
                    stopped_by = "signal" if self._signal is not None else "budget"
                    break
                if step == estimate_at:
                    per_step = session_t / max(1, step - session_step)
                    left = max(0.0, 60 * cfg.train.budget_minutes - elapsed)
                    est = D.all_reduce_max(float(step + int(left / max(per_step, 1e-9))), info)
                    sched_total = min(total, int(est))
                    log(f"schedule: {sched_total} steps fit the budget ({per_step:.3f} s/step)", info)
                lr = lr_at(step, peak, cfg.optim, sched_total)
                for group in opt.param_groups:
                    group["lr"] = lr
                torch.manual_seed(seed_of(cfg.train.seed, info.rank, step, 3))
                loss_sum = torch.zeros((), device=info.device)
                extra_sum: dict[str, Tensor] = {}
                for k in range(cfg.optim.grad_accum):
                    batch = next(it)
                    sync = contextlib.nullcontext()
                    if k < cfg.optim.grad_accum - 1 and hasattr(wrapped, "no_sync"):
                        sync = wrapped.no_sync()
                    with sync, autocast:
                        loss, extra = self.loss(wrapped, self._to_device(batch, info.device))
                    with sync:
                        (loss / cfg.optim.grad_accum).backward()
                    loss_sum += loss.detach().float() / cfg.optim.grad_accum
                    for key, v in extra.items():
                        extra_sum[key] = extra_sum.get(key, 0) + v.detach().float() / cfg.optim.grad_accum
                gnorm = self._clip(wrapped, cfg.optim.grad_clip)
                flags = torch.stack([loss_sum, (~torch.isfinite(loss_sum) | ~torch.isfinite(gnorm)).float()])
                flags = D.all_reduce_mean(flags, info)
                mean_loss, bad = float(flags[0]), float(flags[1]) > 0
                if bad:
                    nonfinite += 1
                    consecutive += 1
                    opt.zero_grad(set_to_none=True)
                    log(
                        f"warning: non-finite loss/gradient at step {step + 1}: step skipped ({nonfinite} so far)", info
                    )
                    if consecutive >= cfg.train.max_nonfinite:
                        raise NonFiniteError(
                            f"{consecutive} consecutive steps with a non-finite loss or gradient (last at step "
                            f"{step + 1}); lower optim.blr / check the data; the last good checkpoint is kept"
                        )
                else:
                    consecutive = 0
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(wrapped if fsdp else model)
                step += 1
                dt = time.time() - t0
                elapsed += dt
                session_t += dt
                extra_vals = {k: float(D.all_reduce_mean(v, info)) for k, v in extra_sum.items()}
                if mf is not None:
                    row = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(gnorm), "skipped": bad}
                    mf.write(json.dumps(row | extra_vals) + "\n")
                window_imgs += global_batch
                if not bad:
                    window_loss, window_n = window_loss + mean_loss, window_n + 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log.every == 0 or step == total:
                    span = time.time() - window_t
                    ips = window_imgs / max(span, 1e-9)
                    mfu = ips * flops_per_img / (peak_f * info.world) if (peak_f and flops_per_img) else None
                    rec = {
                        "loss": window_loss / max(window_n, 1),
                        "lr": lr,
                        "grad_norm": float(gnorm),
                        "img_per_s": ips,
                    }
                    if mfu is not None:
                        rec["mfu"] = mfu
                    rec |= extra_vals
                    self._report(info, step, total, rec, nonfinite, tb, bar)
                    if mf is not None:
                        mf.flush()
                    window_t, window_imgs, window_loss, window_n = time.time(), 0, 0.0, 0
                if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                    self._sample(model, ema, fsdp, sampler, mcfg, info, step, tb)
                due_steps = cfg.checkpoint.every_steps and step - last_ckpt_step >= cfg.checkpoint.every_steps
                due_time = False
                if cfg.checkpoint.every_minutes:  # decided jointly: a rank alone in a checkpoint's barrier would hang
                    late = time.time() - last_ckpt_time >= 60 * cfg.checkpoint.every_minutes
                    due_time = D.all_reduce_max(float(late), info) > 0
                if (due_steps or due_time) and step < total:
                    self._checkpoint(
                        model,
                        wrapped,
                        opt,
                        ema,
                        fsdp,
                        mcfg,
                        info,
                        step,
                        loader,
                        elapsed,
                        nonfinite,
                        self._sched(estimate_at, step, sched_total),
                    )
                    last_ckpt_step, last_ckpt_time = step, time.time()
        finally:
            if mf is not None:
                mf.close()
            if bar is not None:
                bar.close()
            self._restore_signals(old_handlers)
        if step != last_ckpt_step or resume is None:
            sched = self._sched(estimate_at, step, sched_total)
            self._checkpoint(model, wrapped, opt, ema, fsdp, mcfg, info, step, loader, elapsed, nonfinite, sched)
        if stopped_by == "signal":
            log(f"stopped by signal at step {step}: checkpoint written; rerun the same command to resume", info)
        else:
            self._sample(model, ema, fsdp, sampler, mcfg, info, step, tb)
            self._export(model, ema, fsdp, mcfg, info)
        if tb is not None:
            tb.close()
        summary = {"step": step, "elapsed_s": elapsed, "nonfinite": nonfinite, "stopped_by": stopped_by or "max_steps"}
        if info.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # -- pieces ----------------------------------------------------------------------------------------
    @staticmethod
    def _sched(estimate_at: int | None, step: int, sched_total: int) -> int | None:
        """The schedule length to record: None while a budget run has not fixed it yet."""
        return None if (estimate_at is not None and step <= estimate_at) else sched_total

    @staticmethod
    def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    def _autocast(self, info: D.DistInfo) -> contextlib.AbstractContextManager:
        p = self.cfg.train.precision
        use_bf16 = p == "bf16" or (p == "auto" and info.device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(info.device.type, dtype=torch.bfloat16)

    @staticmethod
    def _clip(model: nn.Module, max_norm: float) -> Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=next(model.parameters()).device)
        if max_norm and max_norm > 0:
            n = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            n = torch.nn.utils.get_total_norm([p.grad for p in params])
        return n.full_tensor() if hasattr(n, "full_tensor") else n

    def _flops_per_image(self, model: LightGen, shards: ShardSet, info: D.DistInfo) -> float | None:
        """Forward + backward FLOPs of one training image, counted once on two real samples."""
        try:
            from torch.utils.flop_counter import FlopCounterMode

            refs = np.array(shards.first_rows(2))
            batch = self._to_device(self.collate()(shards, refs, torch.Generator().manual_seed(0)), info.device)
            with FlopCounterMode(display=False) as fc:
                loss, _ = self.loss(model, batch)
                loss.backward()
            model.zero_grad(set_to_none=True)
            return fc.get_total_flops() / len(refs)
        except Exception as e:  # the estimate is optional; training is not
            log(f"note: FLOP count unavailable ({e}); MFU not reported", info)
            model.zero_grad(set_to_none=True)
            return None

    def _load_optimizer(self, wrapped: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(wrapped, opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)

    def _checkpoint(self, model, wrapped, opt, ema, fsdp, mcfg, info, step, loader, elapsed, nonfinite, sched) -> None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(wrapped, options=opts)
            opt_state = get_optimizer_state_dict(wrapped, opt, options=opts)
        else:
            model_state, opt_state = (model.state_dict(), opt.state_dict()) if info.is_main else (None, None)
        ema_state = self._ema_state(model_state, ema) if (ema is not None and model_state is not None) else None
        if info.is_main:
            d = ckpt_io.save(
                self.out / "checkpoints", step, model_state=model_state, ema_state=ema_state,
                model_config_json=mcfg.to_json(), optimizer_state=opt_state,
                state={"loader": loader.state(), "elapsed_s": elapsed, "nonfinite": nonfinite, "kind": self.kind,
                       "schedule_total": sched, "config": self.cfg.to_dict()},
                keep_last=self.cfg.checkpoint.keep_last,
            )  # fmt: skip
            log(f"checkpoint: {d}", info)
        D.barrier(info)

    @staticmethod
    def _ema_state(model_state: dict[str, Tensor], ema: EMA) -> dict[str, Tensor]:
        """The model's state dict with the EMA values in place of the parameters (buffers as they are)."""
        full = ema.full()
        return {k: (full[k].to(v.dtype) if k in full else v) for k, v in model_state.items()}

    def _export(self, model, ema, fsdp, mcfg, info) -> None:
        """`<out_dir>/model`: the final weights in `from_pretrained` layout (EMA preferred on load)."""
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = model.state_dict() if info.is_main else None
        ema_state = self._ema_state(state, ema) if (ema is not None and state is not None) else None
        if info.is_main:
            from safetensors.torch import save_file

            d = self.out / "model"
            d.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(d / "model.safetensors"))
            if ema_state is not None:
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(d / "model_ema.safetensors")
                )
            (d / "config.json").write_text(mcfg.to_json() + "\n")
            log(f"model: {d}", info)
        D.barrier(info)

    def _sample_set(self, shards: ShardSet, mcfg: ModelConfig) -> dict[str, Any] | None:
        n = self.cfg.log.sample_count
        if n <= 0:
            return None
        rows, captions = text_of(shards, np.array(shards.first_rows(n)))
        text, mask = self.text_pad(rows, captions)
        return {"text": text, "mask": mask, "captions": captions, "resolution": shards.resolutions[0]}

    def _decoder(self, mcfg: ModelConfig):
        spec = self.cfg.log.vae or mcfg.vae
        if not hasattr(self, "_dec"):
            self._dec = None
            try:
                from lightgen_model.encoders import build_image_tokenizer

                self._dec = build_image_tokenizer(spec)
            except Exception as e:  # grids are a convenience; a missing VAE must not stop training
                print(f"note: sample grids disabled: cannot load image tokenizer {spec!r} ({e})", flush=True)
        return self._dec

    def _sample(self, model, ema, fsdp, sampler, mcfg, info, step, tb) -> None:
        if sampler is None:
            return
        weights = ema.full() if ema is not None else None  # collective under FSDP2: every rank calls it
        if not info.is_main:
            D.barrier(info)
            return
        dec = self._decoder(mcfg)
        if dec is None:
            D.barrier(info)
            return
        if weights is not None:
            state = LightGen(mcfg).state_dict()
            state.update(weights)
        elif not fsdp:
            state = model.state_dict()
        else:  # FSDP2 without an EMA: no full weights on one rank here
            D.barrier(info)
            return
        net = LightGen(mcfg).to(info.device).eval()
        net.load_state_dict(state, strict=True)
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        with self._autocast(info):
            lat = generate(
                net, sampler["text"].to(info.device), sampler["mask"].to(info.device), resolution=sampler["resolution"],
                num_iter=self.cfg.log.sample_steps, cfg=self.cfg.log.sample_cfg,
                temperature=self.cfg.log.sample_temperature, generator=g,
            )  # fmt: skip
        imgs = dec.decode(lat.float())
        arr = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        path = self.out / "samples" / f"step-{step:08d}.png"
        save_grid(arr, path)
        (path.with_suffix(".json")).write_text(json.dumps({"step": step, "captions": sampler["captions"]}, indent=1))
        if tb is not None:
            from PIL import Image

            tb.add_image("samples", np.asarray(Image.open(path)), step, dataformats="HWC")
        del net
        D.barrier(info)

    def _tensorboard(self, info: D.DistInfo):
        if not (self.cfg.log.tensorboard and info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed; logging to stdout and metrics.jsonl only", info)
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _progress(self, info: D.DistInfo, step: int, total: int):
        if not (self.cfg.log.progress and info.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=step, desc=self.kind, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _report(self, info, step, total, rec, nonfinite, tb, bar) -> None:
        if not info.is_main:
            return
        parts = [f"step {step}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}",
                 f"{rec['img_per_s']:.1f} img/s"]  # fmt: skip
        if "mfu" in rec:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        parts += [f"{k} {v:.4g}" for k, v in rec.items() if k not in ("loss", "lr", "grad_norm", "img_per_s", "mfu")]
        if nonfinite:
            parts.append(f"non-finite steps {nonfinite}")
        msg = " | ".join(parts)
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, float) and math.isfinite(v):
                    tb.add_scalar(f"train/{k}", v, step)

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Drop metric lines of steps after the checkpoint being resumed (they will be recomputed)."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(x + "\n" for x in keep))

    def _install_signals(self) -> dict[int, Any]:
        def handler(signum, frame):  # noqa: ARG001
            if self._signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            print(f"\nsignal {signum}: finishing this step, writing a checkpoint, then exiting", flush=True)

        old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner thread)
                old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signals(old: dict[int, Any]) -> None:
        for s, h in old.items():
            signal.signal(s, h)
