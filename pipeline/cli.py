"""`lightgen-data`: the offline data pipeline (Ray Data jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="LightGen data pipeline.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """LightGen data pipeline: build-captions, synthesize, encode-latents, build-dpo-pairs.

    Stages land with the pipeline issues (4, 5, 7); encode-latents exists.
    """


@app.command("encode-latents")
def encode_latents(
    input: list[str] = typer.Option(..., "--input", help="Input .tar shards, image folders, files or globs (repeat)."),
    output: Path = typer.Option(..., help="Output folder: shards, manifest.json, rejects.parquet, report.json."),
    vae: str = typer.Option("pixel", help="'pixel' (ShapesWorld) or a local diffusers AutoencoderKL directory."),
    text_encoder: str = typer.Option("minilm", help="'minilm' or a local transformers encoder directory (T5, BERT)."),
    resolution: int = typer.Option(256, help="Side of the center-cropped square image, in pixels."),
    max_text_len: int = typer.Option(128, help="Text tokens kept per caption (longer captions are truncated)."),
    batch_size: int = typer.Option(32, help="Images per encoder call."),
    shard_size: int = typer.Option(1000, help="Input records per output shard (the unit of resume)."),
    workers: int = typer.Option(1, help="Ray workers, one model copy each; 0 = no Ray, encode in this process."),
    gpus_per_worker: float = typer.Option(
        None, help="GPUs per Ray worker.", show_default="the Ray cluster's GPUs shared evenly, at most 1 per worker"
    ),
    device: str = typer.Option("auto", help="auto (cuda if a worker sees a GPU), cpu, cuda[:N]."),
    dtype: str = typer.Option("float32", help="Encoder compute dtype: float32, bfloat16, float16 (storage is 16-bit)."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster.", show_default="start a local Ray"),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, help="Replace earlier outputs in --output instead of resuming."),
    max_pixels: int = typer.Option(64_000_000, help="Reject images with more pixels (decompression bombs)."),
    min_size: int = typer.Option(32, help="Reject images whose shorter side is smaller."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """VAE moments (image + flip) and unpadded text embeddings, 16-bit, into Parquet training shards."""
    options = {k: v for k, v in locals().items() if k not in ("input", "output", "quiet")}  # the other flags
    from pipeline.encode import EncodeConfig, run_encode_latents

    cfg = EncodeConfig(inputs=input, output=str(output), progress=not quiet, **options)
    try:
        report = run_encode_latents(cfg)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report))
