"""Trainer throughput, side by side in one run: the data loader alone vs the training step that consumes it.

    python bench/train_bench.py --preset shapes --steps 60                    # CPU: loader samples/s vs train img/s
    python bench/train_bench.py --preset lightgen --device cuda --steps 30 --random [--compile]
    python bench/train_bench.py --verify-cost --shard-rows 128 --rounds 3       # loader with vs without sha256

With shards (default) the data are random pixel-like moments + 384-dim text written as real training shards
(the loader reads Parquet); `--random` feeds in-memory random data of the preset's shapes instead (no pyarrow
needed, e.g. on a bare GPU machine). The training figure comes from the real trainer (training/trainer.py):
images per second over the timed steps (after `--warmup` steps), and MFU on GPUs with a known peak.
`--verify-cost` measures the loader alone with the shards' sha256 checked (as training reads them) and without (the
manifest's digests dropped), alternating `--rounds` times in one run, each on a fresh ShardSet: pick `--shard-rows`
so that the shards outnumber the loader's cache (16 shards at the default window), so every shard is read again
each epoch. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench._common import bench_parser
from lightgen_model import preset
from training.config import DataSection, load_config
from training.data import Decoded, Loader, Shard, ShardSet, latent_batch
from training.dist import DistInfo
from training.pretrain import PretrainTrainer


class RandomShards(ShardSet):
    """In-memory random rows shaped like a preset's training data (for throughput only)."""

    def __init__(self, rows: int, shard_rows: int, channels: int, grid: int, text_dim: int, text_len: int, res: int):
        self.moment_columns, self.extra_columns = ("moments", "moments_flip"), ()
        n = (rows + shard_rows - 1) // shard_rows
        self.shards = [Shard(Path(f"random-{i}"), shard_rows, res) for i in range(n)]
        self.resolutions, self.manifests, self.unverified = [res], [], []
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
        dec = Decoded(
            {"moments": m, "moments_flip": m[..., ::-1].copy()},
            text,
            np.concatenate([[0], np.cumsum(lens)]),
            [f"c{k}" for k in range(n)],
            {},
        )
        with self._lock:
            self._cache[i] = dec
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return dec


def write_random_shards(
    out: Path, rows: int, channels: int, grid: int, text_dim: int, text_len: int, res: int, shard_rows: int = 512
) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from train_utils import write_latent_shards

    rs = RandomShards(rows, shard_rows, channels, grid, text_dim, text_len, res)
    moms, texts = [], []
    for i in range(len(rs.shards)):
        d = rs.decoded(i)
        moms.append(d.moments["moments"].astype(np.float32))
        texts += [d.text_row(k).astype(np.float32) for k in range(rs.shards[i].rows)]
    return write_latent_shards(out, np.concatenate(moms)[:rows], texts[:rows], ["c"] * rows, rows_per_shard=shard_rows)


def loader_rate(shards: ShardSet, batch: int, seconds: float, workers: int) -> tuple[float, float]:
    """(samples per second of wall time, samples per CPU second of this process) of the loader alone."""
    data = DataSection(batch_size=batch, prefetch=2 * workers + 2, workers=workers, read_ahead=0)
    loader = Loader(data, shards, lambda s, r, g: latent_batch(s, r, g, True), DistInfo(), 0)
    n, t0, c0 = 0, None, None
    for k, b in enumerate(loader):
        if k == 2:  # after the first shard reads
            t0, c0, n = time.time(), time.process_time(), 0
        n += b["latents"].shape[0]
        if t0 is not None and time.time() - t0 > seconds:
            break
    return n / (time.time() - t0), n / (time.process_time() - c0)


def verify_cost(directory: Path, args: argparse.Namespace) -> dict:
    """Loader samples/s (wall and per CPU second) with and without the sha256 check, alternated in one run; the
    median ratios (with / without), sha256's own MB/s over the shard files and the share of the loader's CPU time
    per sample that hashing that sample's bytes takes at that speed."""
    rates: dict[str, list[tuple[float, float]]] = {"sha256": [], "unverified": []}
    for _ in range(args.rounds):
        for mode, found in rates.items():
            shards = ShardSet([directory])
            assert not shards.unverified
            if mode == "unverified":
                for s in shards.shards:
                    s.sha256 = None
            found.append(loader_rate(shards, args.batch, args.loader_seconds, args.loader_workers))
    files = sorted(directory.glob("part-*.parquet"))
    t0, size = time.time(), 0
    for f in files:
        data = f.read_bytes()
        size += len(data)
        hashlib.sha256(data).hexdigest()
    hash_mb_s = size / 1e6 / (time.time() - t0)
    ratio = lambda i: round(float(np.median([a[i] / b[i] for a, b in zip(*rates.values(), strict=True)])), 3)
    return {
        "shards": len(files),
        "shard_mb": round(size / 1e6 / len(files), 2),
        "sha256_mb_per_s": round(hash_mb_s),
        **{f"loader_{m}": [round(r[0]) for r in v] for m, v in rates.items()},
        **{f"loader_{m}_per_cpu_s": [round(r[1]) for r in v] for m, v in rates.items()},
        "median_ratio_wall": ratio(0),
        "median_ratio_cpu": ratio(1),
        # hashing's share of the unverified loader's CPU time per sample, from sha256's own speed
        "hash_share_of_loader_cpu": round(
            size / args.rows / (hash_mb_s * 1e6) * float(np.median([r[1] for r in rates["unverified"]])), 4
        ),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    p = bench_parser(__doc__, preset="shapes", device="cpu", batch=64, warmup=10, steps=60)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--text-len", type=int, default=12)
    p.add_argument("--random", action="store_true", help="in-memory random data instead of Parquet shards")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--loader-workers", type=int, default=1, help="data.workers (threads preparing batches)")
    p.add_argument("--loader-only", action="store_true", help="measure the loader alone")
    p.add_argument("--verify-cost", action="store_true", help="loader with vs without the sha256 check")
    p.add_argument("--shard-rows", type=int, default=512, help="rows per written shard")
    p.add_argument("--rounds", type=int, default=3, help="--verify-cost: alternations")
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
        written = write_random_shards(tmp / "shards", args.rows, *shape, shard_rows=args.shard_rows)
        if args.verify_cost:
            cost = verify_cost(written, args)
            print(
                json.dumps(
                    {
                        "preset": args.preset,
                        "batch": args.batch,
                        "rows": args.rows,
                        "loader_workers": args.loader_workers,
                        **cost,
                    }
                ),
                flush=True,
            )
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shards = ShardSet([written])
    rate = loader_rate(shards, args.batch, args.loader_seconds, args.loader_workers)[0]
    if args.loader_only:
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "batch": args.batch,
                    "loader_workers": args.loader_workers,
                    "loader_samples_per_s": round(rate, 1),
                }
            ),
            flush=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
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

    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            "data.shards=[unused]",
            f"data.batch_size={args.batch}",
            f"train.max_steps={args.steps + args.warmup}",
            f"train.device={args.device}",
            f"train.compile={args.compile}",
            f"train.out_dir={tmp / 'run'}",
            "checkpoint.every_steps=0",
            "log.sample_count=0",
            "log.tensorboard=false",
            "log.progress=false",
            f"log.every={args.steps + args.warmup}",
            "optim.ema_decay=0.9999",
            f"data.workers={args.loader_workers}",
            f"data.prefetch={2 * args.loader_workers + 2}",
            *args.set,
        ],
    )
    trainer = Timed(cfg)
    trainer.save_checkpoint = lambda *a, **k: None  # throughput only: no checkpoint or final export
    trainer.export = lambda *a, **k: None
    flops: list[float | None] = []
    orig = trainer._flops_per_image
    trainer._flops_per_image = lambda *a: flops.append(orig(*a)) or flops[-1]
    trainer.run()
    timed = times[-args.steps - 1 :]  # the last step's start closes the window of steps-1 full steps
    ips = args.batch * (len(timed) - 1) / (timed[-1] - timed[0])
    out = {
        "preset": args.preset,
        "device": args.device,
        "batch": args.batch,
        "compile": args.compile,
        "data": "random" if args.random else "parquet",
        "loader_workers": args.loader_workers,
        "loader_samples_per_s": round(rate, 1),
        "train_img_per_s": round(ips, 2),
        "loader_over_train": round(rate / ips, 1),
    }
    if args.device == "cuda" and flops and flops[0]:
        from training.metrics import peak_flops

        peak = peak_flops(torch.device("cuda"))
        out |= {"gflop_per_img": round(flops[0] / 1e9, 1), "device_name": torch.cuda.get_device_name()}
        if peak:
            out["mfu"] = round(ips * flops[0] / peak, 4)
    print(json.dumps(out), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
