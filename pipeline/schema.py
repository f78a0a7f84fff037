"""Arrow schemas and the manifest format of the training shards: the contract between pipeline and trainer.

This is the only pipeline module the trainer imports; it needs pyarrow and numpy, nothing else.

A training-shard directory holds `part-00000.parquet`, `part-00001.parquet`, ... (Parquet, zstd), their
per-shard rejects `part-NNNNN.rejects.parquet`, the merged `rejects.parquet`, `report.json` and `manifest.json`.
One row per image, readable with plain pyarrow (`pyarrow.parquet.read_table`):

| column | type | meaning |
| --- | --- | --- |
| id | string | stable input id, `<source path without suffix>/<key>` |
| caption | string | the caption as read (stripped) |
| resolution | int32 | side of the center-cropped square image in pixels |
| moments_shape | fixed_size_list<int32>[3] | (2C, h, w) of `moments` and `moments_flip` |
| moments | large_list<float16> | posterior moments of the image, flattened row-major from (2C, h, w): channels
  0..C-1 are the normalised mean `(mean - shift) * scale`, channels C..2C-1 the log-variance `logvar + 2 log scale` |
| moments_flip | large_list<float16> | the same for the horizontally flipped image |
| text_len | int32 | number of text tokens L (no padding stored) |
| text_emb | large_list<float16> | last hidden states, flattened row-major from (L, D); D = len / L |
| vae | string | name of the image tokenizer that made the moments |
| text_encoder | string | name of the text encoder that made `text_emb` |

Example without this package: `m = np.asarray(t["moments"][i].values).reshape(t["moments_shape"][i].as_py())`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
FORMAT = "lightgen-latents"
MANIFEST = "manifest.json"
METADATA_KEY = b"lightgen"  # Parquet/Arrow schema metadata key holding a JSON object per shard

LATENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("moments_shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("moments", pa.large_list(pa.float16()), nullable=False),
        pa.field("moments_flip", pa.large_list(pa.float16()), nullable=False),
        pa.field("text_len", pa.int32(), nullable=False),
        pa.field("text_emb", pa.large_list(pa.float16()), nullable=False),
        pa.field("vae", pa.string(), nullable=False),
        pa.field("text_encoder", pa.string(), nullable=False),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)

# Parquet leaf columns holding float16 values: byte-stream-split makes their exponent bytes compressible.
FLOAT16_COLUMNS = ("moments.list.element", "moments_flip.list.element", "text_emb.list.element")


class IncompatibleShardsError(ValueError):
    """Shards that were made by other encoders, another schema version, or are incomplete."""


def with_metadata(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    """`schema` carrying `meta` as JSON under `METADATA_KEY`."""
    return schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def shard_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The JSON object a shard's schema carries under `METADATA_KEY` ({} when absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read `<directory>/manifest.json`; a clear error when it is missing or not a LightGen latents manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a training-shard directory, or the run never began")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleShardsError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise IncompatibleShardsError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_compatible(
    manifest: dict[str, Any],
    *,
    vae: str | None = None,
    text_encoder: str | None = None,
    schema_version: int = SCHEMA_VERSION,
    require_complete: bool = True,
) -> None:
    """Raise `IncompatibleShardsError` naming each mismatch: schema version, encoder names, unfinished run.

    `vae` / `text_encoder` are the names the trainer expects (`None` skips that check); they are the `name`
    attributes of the pipeline's encoders, e.g. "pixel", "minilm", "<model dir>-<config hash>".
    """
    problems = []
    if manifest.get("schema_version") != schema_version:
        problems.append(f"schema version {manifest.get('schema_version')!r} != expected {schema_version!r}")
    if vae is not None and manifest.get("vae") != vae:
        problems.append(f"vae {manifest.get('vae')!r} != expected {vae!r}")
    if text_encoder is not None and manifest.get("text_encoder") != text_encoder:
        problems.append(f"text encoder {manifest.get('text_encoder')!r} != expected {text_encoder!r}")
    if require_complete and not manifest.get("complete"):
        problems.append("the run that wrote these shards has not finished (rerun encode-latents to resume it)")
    if problems:
        raise IncompatibleShardsError("incompatible training shards: " + "; ".join(problems))


def training_shards(
    directory: str | Path,
    *,
    vae: str | None = None,
    text_encoder: str | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> tuple[dict[str, Any], list[Path]]:
    """Validate a shard directory for training: (manifest, shard paths in order) or `IncompatibleShardsError`."""
    manifest = load_manifest(directory)
    check_compatible(manifest, vae=vae, text_encoder=text_encoder, schema_version=schema_version)
    paths = [Path(directory) / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise IncompatibleShardsError(f"shards listed in the manifest are missing: {missing[:5]}")
    return manifest, paths


def moments_array(table: pa.Table, column: str = "moments") -> np.ndarray:
    """The `moments` (or `moments_flip`) column as one (B, 2C, h, w) float16 array (all rows share a shape)."""
    shapes = table.column("moments_shape").combine_chunks()
    shape = shapes[0].as_py() if len(table) else [0, 0, 0]
    values = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if values.size != len(table) * int(np.prod(shape)):
        raise IncompatibleShardsError(f"rows of {column!r} do not all have shape {shape}")
    return values.reshape(len(table), *shape)


def text_arrays(table: pa.Table) -> list[np.ndarray]:
    """The `text_emb` column as one (L_i, D) float16 array per row, unpadded."""
    lengths = table.column("text_len").to_numpy()
    col = table.column("text_emb").combine_chunks()
    out = []
    for i, n in enumerate(lengths):
        values = col[i].values.to_numpy(zero_copy_only=False)
        out.append(values.reshape(int(n), -1))
    return out
