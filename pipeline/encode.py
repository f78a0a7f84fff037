"""`encode-latents`: images + captions -> VAE moments (image and flip) and unpadded text embeddings, in shards.

`LatentEncoder` is the stage: it loads the image tokenizer and the text encoder once per worker and turns a
shard task (a list of input records) into one shard file plus its rejects. `run_encode_latents(cfg)` lists the
inputs, cuts them into shards by position, skips the shards a previous run finished, maps the stage over the
rest (in process or on Ray, see `runtime.py`), then writes `rejects.parquet`, `manifest.json` and `report.json`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import shards
from pipeline.images import RejectError, center_crop_resize, decode_image
from pipeline.schema import FORMAT, LATENT_SCHEMA, SCHEMA_VERSION, IncompatibleShardsError
from pipeline.sources import BlobReader, Record, list_records, parse_caption

# Settings whose change changes the rows: a resume refuses to mix shards made with different values.
CONTENT_KEYS = ("vae", "text_encoder", "resolution", "max_text_len", "dtype", "max_pixels", "min_size", "shard_size")


@dataclass
class EncodeConfig:
    """Everything `encode-latents` needs; written, resolved, into the manifest."""

    inputs: list[str]
    output: str
    vae: str = "pixel"
    text_encoder: str = "minilm"
    resolution: int = 256
    max_text_len: int = 128
    batch_size: int = 32
    shard_size: int = 1000
    workers: int = 1
    gpus_per_worker: float | None = None
    device: str = "auto"
    dtype: str = "float32"
    ray_address: str | None = None
    seed: int = 0
    overwrite: bool = False
    max_pixels: int = 64_000_000
    min_size: int = 32
    progress: bool = False

    def content(self) -> dict[str, Any]:
        """The settings that determine the shards' content (model specs resolved to absolute paths)."""
        out = {k: getattr(self, k) for k in CONTENT_KEYS}
        for k in ("vae", "text_encoder"):
            if Path(out[k]).exists():
                out[k] = str(Path(out[k]).resolve())
        return {**out, "schema_version": SCHEMA_VERSION}


def _check_spec(kind: str, spec: str, builtin: str) -> None:
    """A model spec is the built-in name or an existing local directory."""
    if spec != builtin and not Path(spec).is_dir():
        flag = "--vae" if kind == "vae" else "--text-encoder"
        what = "diffusers AutoencoderKL" if kind == "vae" else "transformers encoder"
        raise ValueError(f"unknown {flag} {spec!r}: expected {builtin!r} or a local {what} directory")


def validate(cfg: EncodeConfig) -> None:
    """Check a config up front, with errors that name the bad value."""
    _check_spec("vae", cfg.vae, "pixel")
    _check_spec("text", cfg.text_encoder, "minilm")
    for name in ("resolution", "max_text_len", "batch_size", "shard_size", "max_pixels", "min_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = no Ray), got {cfg.workers}")
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown --dtype {cfg.dtype!r}: expected float32, float16 or bfloat16")
    if cfg.device != "auto" and cfg.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown --device {cfg.device!r}: expected auto, cpu, cuda[:N] or mps")
    stride = _vae_stride(cfg.vae)
    if cfg.resolution % stride:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the VAE's stride {stride}")


def _vae_stride(spec: str) -> int:
    """Downsampling factor of an image tokenizer, read from its config (no weights loaded)."""
    if spec == "pixel":
        return 1
    from lightgen_model.encoders import find_vae_dir

    config = json.loads((find_vae_dir(spec) / "config.json").read_text())
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)  # one downsampler per block but the last


# ---------------------------------------------------------------------------------------------------- the stage


def _quiet_hf() -> None:
    """No per-worker "Loading weights" bars from transformers: the run shows one progress bar, over shards."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _reject(rec: Record, reason: str, detail: str) -> dict[str, str]:
    """A rejects-file row."""
    return {"id": rec.id, "source": rec.source, "reason": reason, "detail": detail}


def _list_column(arrays: Sequence[np.ndarray]) -> pa.LargeListArray:
    """Flattened float16 arrays -> a large_list<float16> column without copying per row."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float16)
    offsets = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float16), pa.float16()))


class LatentEncoder:
    """Stage: shard tasks -> shard files. Loads the image tokenizer and text encoder once per worker.

    `__call__` takes a column batch of tasks {shard, input_digest, records (JSON)} and returns one summary row
    per shard. `encode(records, reader)` is the pure part: records -> (rows table, rejects).
    """

    def __init__(
        self,
        output: str,
        vae: str,
        text_encoder: str,
        resolution: int,
        max_text_len: int,
        batch_size: int,
        max_pixels: int,
        min_size: int,
        device: str,
        dtype: str,
        seed: int,
        config_digest: str,
    ) -> None:
        import torch

        from lightgen_model.encoders import build_image_tokenizer, build_text_encoder

        torch.manual_seed(seed)
        _quiet_hf()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.output, self.resolution, self.batch_size = Path(output), resolution, batch_size
        self.max_pixels, self.min_size, self.config_digest = max_pixels, min_size, config_digest
        self.tokenizer = build_image_tokenizer(vae, device=device, dtype=dtype)
        self.text = build_text_encoder(text_encoder, device=device, dtype=dtype, max_len=max_text_len)
        if resolution % self.tokenizer.stride:
            raise ValueError(f"--resolution {resolution} is not a multiple of the VAE stride {self.tokenizer.stride}")
        side = resolution // self.tokenizer.stride
        self.moments_shape = [2 * self.tokenizer.latent_channels, side, side]

    def meta(self, input_digest: str) -> dict[str, Any]:
        """The JSON metadata a shard carries: what made it and from what."""
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "vae": self.tokenizer.name,
            "text_encoder": self.text.name,
            "text_dim": self.text.dim,
            "max_text_len": self.text.max_len,
            "resolution": self.resolution,
            "moments_shape": self.moments_shape,
            "input_digest": input_digest,
            "config_digest": self.config_digest,
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Encode each shard task of the batch into its shard file; one summary row per shard."""
        out: dict[str, list] = {"index": [], "rows": [], "rejected": [], "bytes": [], "sha256": [], "name": []}
        for index, input_digest, records in zip(batch["shard"], batch["input_digest"], batch["records"], strict=True):
            recs = [Record.from_json(r) for r in json.loads(str(records))]
            result = self.encode_shard(int(index), str(input_digest), recs)
            for key, value in result.to_dict().items():
                out[key].append(value)
        return out

    def encode_shard(self, index: int, input_digest: str, records: list[Record]) -> shards.ShardResult:
        """Encode `records` in batches into shard `index` (written atomically with its rejects)."""
        rejects: list[dict[str, str]] = []
        with shards.ShardWriter(self.output, index, LATENT_SCHEMA, self.meta(input_digest)) as writer:
            with BlobReader() as reader:
                for start in range(0, len(records), self.batch_size):
                    table, bad = self.encode(records[start : start + self.batch_size], reader)
                    writer.write(table)
                    rejects.extend(bad)
            return writer.commit(shards.rejects_table(rejects))

    def _load(self, rec: Record, reader: BlobReader) -> tuple[str, np.ndarray]:
        """(caption, (R, R, 3) uint8 image) of a record, or `RejectError` with the first problem found."""
        if rec.error:
            reason, _, detail = rec.error.partition(": ")
            raise RejectError(reason, detail)
        if rec.image is None:
            raise RejectError("missing_image", "no image member for this key")
        if rec.caption is None:
            raise RejectError("missing_caption", "no .json/.txt caption for this image")
        caption = parse_caption(reader.read(rec.caption), rec.caption_kind)
        img = decode_image(reader.read(rec.image), max_pixels=self.max_pixels, min_size=self.min_size)
        return caption, center_crop_resize(img, self.resolution)

    def encode(self, records: Sequence[Record], reader: BlobReader) -> tuple[pa.Table, list[dict[str, str]]]:
        """Records -> (rows in `LATENT_SCHEMA`, rejects); bad inputs and non-finite outputs become rejects."""
        import torch

        from lightgen_model.encoders import encode_with_flip

        good: list[tuple[Record, str, np.ndarray]] = []
        rejects = []
        for rec in records:
            try:
                good.append((rec, *self._load(rec, reader)))
            except RejectError as e:
                rejects.append(_reject(rec, e.reason, str(e)))
            except OSError as e:  # an input file vanished or cannot be read: that input is lost, not the run
                rejects.append(_reject(rec, "read_error", f"{type(e).__name__}: {e}"))
        if not good:
            return LATENT_SCHEMA.empty_table(), rejects
        pixels = torch.from_numpy(np.stack([g[2] for g in good])).permute(0, 3, 1, 2)  # (B, 3, R, R) uint8
        moments, flipped = encode_with_flip(self.tokenizer, pixels.float() / 127.5 - 1.0)
        # Cast before the finiteness check: values beyond float16's range become inf and must be caught too.
        m16 = moments.numpy().astype(np.float16)  # (B, 2C, h, w)
        f16 = flipped.numpy().astype(np.float16)
        texts = self.text([g[1] for g in good])
        keep = []
        for i, (rec, _, _) in enumerate(good):
            if not (np.isfinite(m16[i]).all() and np.isfinite(f16[i]).all()):
                rejects.append(_reject(rec, "nonfinite_latent", "VAE moments contain NaN or inf"))
            elif not np.isfinite(texts[i]).all():
                rejects.append(_reject(rec, "nonfinite_text", "text embedding contains NaN or inf"))
            else:
                keep.append(i)
        return self._table([good[i] for i in keep], m16[keep], f16[keep], [texts[i] for i in keep]), rejects

    def _table(self, good, m16: np.ndarray, f16: np.ndarray, texts: list[np.ndarray]) -> pa.Table:
        """Assemble kept rows into a table with `LATENT_SCHEMA`."""
        n = len(good)
        columns = {
            "id": pa.array([g[0].id for g in good], pa.string()),
            "caption": pa.array([g[1] for g in good], pa.string()),
            "resolution": pa.array([self.resolution] * n, pa.int32()),
            "moments_shape": pa.array([self.moments_shape] * n, pa.list_(pa.int32(), 3)),
            "moments": _list_column(list(m16)),
            "moments_flip": _list_column(list(f16)),
            "text_len": pa.array([t.shape[0] for t in texts], pa.int32()),
            "text_emb": _list_column(texts),
            "vae": pa.array([self.tokenizer.name] * n, pa.string()),
            "text_encoder": pa.array([self.text.name] * n, pa.string()),
        }
        return pa.table(columns, schema=LATENT_SCHEMA)


# ------------------------------------------------------------------------------------------------------ the run


def shard_tasks(records: Sequence[Record], shard_size: int) -> list[dict[str, Any]]:
    """One task per shard: records at positions [k * shard_size, (k + 1) * shard_size) go to shard k."""
    tasks = []
    for k, span in enumerate(shards.plan_shards(len(records), shard_size)):
        recs = [records[i].to_json() for i in span]
        tasks.append({"shard": k, "input_digest": shards.digest(recs), "records": json.dumps(recs)})
    return tasks


def _resume_state(out: Path, cfg: EncodeConfig, tasks: list[dict[str, Any]], config_digest: str) -> set[int]:
    """Prepare `out` for the run and return the indices of shards a previous run already finished.

    `--overwrite` deletes all earlier outputs. Otherwise shards made with another config are an error, shards of
    other inputs (the input set changed) are redone, and shards beyond the new shard count are deleted.
    """
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        shards.remove_outputs(out)
    shards.clean_temporaries(out)
    done = set()
    for index in shards.shard_indices(out):
        meta = shards.complete_shard_meta(out, index)
        if meta is None or index >= len(tasks):
            continue  # unreadable (redone below) or stale (deleted below)
        if meta.get("config_digest") != config_digest:
            raise ValueError(
                f"{out} holds shards made with other settings (e.g. {shards.shard_name(index)}); "
                "pass --overwrite to replace them or choose another --output"
            )
        if meta.get("input_digest") == tasks[index]["input_digest"]:
            done.add(index)
    shards.remove_outputs(out, keep_below=len(tasks))
    return done


def _encoder_names(out: Path, n_shards: int) -> dict[str, Any]:
    """Encoder names and shapes from the shards' metadata; they must agree across shards."""
    metas = [shards.complete_shard_meta(out, i) or {} for i in range(n_shards)]
    keys = ("vae", "text_encoder", "text_dim", "max_text_len", "moments_shape")
    seen = {json.dumps({k: m.get(k) for k in keys}, sort_keys=True) for m in metas}
    if len(seen) > 1:
        raise IncompatibleShardsError(f"shards in {out} disagree on their encoders: {sorted(seen)}")
    return json.loads(seen.pop()) if seen else {}


def _report(out: Path, n_shards: int, skipped: int, encoded_rows: int, seconds: float) -> dict[str, Any]:
    """Merge the rejects and compute the run's counts; `in = written + rejected` holds by construction."""
    rejects = shards.merge_rejects(out, range(n_shards))
    written = sum(shards.shard_result(out, i).rows for i in range(n_shards))
    reasons = Counter(rejects.column("reason").to_pylist())
    return {
        "inputs": written + len(rejects),
        "written": written,
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "shards": n_shards,
        "shards_skipped": skipped,
        "shards_encoded": n_shards - skipped,
        "rows_encoded_this_run": encoded_rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(encoded_rows / seconds, 3) if seconds > 0 else None,
    }


def _header(cfg: EncodeConfig, config_digest: str, n_shards: int) -> dict[str, Any]:
    """The manifest's fixed part: format, versions, the resolved config."""
    config = asdict(cfg)
    config.update(
        cfg.content(), inputs=[str(Path(p).resolve()) for p in cfg.inputs], output=str(Path(cfg.output).resolve())
    )
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "stage": "encode-latents",
        "code_version": shards.code_version(),
        "config": config,
        "config_digest": config_digest,
        "n_shards": n_shards,
    }


def _stage_kwargs(cfg: EncodeConfig, config_digest: str) -> dict[str, Any]:
    """Constructor arguments of `LatentEncoder` (plain values: they travel to Ray workers)."""
    names = ("output", "vae", "text_encoder", "resolution", "max_text_len", "batch_size", "max_pixels", "min_size")
    kwargs = {k: getattr(cfg, k) for k in (*names, "device", "dtype", "seed")}
    return {**kwargs, "output": str(cfg.output), "config_digest": config_digest}


def run_encode_latents(
    cfg: EncodeConfig, on_shard: Callable[[shards.ShardResult], None] | None = None
) -> dict[str, Any]:
    """Run the stage end to end (resuming unless `cfg.overwrite`); returns the report also written to disk.

    `on_shard` is called with each shard this run finishes, as it lands (progress displays, benchmarks).
    """
    from pipeline import runtime

    t0 = time.perf_counter()
    # 1. Check the settings and list every input record in a fixed order.
    validate(cfg)
    records = list_records(cfg.inputs)
    # 2. Cut them into shards by position; keep what a previous run finished.
    out = Path(cfg.output)
    tasks = shard_tasks(records, cfg.shard_size)
    config_digest = shards.digest(cfg.content())
    done = _resume_state(out, cfg, tasks, config_digest)
    manifest = shards.ManifestWriter(out, _header(cfg, config_digest, len(tasks)))
    previous = manifest.previous_entries()
    for index in sorted(done):
        manifest.add(shards.shard_result(out, index, previous.get(shards.shard_name(index))), write=False)
    manifest.write()
    # 3. Encode the pending shards, in this process (workers=0) or on a Ray actor pool; record each as it lands.
    pending = [t for t in tasks if t["shard"] not in done]
    encoded_rows = 0
    with runtime.ray_session(cfg.ray_address, enabled=cfg.workers > 0 and bool(pending)):
        rows = runtime.map_stage(
            LatentEncoder,
            pending,
            constructor_kwargs=_stage_kwargs(cfg, config_digest),
            workers=cfg.workers,
            gpus_per_worker=cfg.gpus_per_worker,
            address=cfg.ray_address,
        )
        for row in _progress(rows, len(pending), cfg.progress):
            result = shards.ShardResult(**{k: _plain(v) for k, v in row.items()})
            manifest.add(result)
            encoded_rows += result.rows
            if on_shard is not None:
                on_shard(result)
    # 4. Merge the rejects; write the report and the final manifest.
    report = _report(out, len(tasks), len(done), encoded_rows, time.perf_counter() - t0)
    shards.write_json_atomic(out / shards.REPORT, report)
    manifest.write(complete=True, **_encoder_names(out, len(tasks)), resolution=cfg.resolution)
    return report


def _plain(value: Any) -> Any:
    """numpy scalars (as Ray returns them) -> Python values."""
    return value.item() if isinstance(value, np.generic) else value


def _progress(rows, total: int, enabled: bool):
    """Wrap an iterator of finished shards in a tqdm bar when `enabled`."""
    if not enabled:
        return rows
    from tqdm import tqdm

    return tqdm(rows, total=total, unit="shard", desc="encode-latents")
