"""The trainer's data loader reading from an S3 endpoint vs the local disk, beside the trainer's step rate.

    python bench/loader_bench.py --preset shapes --rows 4096 --shard-rows 256     # CPU, small
    python bench/loader_bench.py --preset lightgen --rows 8192 --shard-rows 512 --steps 0   # loader only

Writes random training shards of the preset's shapes (as bench/train_bench.py does), uploads them to moto's S3 server
(tests/s3_server.py: the real S3 HTTP protocol on 127.0.0.1, run in its own process so it does not share this
process's interpreter), and measures the loader (training/data.py: fetch, sha256, Parquet parse, posterior samples,
padded text) over one cold epoch, a fresh ShardSet each time, `--rounds` times, for: the local disk, s3:// without
read-ahead, s3:// with `--read-ahead` shards read ahead, and s3:// a second time through a warm `data.cache_dir`
(no fetch); the local disk with read-ahead too. `--fetch-delay` adds a latency to every fetch from s3:// (what
read-ahead hides). Then the trainer's images/s on the local shards (`--steps` timed steps after `--warmup`), and with
`--stall` the seconds per epoch a trainer at that rate would wait for its s3:// batches, read-ahead off and on. An
emulator on loopback measures the client's cost (HTTP, copies, the loader's threads), not a real store's latency or
bandwidth. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from bench._common import bench_parser  # noqa: E402
from bench.train_bench import write_random_shards  # noqa: E402
from lightgen_model import preset  # noqa: E402
from training.config import DataSection  # noqa: E402
from training.data import Loader, ShardSet, latent_batch  # noqa: E402
from training.dist import DistInfo  # noqa: E402
from training.sources import ShardCache  # noqa: E402


def make_loader(shards: ShardSet, args, read_ahead: int) -> Loader:
    """The trainer's loader over `shards` with the benchmark's batch, window, threads and read-ahead (rank 0 of 1)."""
    data = DataSection(
        batch_size=args.batch,
        shuffle_window=args.window,
        prefetch=2 * args.workers + 2,
        workers=args.workers,
        read_ahead=read_ahead,
    )
    return Loader(data, shards, lambda s, r, g: latent_batch(s, r, g, True), DistInfo(), 0)


def start_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server in a child process; (the process, the environment that reaches it)."""
    from s3_server import S3Server, free_port

    server = S3Server(free_port())
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT / 'tests')!r}); from s3_server import S3Server; "
        f"S3Server({server.port}).start(); time.sleep(1e9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(server.env())
    for _ in range(300):
        try:
            return proc, {"bucket": server.bucket()}
        except Exception:  # not listening yet
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start")


def delay_fetches(seconds: float) -> None:
    """Make every shard read from a URI take `seconds` longer (sleeping, as a thread waiting on a far store does)."""
    from pipeline.core import storage

    real = storage.read_bytes

    def slow(spec: str) -> bytes:
        if spec.endswith(".parquet"):
            time.sleep(seconds)
        return real(spec)

    storage.read_bytes = slow


def upload(local: Path, uri: str) -> str:
    import pyarrow.fs as pafs

    from pipeline.core import storage

    fs, path = storage.resolve(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def epoch_rate(source: str, args, *, read_ahead: int, cache: Path | None = None) -> float:
    """Rows per second of wall time over one epoch of a fresh ShardSet (every shard read once)."""
    shards = ShardSet([source], cache=ShardCache(cache, 10**12) if cache else None)
    loader = make_loader(shards, args, read_ahead)
    n, t0 = 0, time.time()
    it = iter(loader)
    for _ in range(loader.steps_per_epoch):
        n += next(it)["latents"].shape[0]
    rate = n / (time.time() - t0)
    it.close()
    return rate


def stall(source: str, args, *, read_ahead: int, step_s: float) -> float:
    """Seconds per epoch a trainer taking `step_s` per step (sleeping here) waits for its batches (first batch
    excluded: every run waits for it)."""
    shards = ShardSet([source])
    loader = make_loader(shards, args, read_ahead)
    it, waited = iter(loader), 0.0
    next(it)
    for _ in range(loader.steps_per_epoch - 1):
        time.sleep(step_s)
        t0 = time.time()
        next(it)
        waited += time.time() - t0
    it.close()
    return waited


def train_rate(local: Path, args) -> float:
    """The real trainer's images/s on the local shards (timed steps after the warm-up), no checkpoints."""
    from training.config import load_config
    from training.pretrain import PretrainTrainer

    times: list[float] = []

    class Timed(PretrainTrainer):
        def loss(self, model, batch):
            times.append(time.time())
            return super().loss(model, batch)

    out = Path(tempfile.mkdtemp(prefix="loader_bench_run_"))
    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            f"data.shards=[{local}]",
            f"data.batch_size={args.batch}",
            f"train.max_steps={args.steps + args.warmup}",
            "train.device=cpu",
            f"train.out_dir={out}",
            "checkpoint.every_steps=0",
            "log.sample_count=0",
            "log.tensorboard=false",
            "log.progress=false",
            f"log.every={args.steps + args.warmup}",
        ],
    )
    trainer = Timed(cfg)
    trainer.save_checkpoint = lambda *a, **k: None
    trainer.export = lambda *a, **k: None
    trainer.run()
    shutil.rmtree(out, ignore_errors=True)
    timed = times[-args.steps - 1 :]
    return args.batch * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> None:
    p = bench_parser(__doc__, preset="shapes", device="cpu", batch=64, warmup=5, steps=30)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--text-len", type=int, default=12)
    p.add_argument("--window", type=int, default=8, help="data.shuffle_window")
    p.add_argument("--workers", type=int, default=1, help="data.workers")
    p.add_argument("--read-ahead", type=int, default=2, help="data.read_ahead of the read-ahead run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--fetch-delay",
        type=float,
        default=0.0,
        help="seconds added to every shard fetched from s3:// (a store's latency, which loopback lacks)",
    )
    p.add_argument(
        "--stall",
        action="store_true",
        help="also: seconds per epoch a trainer at the measured rate waits for s3 batches, read-ahead off/on",
    )
    p.add_argument("--stall-img-per-s", type=float, default=150.0, help="--stall's trainer rate when --steps 0")
    args = p.parse_args()
    if args.fetch_delay:
        delay_fetches(args.fetch_delay)
    mcfg = preset(args.preset)
    res, grid = mcfg.base_resolution, mcfg.base_resolution // mcfg.vae_stride
    tmp = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    proc = None
    try:
        local = write_random_shards(
            tmp / "shards",
            args.rows,
            mcfg.latent_channels,
            grid,
            mcfg.text_dim,
            args.text_len,
            res,
            shard_rows=args.shard_rows,
        )
        proc, made = start_server()
        s3 = upload(local, made["bucket"] + "/latents")
        runs: dict[str, list[float]] = {
            "local": [],
            "local_read_ahead": [],
            "s3": [],
            "s3_read_ahead": [],
            "s3_cached": [],
        }
        for k in range(args.rounds):
            runs["local"].append(epoch_rate(str(local), args, read_ahead=0))
            runs["local_read_ahead"].append(epoch_rate(str(local), args, read_ahead=args.read_ahead))
            runs["s3"].append(epoch_rate(s3, args, read_ahead=0))
            runs["s3_read_ahead"].append(epoch_rate(s3, args, read_ahead=args.read_ahead))
            cache = tmp / f"cache{k}"
            epoch_rate(s3, args, read_ahead=args.read_ahead, cache=cache)  # fills it
            runs["s3_cached"].append(epoch_rate(s3, args, read_ahead=args.read_ahead, cache=cache))
        out = {
            "preset": args.preset,
            "batch": args.batch,
            "rows": args.rows,
            "shard_rows": args.shard_rows,
            "shard_mb": round(
                sum(f.stat().st_size for f in local.glob("part-*.parquet"))
                / 1e6
                / len(list(local.glob("part-*.parquet"))),
                2,
            ),
            "window": args.window,
            "workers": args.workers,
            "read_ahead": args.read_ahead,
            "fetch_delay_s": args.fetch_delay,
            **{f"loader_rows_per_s_{k}": round(float(np.median(v)), 1) for k, v in runs.items()},
            "rounds": {k: [round(x) for x in v] for k, v in runs.items()},
        }
        if args.steps:
            out["train_img_per_s"] = round(train_rate(local, args), 2)
        if args.stall:  # an epoch consumed at the trainer's rate: the time it waits for s3 batches
            step_s = args.batch / out.get("train_img_per_s", args.stall_img_per_s)
            out["stall_step_s"] = round(step_s, 3)
            for ra in (0, args.read_ahead):
                out[f"stall_s_per_epoch_s3_read_ahead_{ra}"] = round(stall(s3, args, read_ahead=ra, step_s=step_s), 2)
        out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(out), flush=True)
    finally:
        if proc is not None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
