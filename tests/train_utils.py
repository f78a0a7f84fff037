"""Training-shard directories written directly (no Ray): the contract of pipeline/core/schema.py, small and fast."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema

PIXEL_LOGVAR = -30.0


def user_error(capsys: pytest.CaptureFixture, run: Callable[[], object], match: str) -> str:
    """Run an entry point that must stop on bad input: exit code 2 and one `error: ...` line on stderr matching
    `match` (a regular expression). The line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert e.value.code == 2, err
    assert len(lines) == 1 and re.search(match, lines[0]), err
    assert "Traceback" not in err, err
    return lines[0]


def shard_entry(out: Path, index: int, name: str, rows: int) -> dict:
    """A manifest entry as the pipeline writes it: index, name, rows, rejected, bytes, sha256."""
    data = (out / name).read_bytes()
    return {
        "index": index,
        "name": name,
        "rows": rows,
        "rejected": 0,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_latent_shards(
    out: str | Path,
    moments: np.ndarray,
    texts: list[np.ndarray],
    captions: list[str],
    *,
    moments_flip: np.ndarray | None = None,
    rows_per_shard: int = 16,
    resolution: int | None = None,
    vae: str = "pixel",
    text_encoder: str = "minilm",
    schema_version: int = schema.SCHEMA_VERSION,
    complete: bool = True,
) -> Path:
    """moments (N, 2C, h, w), texts: N arrays (L_i, D) -> part-*.parquet + manifest.json like encode-latents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flip = moments[..., ::-1] if moments_flip is None else moments_flip
    res = resolution or moments.shape[-1]
    n = len(moments)
    entries = []
    for k, lo in enumerate(range(0, n, rows_per_shard)):
        sl = range(lo, min(n, lo + rows_per_shard))
        table = pa.table(
            {
                "id": [f"row/{i:06d}" for i in sl],
                "caption": [captions[i] for i in sl],
                "resolution": pa.array([res] * len(sl), pa.int32()),
                "moments_shape": pa.array([list(moments.shape[1:])] * len(sl), pa.list_(pa.int32(), 3)),
                "moments": pa.array([moments[i].astype(np.float16).ravel() for i in sl], pa.large_list(pa.float16())),
                "moments_flip": pa.array(
                    [np.ascontiguousarray(flip[i]).astype(np.float16).ravel() for i in sl], pa.large_list(pa.float16())
                ),
                "text_len": pa.array([len(texts[i]) for i in sl], pa.int32()),
                "text_emb": pa.array([texts[i].astype(np.float16).ravel() for i in sl], pa.large_list(pa.float16())),
                "vae": [vae] * len(sl),
                "text_encoder": [text_encoder] * len(sl),
            },
            schema=schema.LATENT_SCHEMA,
        )
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, out / name)
        entries.append(shard_entry(out, k, name, len(sl)))
    manifest = {
        "format": schema.FORMAT,
        "schema_version": schema_version,
        "stage": "encode-latents",
        "complete": complete,
        "rows": n,
        "rejected": 0,
        "inputs": n,
        "rows_per_shard": [e["rows"] for e in entries],
        "shards": entries,
        "vae": vae,
        "text_encoder": text_encoder,
        "resolution": res,
        "config": {"resolution": res},
    }
    (out / schema.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def random_shards(out: str | Path, n: int = 48, res: int = 32, dim: int = 384, seed: int = 0, **kw) -> Path:
    """Random pixel-like moments and random text states of varied lengths."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-1, 1, (n, 3, res, res)).astype(np.float32)
    moments = np.concatenate([mean, np.full_like(mean, PIXEL_LOGVAR)], axis=1)
    texts = [rng.standard_normal((int(rng.integers(3, 9)), dim)).astype(np.float32) for _ in range(n)]
    return write_latent_shards(out, moments, texts, [f"caption {i}" for i in range(n)], **kw)


def write_pair_shards(
    out: str | Path,
    winners: np.ndarray,
    losers: np.ndarray,
    texts: list[np.ndarray],
    captions: list[str],
    *,
    rows_per_shard: int = 16,
    vae: str = "pixel",
    text_encoder: str = "minilm",
) -> Path:
    """Winner / loser moments (N, 2C, h, w) -> a build-dpo-pairs-shaped directory (flips = mirrored moments)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res, n, entries = winners.shape[-1], len(winners), []
    f16 = lambda a: np.ascontiguousarray(a).astype(np.float16).ravel()
    for k, lo in enumerate(range(0, n, rows_per_shard)):
        sl = range(lo, min(n, lo + rows_per_shard))
        cols = {
            "id": [f"pair/{i:06d}" for i in sl],
            "caption": [captions[i] for i in sl],
            "resolution": pa.array([res] * len(sl), pa.int32()),
            "moments_shape": pa.array([list(winners.shape[1:])] * len(sl), pa.list_(pa.int32(), 3)),
            "winner_moments": [f16(winners[i]) for i in sl],
            "winner_moments_flip": [f16(winners[i][..., ::-1]) for i in sl],
            "loser_moments": [f16(losers[i]) for i in sl],
            "loser_moments_flip": [f16(losers[i][..., ::-1]) for i in sl],
            "text_len": pa.array([len(texts[i]) for i in sl], pa.int32()),
            "text_emb": [f16(texts[i]) for i in sl],
            "vae": [vae] * len(sl),
            "text_encoder": [text_encoder] * len(sl),
            "judge": ["test"] * len(sl),
            "judge_answer": ["yes"] * len(sl),
            "judge_score": pa.array([1.0] * len(sl), pa.float32()),
            "loser_model": ["m"] * len(sl),
            "loser_seed": pa.array(list(sl), pa.int64()),
            "sampling": ["{}"] * len(sl),
            "loser_judge_answer": pa.nulls(len(sl), pa.string()),
            "loser_judge_score": pa.nulls(len(sl), pa.float32()),
        }
        name = f"part-{k:05d}.parquet"
        pq.write_table(pa.table(cols, schema=schema.PAIR_SCHEMA), out / name)
        entries.append(shard_entry(out, k, name, len(sl)))
    manifest = {
        "format": schema.PAIR_FORMAT,
        "schema_version": schema.PAIR_SCHEMA_VERSION,
        "stage": "build-dpo-pairs",
        "complete": True,
        "rows": n,
        "rejected": 0,
        "inputs": n,
        "shards": entries,
        "vae": vae,
        "text_encoder": text_encoder,
        "resolution": res,
        "config": {"resolution": res},
    }
    (out / schema.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out
