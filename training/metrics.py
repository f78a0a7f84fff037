"""What a run reports: `metrics.jsonl` (one row per step), a report every `log.every` steps to stdout or the
progress bar and to TensorBoard, and the MFU estimate (FLOPs counted on a real step against the device's peak)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # kept out of the import: bench/model_bench.py uses PEAK_FLOPS on machines without yaml
    from .config import TrainConfig
    from .dist import DistInfo

# dense bf16 peak FLOP/s by device-name substring (for the MFU estimate; unknown devices report none)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}
STANDARD = ("loss", "lr", "grad_norm", "img_per_s", "mfu")


def log(msg: str, info: DistInfo | None = None) -> None:
    """Print on the main process (every process when `info` is None)."""
    if info is None or info.is_main:
        print(msg, flush=True)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from PEAK_FLOPS; None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def count_flops(loss: Callable[[], Tensor], model: nn.Module) -> float:
    """Forward + backward FLOPs of `loss()` (matmuls and attention, by torch's FlopCounterMode); grads cleared."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            loss().backward()
        return fc.get_total_flops()
    finally:
        model.zero_grad(set_to_none=True)


def format_duration(seconds: float) -> str:
    """`1h02m`, `12m05s` or `42s`."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to the checkpoint being resumed, each step once (later ones will be
    recomputed; a line cut short by a kill is dropped). The file is replaced atomically."""
    if not path.is_file():
        return
    keep, seen = [], set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            s = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        if type(s) is int and s <= step and s not in seen:
            keep.append(line)
            seen.add(s)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(x + "\n" for x in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """The main process's logs; on other processes every method does nothing.

    `record` writes a step's row to `metrics.jsonl` and, every `log.every` steps and at `train.max_steps`, reports the
    window since the last report: mean loss of its good steps, images/s, MFU (with `flops_per_image` and a known
    peak), task metrics and held-out scores (`eval`)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, kind: str, step: int, flops_per_image: float | None) -> None:
        t = cfg.train
        self.cfg, self.info, self.total = cfg.log, info, t.max_steps
        self.global_batch = cfg.data.batch_size * info.world * cfg.optim.grad_accum
        self.budget_s = 60 * t.budget_minutes if t.budget_minutes else None  # the ETA is at most the time it leaves
        self.eta_s: float | None = None  # training seconds left, as of the last report
        peak = peak_flops(info.device)
        # MFU = images/s x FLOPs per image / (peak x processes)
        self.mfu_per_image = flops_per_image / (peak * info.world) if (peak and flops_per_image) else None
        self.file = self.tb = self.bar = None
        if info.is_main:
            self._open(Path(t.out_dir), kind, step)
        self._new_window()

    def _open(self, out: Path, kind: str, step: int) -> None:
        """metrics.jsonl (cut back to `step`), TensorBoard and the progress bar, on the main process."""
        path = out / "metrics.jsonl"
        truncate_metrics(path, step)
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())
        self.tb = self._tensorboard(out, self.cfg.tensorboard)
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc=kind, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _new_window(self) -> None:
        self.window_t, self.window_imgs, self.window_loss, self.window_n = time.time(), 0, 0.0, 0
        self.window_steps = 0

    def _tensorboard(self, out: Path, enabled: bool) -> Any:
        if not enabled:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("note: tensorboard is not installed; logging to stdout and metrics.jsonl only")
            return None
        return SummaryWriter(str(out / "tb"))

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, sample grids) out of the current window's images/s."""
        self.window_t += seconds

    def record(self, row: dict[str, Any], nonfinite: int, elapsed_s: float = 0.0) -> None:
        """Write one step's row ({"step", "loss", "lr", "grad_norm", "skipped", task metrics..., "eval"?}) after
        `elapsed_s` seconds of training (for the ETA of a time budget)."""
        if self.file is None:
            return
        step = row["step"]
        self.file.write(json.dumps(row) + "\n")
        self.window_imgs += self.global_batch
        self.window_steps += 1
        if not row["skipped"]:
            self.window_loss, self.window_n = self.window_loss + row["loss"], self.window_n + 1
        if self.bar is not None:
            self.bar.update(1)
        if "eval" in row:
            self.report_eval(step, row["eval"])
            self.file.flush()
        if step % self.cfg.every and step != self.total:
            return
        window_s = max(time.time() - self.window_t, 1e-9)
        ips = self.window_imgs / window_s
        self.eta_s = self.eta(step, window_s / max(self.window_steps, 1), elapsed_s)
        rec = {
            "loss": self.window_loss / max(self.window_n, 1),
            "lr": row["lr"],
            "grad_norm": row["grad_norm"],
            "img_per_s": ips,
        } | ({"mfu": ips * self.mfu_per_image} if self.mfu_per_image else {})
        rec |= {k: v for k, v in row.items() if k not in ("step", "skipped", "eval", *STANDARD)}
        self.report(step, rec, nonfinite)
        self.file.flush()
        self._new_window()

    def report(self, step: int, rec: dict[str, float], nonfinite: int) -> None:
        """One report line (stdout or above the progress bar) and its scalars under `train/` in TensorBoard."""
        parts = [
            f"step {step}/{self.total}",
            f"loss {rec['loss']:.4f}",
            f"lr {rec['lr']:.2e}",
            f"gnorm {rec['grad_norm']:.3f}",
            f"{rec['img_per_s']:.1f} img/s",
        ]
        if "mfu" in rec:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        parts += [f"{k} {v:.4g}" for k, v in rec.items() if k not in STANDARD]
        if nonfinite:
            parts.append(f"non-finite steps {nonfinite}")
        if step < self.total and self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        self.write(" | ".join(parts))
        self.scalars("train", rec, step)

    def eta(self, step: int, s_per_step: float, elapsed_s: float) -> float:
        """Seconds of training left at the current speed: the steps left, or the time budget left if sooner."""
        left = (self.total - step) * s_per_step
        if self.budget_s is not None:
            left = min(left, max(0.0, self.budget_s - elapsed_s))
        return left

    def report_eval(self, step: int, scores: dict[str, float]) -> None:
        """The held-out scores: one line, and `eval/<name>` scalars in TensorBoard."""
        self.write(f"eval step {step}: " + " | ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        self.scalars("eval", scores, step)

    def write(self, msg: str) -> None:
        """A line on the main process that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(msg)
        elif self.info.is_main:
            print(msg, flush=True)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Finite float values as TensorBoard scalars `<prefix>/<name>`."""
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG file as a TensorBoard image."""
        if self.tb is not None:
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")

    def flush(self) -> None:
        """Write the rows so far through to the disk (before a checkpoint: a kill must not lose rows it covers)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        """Close metrics.jsonl, the progress bar and TensorBoard (idempotent)."""
        for h in (self.file, self.bar, self.tb):
            if h is not None:
                h.close()
        self.file = self.bar = self.tb = None
