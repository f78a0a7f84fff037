"""Training-shard directories written directly (no Ray): the contract of pipeline/core/schema.py, small and fast."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema

if TYPE_CHECKING:
    from training.data import ShardSet
    from training.trainer import Trainer

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


def write_manifest(
    out: Path,
    head: dict,
    n: int,
    entries: list[dict],
    vae: str,
    text_encoder: str,
    res: int,
    *,
    rows_per_shard: bool = False,
) -> Path:
    """Write `out`/manifest.json as a stage does: `head`, n of n inputs kept, the shards, encoders, resolution."""
    counts = {"rows": n, "rejected": 0, "inputs": n}
    if rows_per_shard:
        counts["rows_per_shard"] = [e["rows"] for e in entries]
    manifest = {
        **head,
        **counts,
        "shards": entries,
        "vae": vae,
        "text_encoder": text_encoder,
        "resolution": res,
        "config": {"resolution": res},
    }
    (out / schema.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


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
    head = {"format": schema.FORMAT, "schema_version": schema_version, "stage": "encode-latents", "complete": complete}
    return write_manifest(out, head, n, entries, vae, text_encoder, res, rows_per_shard=True)


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
    head = {
        "format": schema.PAIR_FORMAT,
        "schema_version": schema.PAIR_SCHEMA_VERSION,
        "stage": "build-dpo-pairs",
        "complete": True,
    }
    return write_manifest(out, head, n, entries, vae, text_encoder, res)


def random_pair_shards(out: str | Path, texts: list[np.ndarray], captions: list[str], res: int = 32, **kw) -> Path:
    """Random pixel-like winner and loser moments (seed 0) for each caption -> write_pair_shards."""
    rng = np.random.default_rng(0)
    win, lose = (rng.uniform(-1, 1, (len(captions), 3, res, res)).astype(np.float32) for _ in range(2))
    lv = np.full_like(win, PIXEL_LOGVAR)
    return write_pair_shards(out, np.concatenate([win, lv], 1), np.concatenate([lose, lv], 1), texts, captions, **kw)


def bind_text_padding(trainer: Trainer) -> ShardSet:
    """The trainer's shard set, its text padding (`trainer.text_pad`) bound as the trainer's build binds it."""
    from training import dist as D

    mcfg = trainer.model_config(None)
    shard_set = trainer.shard_set(mcfg)
    trainer.text_pad = trainer.text_padding(mcfg, shard_set, D.DistInfo())
    return shard_set


# -- torchrun --------------------------------------------------------------------------------------------------------
STANDALONE = ("--standalone", "--nproc_per_node=2")  # torchrun's options for one node of two processes


def torchrun_cmd(script: Path, *args: str, launch: Sequence[str] = STANDALONE) -> list[str]:
    """`python -m torch.distributed.run LAUNCH SCRIPT ARGS`: a trainer under torchrun (default: 2 processes here)."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(script), *args]


def torchrun_env(**env: str) -> dict[str, str]:
    """This process's environment with one OpenMP thread a process (OMP_NUM_THREADS=1), and `env`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **env}


def run_torchrun(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """A 2-process torchrun of `script` to its end (at most `timeout` s), one OpenMP thread each; output captured."""
    return subprocess.run(
        torchrun_cmd(script, *args), capture_output=True, text=True, timeout=timeout, env=torchrun_env()
    )


def two_node_launch(node_rank: int, port: int, rdzv_id: str) -> list[str]:
    """torchrun's options for node `node_rank` of 2 (a process each) at a c10d rendezvous on 127.0.0.1:`port`."""
    return [
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={rdzv_id}",
        "--nproc_per_node=1",
    ]


def finish(
    procs: list[subprocess.Popen], kill: Callable[[subprocess.Popen], object] = subprocess.Popen.kill
) -> list[str]:
    """Each launcher's stdout once it exits 0 (a wait over 300 s: `kill` stops them all); a failure shows its output."""
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                kill(q)
            raise
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        outs.append(out)
    return outs
