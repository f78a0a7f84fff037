"""`encode-latents`: images + captions -> VAE moments (image and flip) and unpadded text embeddings, in shards.

`EncodeStage` is the stage; `pipeline.core.runner` plans, resumes, runs it (in this process or on Ray) and writes the
manifest. Each input tar shard becomes one output shard; loose image files are grouped `--shard-size` at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.core import storage
from pipeline.core.options import DeviceOption, ImageLimits, StageConfig, opt
from pipeline.core.schema import FORMAT, LATENT_SCHEMA, SCHEMA_VERSION
from pipeline.core.stage import Output, Reject, Stage, WorkUnit, quiet_hf
from pipeline.models.encoders import Encoders, f16_column

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir
from pipeline.io import inputs
from pipeline.io.decode import RejectError, center_crop_resize, decode_image
from pipeline.io.image_sources import BlobReader, JsonlIndex, Raw, input_folders, read_raws, unit_records

# Settings whose change changes the rows: a resume refuses to mix shards made with different values.
CONTENT_KEYS = ("vae", "text_encoder", "resolution", "max_text_len", "dtype", "max_pixels", "min_size")


@dataclass
class EncodeConfig(DeviceOption, ImageLimits, StageConfig):
    """Everything `encode-latents` needs; written, resolved, into the manifest (bases: shared option groups,
    `StageConfig` last so that its fields come first)."""

    shared_defaults = {
        "batch_size": (32, "Images per encoder call."),
        "shard_size": (1000, "Loose image files per output shard (each input .tar is one output shard)."),
    }

    vae: str = opt("pixel", "'pixel' (ShapesWorld) or a diffusers AutoencoderKL directory (a path or a URI).")
    text_encoder: str = opt("minilm", "'minilm' or a transformers encoder directory (T5, BERT; a path or a URI).")
    resolution: int = opt(256, "Side of the center-cropped square image, in pixels.")
    max_text_len: int = opt(128, "Text tokens kept per caption (longer captions are truncated).")
    dtype: str = opt("float32", "Encoder compute dtype: float32, bfloat16, float16 (storage is 16-bit).")


def _check_spec(kind: str, spec: str, builtin: str) -> None:
    """A model spec is the built-in name or an existing directory (local or a URI)."""
    if spec != builtin and not storage.is_dir(spec):
        flag = "--vae" if kind == "vae" else "--text-encoder"
        what = "diffusers AutoencoderKL" if kind == "vae" else "transformers encoder"
        raise ValueError(
            f"unknown {flag} {storage.public(spec)!r}: expected {builtin!r} or a {what} directory (local or a URI)"
        )


def validate(cfg: EncodeConfig) -> None:
    """Check a config up front, with errors that name the bad value."""
    _check_spec("vae", cfg.vae, "pixel")
    _check_spec("text", cfg.text_encoder, "minilm")
    for name in ("resolution", "max_text_len", "max_pixels", "min_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
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

    configs = storage.local_copy(spec, files=("config.json", "vae/config.json"))  # no weights fetched
    config = json.loads((find_vae_dir(configs) / "config.json").read_text())
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)  # one downsampler per block but the last


# ---------------------------------------------------------------------------------------------------- the stage


def _reject(rec: Raw, reason: str, detail: str) -> Reject:
    """A rejected input record."""
    return Reject(rec.id, rec.source, reason, detail)


class EncodeStage(Stage):
    """Stage: records -> rows of `LATENT_SCHEMA`. Loads the image tokenizer and text encoder once per worker."""

    name = "encode-latents"
    help = "VAE moments (image + flip) and unpadded text embeddings, 16-bit, into Parquet training shards."
    config = EncodeConfig
    format = FORMAT
    schema_version = SCHEMA_VERSION
    schema = LATENT_SCHEMA
    dictionary_columns = ("vae", "text_encoder", "resolution", "text_len")
    cfg: EncodeConfig

    def validate(self) -> None:
        """Check the settings up front (no weights loaded)."""
        validate(self.cfg)

    def content(self) -> dict[str, Any]:
        """The settings that determine the rows (local model specs resolved to absolute paths, URIs public)."""
        out = {k: getattr(self.cfg, k) for k in CONTENT_KEYS}
        for k in ("vae", "text_encoder"):
            if storage.is_uri(out[k]):
                out[k] = storage.public(out[k])
            elif Path(out[k]).exists():
                out[k] = str(Path(out[k]).resolve())
        return {**out, "schema_version": SCHEMA_VERSION}

    def plan(self) -> list[WorkUnit]:
        """One unit per input tar, and one per `--shard-size` loose images."""
        files = inputs.expand(self.cfg.inputs, keep=inputs.is_tar_or_image)
        if not files:
            raise ValueError(f"no .tar shards or images found in inputs: {list(self.cfg.inputs)}")
        return inputs.plan_units(files, self.cfg.shard_size)

    def setup(self) -> None:
        """Load the image tokenizer and the text encoder."""
        import torch

        from lightgen_model.encoders import resolve_device

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        quiet_hf()
        vae, text = storage.local_copy(cfg.vae), storage.local_copy(cfg.text_encoder)  # remote folders: cached copies
        enc = Encoders(vae, text, resolve_device(cfg.device), cfg.dtype, cfg.max_text_len, cfg.resolution)
        self.encoders, self.tokenizer, self.text, self.moments_shape = enc, enc.tokenizer, enc.text, enc.moments_shape
        self.reader = BlobReader()
        self.folders = input_folders(cfg.inputs)
        self.jsonl = JsonlIndex()  # captions.jsonl files are read once per worker, not once per unit

    def shard_meta(self) -> dict[str, Any]:
        """What made the shards: encoder names and shapes (the trainer checks them)."""
        return self.encoders.meta()

    def read(self, unit: WorkUnit) -> Iterator[tuple[Raw, np.ndarray] | Reject]:
        """(record, (R, R, 3) uint8 image) per readable record; a `Reject` with the first problem otherwise."""
        for raw in read_raws(unit_records(unit, self.folders, self.jsonl), self.reader):
            if isinstance(raw, Reject):
                yield raw
                continue
            try:
                img = decode_image(raw.image, max_pixels=self.cfg.max_pixels, min_size=self.cfg.min_size)
            except RejectError as e:
                yield Reject(raw.id, raw.source, e.reason, str(e))
                continue
            yield raw, center_crop_resize(img, self.cfg.resolution)

    def process(self, items: Sequence[tuple[Raw, np.ndarray]]) -> Output:
        """Encode a batch; non-finite outputs become rejects."""
        import torch

        from lightgen_model.encoders import encode_with_flip

        pixels = torch.from_numpy(np.stack([it[1] for it in items])).permute(0, 3, 1, 2)  # (B, 3, R, R) uint8
        moments, flipped = encode_with_flip(self.tokenizer, pixels.float() / 127.5 - 1.0)
        # Cast before the finiteness check: values beyond float16's range become inf and must be caught too.
        m16 = moments.numpy().astype(np.float16)  # (B, 2C, h, w)
        f16 = flipped.numpy().astype(np.float16)
        texts = self.text([it[0].caption for it in items])
        keep, rejects = [], []
        for i, (rec, _) in enumerate(items):
            if not (np.isfinite(m16[i]).all() and np.isfinite(f16[i]).all()):
                rejects.append(_reject(rec, "nonfinite_latent", "VAE moments contain NaN or inf"))
            elif not np.isfinite(texts[i]).all():
                rejects.append(_reject(rec, "nonfinite_text", "text embedding contains NaN or inf"))
            else:
                keep.append(i)
        rows = self._table([items[i] for i in keep], m16[keep], f16[keep], [texts[i] for i in keep])
        return Output(rows, rejects)

    def _table(self, good: Sequence[tuple], m16: np.ndarray, f16: np.ndarray, texts: list[np.ndarray]) -> pa.Table:
        """Assemble kept rows into a table with `LATENT_SCHEMA`."""
        columns = self.encoders.columns([g[0].id for g in good], [g[0].caption for g in good], texts)
        columns.update(moments=f16_column(list(m16)), moments_flip=f16_column(list(f16)))
        return pa.table({f.name: columns[f.name] for f in LATENT_SCHEMA}, schema=LATENT_SCHEMA)

    def report(self, counts: dict[str, Any]) -> dict[str, Any]:
        """`rows_per_s`: encoded inputs per second of this run."""
        return {"rows_per_s": counts["inputs_per_s"]}

    @classmethod
    def dry_run(cls, cfg: EncodeConfig) -> dict[str, Any]:
        """The image tokenizer and text encoder at full size on the meta device, one batch."""
        from pipeline.core.dryrun import dry_encode

        return dry_encode(cfg)

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """Decoded round trips (image and flip) of sampled rows."""
        from pipeline.inspect.media import latents_section

        return latents_section(folder, limit, seed, vae)
