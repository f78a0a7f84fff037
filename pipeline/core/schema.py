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

DPO pair shards (`build-dpo-pairs`, manifest `format` "lightgen-dpo-pairs", validated by `pair_shards`) use the same
layout and encodings with one row per (winner, loser) pair: id, caption, resolution, moments_shape, text_len,
text_emb, vae and text_encoder as above; `winner_moments` / `winner_moments_flip` (the kept source image) and
`loser_moments` / `loser_moments_flip` (the image the current model drew for the caption), made by the same image
tokenizer code as `moments`; `judge` (backend and model), `judge_answer` (raw text), `judge_score` (in [0, 1]),
`loser_model` (weights file : its sha256 @ config hash, the same wherever the checkpoint lives), `loser_seed`, `sampling` (the sampling settings as JSON), and
`loser_judge_answer` / `loser_judge_score` (the judge on the loser with `--judge-losers`, else null).
`moments_array(table, "winner_moments")` etc. read them. Its judge stage leaves `judgements/` beside the pair shards
(manifest `format` "lightgen-judgements", `JUDGEMENT_SCHEMA`): one row per image the judge saw, with the image's
bytes, its metadata (JSON, null when it had none), the raw answer, the score and whether it was kept.
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


def _encoded_row(moments_columns: tuple[str, ...]) -> list[pa.Field]:
    """The fields of a row of encoded images with its caption (training rows and DPO pairs share them)."""
    f16 = pa.large_list(pa.float16())
    return [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("moments_shape", pa.list_(pa.int32(), 3), nullable=False),
        *[pa.field(name, f16, nullable=False) for name in moments_columns],
        pa.field("text_len", pa.int32(), nullable=False),
        pa.field("text_emb", f16, nullable=False),
        pa.field("vae", pa.string(), nullable=False),
        pa.field("text_encoder", pa.string(), nullable=False),
    ]


LATENT_SCHEMA = pa.schema(_encoded_row(("moments", "moments_flip")))

REJECT_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=False) for name in ("id", "source", "reason", "detail")]
)

# ---- DPO pair shards (`build-dpo-pairs`) ----
PAIR_SCHEMA_VERSION = 2  # 2: loser_judge_answer, loser_judge_score
PAIR_FORMAT = "lightgen-dpo-pairs"
# The four moments columns of a pair row, each shaped like `moments_shape` (read them with `moments_array`).
PAIR_MOMENTS_COLUMNS = ("winner_moments", "winner_moments_flip", "loser_moments", "loser_moments_flip")

PAIR_SCHEMA = pa.schema(
    [
        *_encoded_row(PAIR_MOMENTS_COLUMNS),
        *(pa.field(name, pa.string(), nullable=False) for name in ("judge", "judge_answer")),
        pa.field("judge_score", pa.float32(), nullable=False),
        pa.field("loser_model", pa.string(), nullable=False),
        pa.field("loser_seed", pa.int64(), nullable=False),
        pa.field("sampling", pa.string(), nullable=False),
        pa.field("loser_judge_answer", pa.string()),  # raw text; null unless --judge-losers
        pa.field("loser_judge_score", pa.float32()),  # in [0, 1], below judge_score; null unless --judge-losers
    ]
)

# ---- judgement shards (`build-dpo-pairs`' judge stage, in `<pairs output>/judgements/`) ----
JUDGEMENT_SCHEMA_VERSION = 2  # 2: metadata
JUDGEMENT_FORMAT = "lightgen-judgements"

# One row per image the judge saw (kept or not); inputs screened out before the judge are rejects instead.
JUDGEMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        # where the image was read (file, tar, Parquet row), relative to the inputs' common folder (manifest's config)
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("metadata", pa.string()),  # the input's GenEval metadata as JSON (the shapes judge), else null
        pa.field("image", pa.binary(), nullable=False),  # the image file's bytes as read (the pairs stage's winner)
        pa.field("aesthetic", pa.float32()),  # the input's aesthetic score, if it had one
        pa.field("judge", pa.string(), nullable=False),  # backend and model
        pa.field("judge_answer", pa.string(), nullable=False),  # raw text
        pa.field("judge_score", pa.float32()),  # in [0, 1]; null when the answer does not parse
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # "" when kept, else judge_rejected / judge_unparseable
        pa.field("detail", pa.string(), nullable=False),
    ]
)


Name = str | None  # an encoder name a reader expects; None: any


class IncompatibleShardsError(ValueError):
    """Shards that were made by other encoders, another schema version, or are incomplete."""


def with_metadata(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    """`schema` carrying `meta` as JSON under `METADATA_KEY`."""
    return schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def shard_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The JSON object a shard's schema carries under `METADATA_KEY` ({} when absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_manifest(directory: str | Path, formats: tuple[str, ...], what: str) -> dict[str, Any]:
    """Read `<directory>/manifest.json` (a local folder or a URI) and check that its `format` is one of `formats`;
    `what` names the directory kind in errors (FileNotFoundError when there is none, IncompatibleShardsError
    otherwise). Errors name URIs without credentials."""
    from pipeline.core import storage

    path = storage.join(str(directory), MANIFEST)
    shown = storage.public(path)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"no {MANIFEST} in {storage.public(str(directory))}: not {what}, or the run never began"
        )
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleShardsError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in formats:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise IncompatibleShardsError(f"{shown}: format {fmt!r}, expected {' or '.join(map(repr, formats))}")
    return manifest


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read `<directory>/manifest.json`; a clear error when it is missing or not a LightGen latents manifest."""
    return read_manifest(directory, (FORMAT,), "a training-shard directory")


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
    problems = _problems(manifest, vae, text_encoder, schema_version, require_complete, "encode-latents")
    if problems:
        raise IncompatibleShardsError("incompatible training shards: " + "; ".join(problems))


def _problems(
    manifest: dict[str, Any],
    vae: str | None,
    text_encoder: str | None,
    schema_version: int,
    require_complete: bool,
    stage: str,
) -> list[str]:
    """Each mismatch between a manifest and what its reader expects, as a phrase."""
    problems = []
    if manifest.get("schema_version") != schema_version:
        problems.append(f"schema version {manifest.get('schema_version')!r} != expected {schema_version!r}")
    if vae is not None and manifest.get("vae") != vae:
        problems.append(f"vae {manifest.get('vae')!r} != expected {vae!r}")
    if text_encoder is not None and manifest.get("text_encoder") != text_encoder:
        problems.append(f"text encoder {manifest.get('text_encoder')!r} != expected {text_encoder!r}")
    if require_complete and not manifest.get("complete"):
        problems.append(f"the run that wrote these shards has not finished (rerun {stage} to resume it)")
    return problems


Listing = tuple[dict[str, Any], list[Path]]  # (manifest, shard paths in order)


def training_shards(
    directory: str | Path, *, vae: Name = None, text_encoder: Name = None, schema_version: int = SCHEMA_VERSION
) -> Listing:
    """Validate a shard directory for training: (manifest, shard paths in order) or `IncompatibleShardsError`."""
    manifest = load_manifest(directory)
    check_compatible(manifest, vae=vae, text_encoder=text_encoder, schema_version=schema_version)
    return manifest, _listed_shards(directory, manifest)


def _listed_shards(directory: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """The shard paths a manifest lists, in order; `IncompatibleShardsError` naming any that is missing."""
    paths = [Path(directory) / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise IncompatibleShardsError(f"shards listed in the manifest are missing: {missing[:5]}")
    return paths


def load_pair_manifest(directory: str | Path) -> dict[str, Any]:
    """Read a pair-shard directory's `manifest.json`; a clear error when it is missing or of another format."""
    return read_manifest(directory, (PAIR_FORMAT,), "a DPO pair-shard directory")


def pair_shards(
    directory: str | Path, *, vae: Name = None, text_encoder: Name = None, schema_version: int = PAIR_SCHEMA_VERSION
) -> Listing:
    """Validate a DPO pair-shard directory: (manifest, shard paths in order) or `IncompatibleShardsError`.

    Checks the format ("lightgen-dpo-pairs"), the schema version, the encoder names (`None` skips that check),
    that the run finished and that every listed shard exists, as `training_shards` does for training shards.
    """
    manifest = load_pair_manifest(directory)
    check_pairs_compatible(manifest, vae=vae, text_encoder=text_encoder, schema_version=schema_version)
    return manifest, _listed_shards(directory, manifest)


def check_pairs_compatible(
    manifest: dict[str, Any], *, vae: Name = None, text_encoder: Name = None, schema_version: int = PAIR_SCHEMA_VERSION
) -> None:
    """`check_compatible` for a DPO pair-shard manifest."""
    problems = _problems(manifest, vae, text_encoder, schema_version, True, "build-dpo-pairs")
    if problems:
        raise IncompatibleShardsError("incompatible DPO pair shards: " + "; ".join(problems))


def moments_array(table: pa.Table, column: str = "moments") -> np.ndarray:
    """The `moments` (or `moments_flip`) column as one (B, 2C, h, w) float16 array (all rows share a shape).

    Also reads the pair shards' `winner_moments`, `winner_moments_flip`, `loser_moments`, `loser_moments_flip`.
    """
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
