"""Trainer throughput, side by side in one run: the data loader alone vs the training step that consumes it.

    python bench/train_bench.py --preset shapes --steps 60                    # CPU: loader samples/s vs train img/s
    python bench/train_bench.py --preset lightgen --device cuda --steps 30 --random [--compile]

With shards (default) the data are random pixel-like moments + 384-dim text written as real training shards
(the loader reads Parquet); `--random` feeds in-memory random data of the preset's shapes instead (no pyarrow
needed, e.g. on a bare GPU machine). The training figure comes from the real trainer (training/trainer.py):
images per second over the timed steps (after `--warmup` steps), and MFU on GPUs with a known peak.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from lightgen_model import preset
from training.config import load_config
from training.data import Decoded, Loader, Shard, ShardSet, latent_batch
from training.pretrain import PretrainTrainer


class RandomShards(ShardSet):
    """In-memory random rows shaped like a preset's training data (for throughput only)."""

    def __init__(self, rows: int, shard_rows: int, channels: int, grid: int, text_dim: int, text_len: int, res: int):
        self.moment_columns, self.extra_columns = ("moments", "moments_flip"), ()
        n = (rows + shard_rows - 1) // shard_rows
        self.shards = [Shard(Path(f"random-{i}"), shard_rows, res) for i in range(n)]
        self.resolutions, self.manifests = [res], []
        self.shape, self.text_dim, self.text_len = (2 * channels, grid, grid), text_dim, text_len
        self._cache, self._lock, self.cache_size = OrderedDict(), threading.Lock(), 16

    def decoded(self, i: int) -> Decoded:
        with self._lock:
            if i in self._cache:
                return self._cache[i]
        rng = np.random.default_rng(i)
        n = self.shards[i].rows
        m = rng.standard_normal((n, *self.shape), dtype=np.float32).astype(np.float16)
        m[:, self.shape[0] // 2 :] = -4.0
        lens = rng.integers(self.text_len // 2, self.text_len + 1, n)
        text = rng.standard_normal((int(lens.sum()), self.text_dim), dtype=np.float32).astype(np.float16)
        dec = Decoded({"moments": m, "moments_flip": m[..., ::-1].copy()}, text, np.concatenate([[0], np.cumsum(lens)]),
                      [f"c{k}" for k in range(n)], {})  # fmt: skip
        with self._lock:
            self._cache[i] = dec
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return dec


def write_random_shards(out: Path, rows: int, channels: int, grid: int, text_dim: int, text_len: int, res: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from train_utils import write_latent_shards

    rs = RandomShards(rows, 512, channels, grid, text_dim, text_len, res)
    moms, texts = [], []
    for i in range(len(rs.shards)):
        d = rs.decoded(i)
        moms.append(d.moments["moments"].astype(np.float32))
        texts += [d.text_row(k).astype(np.float32) for k in range(rs.shards[i].rows)]
    return write_latent_shards(out, np.concatenate(moms)[:rows], texts[:rows], ["c"] * rows, rows_per_shard=512)


def loader_rate(shards: ShardSet, batch: int, seconds: float, workers: int) -> float:
    loader = Loader(shards, lambda s, r, g: latent_batch(s, r, g, True), batch_size=batch, prefetch=2 * workers + 2,
                    workers=workers)  # fmt: skip
    n, t0 = 0, None
    for k, b in enumerate(loader):
        if k == 2:  # after the first shard reads
            t0, n = time.time(), 0
        n += b["latents"].shape[0]
        if t0 is not None and time.time() - t0 > seconds:
            break
    return n / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--text-len", type=int, default=12)
    p.add_argument("--random", action="store_true", help="in-memory random data instead of Parquet shards")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--loader-workers", type=int, default=1, help="data.workers (threads preparing batches)")
    p.add_argument("--loader-only", action="store_true", help="measure the loader alone")
    p.add_argument("--set", nargs="*", default=[], help="extra trainer overrides section.key=value")
    args = p.parse_args()
    mcfg = preset(args.preset)
    res = mcfg.base_resolution
    grid = res // mcfg.vae_stride
    shape = (mcfg.latent_channels, grid, mcfg.text_dim, args.text_len, res)
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    if args.random:
        shards = RandomShards(args.rows, 512, *shape)
    else:
        shards = ShardSet([write_random_shards(tmp / "shards", args.rows, *shape)])
    rate = loader_rate(shards, args.batch, args.loader_seconds, args.loader_workers)
    if args.loader_only:
        print(json.dumps({"preset": args.preset, "batch": args.batch, "loader_workers": args.loader_workers,
                          "loader_samples_per_s": round(rate, 1)}), flush=True)  # fmt: skip
        return

    times: list[float] = []

    class Timed(PretrainTrainer):
        def shard_set(self, m):
            return shards

        def loss(self, model, batch):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.time())
            return super().loss(model, batch)

    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.shards=[unused]", f"data.batch_size={args.batch}",
        f"train.max_steps={args.steps + args.warmup}", f"train.device={args.device}", f"train.compile={args.compile}",
        f"train.out_dir={tmp / 'run'}", "checkpoint.every_steps=0", "log.sample_count=0", "log.tensorboard=false",
        "log.progress=false", f"log.every={args.steps + args.warmup}", "optim.ema_decay=0.9999",
        f"data.workers={args.loader_workers}", f"data.prefetch={2 * args.loader_workers + 2}", *args.set,
    ])  # fmt: skip
    trainer = Timed(cfg)
    trainer.save_checkpoint = lambda *a, **k: None  # throughput only: no checkpoint or final export
    trainer.export = lambda *a, **k: None
    flops: list[float | None] = []
    orig = trainer._flops_per_image
    trainer._flops_per_image = lambda *a: flops.append(orig(*a)) or flops[-1]
    trainer.run()
    timed = times[-args.steps - 1 :]  # the last step's start closes the window of steps-1 full steps
    ips = args.batch * (len(timed) - 1) / (timed[-1] - timed[0])
    out = {"preset": args.preset, "device": args.device, "batch": args.batch, "compile": args.compile,
           "data": "random" if args.random else "parquet", "loader_workers": args.loader_workers,
           "loader_samples_per_s": round(rate, 1),
           "train_img_per_s": round(ips, 2), "loader_over_train": round(rate / ips, 1)}  # fmt: skip
    if args.device == "cuda" and flops and flops[0]:
        from training.metrics import peak_flops

        peak = peak_flops(torch.device("cuda"))
        out |= {"gflop_per_img": round(flops[0] / 1e9, 1), "device_name": torch.cuda.get_device_name()}
        if peak:
            out["mfu"] = round(ips * flops[0] / peak, 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
