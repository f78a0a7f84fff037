"""`lightgen-data`: the offline data pipeline (Ray Data jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.options import command

app = typer.Typer(help="LightGen data pipeline.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """LightGen data pipeline: build-captions, synthesize, encode-latents, build-dpo-pairs."""


def _fail(e: Exception) -> None:
    """A one-line error on stderr and exit code 2."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2) from None


def _stage_command(name: str, config: str, run: str, doc: str, summary: str | None = None) -> None:
    """Register command `name`: options from `pipeline.<module>.<config>`, calling `<run>(cfg)` and printing the
    report (after the report's `summary` line template, if given). Stage modules are imported when the CLI starts,
    their heavy libraries only when a command runs."""
    import importlib

    module, cls = config.rsplit(".", 1)
    config_cls = getattr(importlib.import_module(module), cls)

    def run_cfg(cfg: object) -> None:
        mod, fn = run.rsplit(".", 1)
        try:
            report = getattr(importlib.import_module(mod), fn)(cfg)
        except (ValueError, OSError) as e:
            _fail(e)
        if summary:
            typer.echo(summary.format(**report))
        typer.echo(json.dumps(report))

    app.command(name)(command(config_cls, run_cfg, doc))


_stage_command(
    "encode-latents",
    "pipeline.encode.EncodeConfig",
    "pipeline.encode.run_encode_latents",
    "VAE moments (image + flip) and unpadded text embeddings, 16-bit, into Parquet training shards.",
)


@app.command("build-captions")
def build_captions(
    input: list[str] = typer.Option(
        [], "--input", help="JSONL / JSON / Parquet / CSV files, webdataset .tar, folders or globs (repeat)."
    ),
    output: Path = typer.Option(..., help="Output folder: caption shards, rejects, diversity.json, report, manifest."),
    n: int = typer.Option(1000, help="Captions to select."),
    field: str = typer.Option("caption", help="The record field / column holding the caption."),
    shapes: int = typer.Option(0, help="Add N captions from the built-in ShapesWorld generator (with metadata)."),
    shapes_diversity: float = typer.Option(1.0, help="ShapesWorld caption diversity in [0, 1] (paraphrase rate)."),
    shapes_scenes: int = typer.Option(None, help="Distinct ShapesWorld scenes per category.", show_default="all"),
    min_words: int = typer.Option(1, help="Remove captions with fewer words (too_short)."),
    max_words: int = typer.Option(128, help="Remove captions with more words (too_long)."),
    charset: str = typer.Option("any", help="Keep captions whose letters are: any, latin, ascii (bad_charset)."),
    near_dup: bool = typer.Option(True, help="Remove near duplicates (MinHash over word n-grams)."),
    near_dup_threshold: float = typer.Option(0.8, help="Word n-gram Jaccard similarity that makes a near duplicate."),
    ngram: int = typer.Option(2, help="Word n-gram size of the near-duplicate shingles."),
    embedder: str = typer.Option("minilm", help="Sentence embeddings for selection: minilm, hash (model-free)."),
    select: str = typer.Option("cluster", help="Selection: cluster (k-means, even per cluster), farthest, random."),
    clusters: int = typer.Option(64, help="k of the k-means over caption embeddings."),
    shard_size: int = typer.Option(100_000, help="Captions per output shard."),
    batch_size: int = typer.Option(256, help="Captions per embedding call."),
    workers: int = typer.Option(0, help="Ray workers for the embeddings; 0 = in this process."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster.", show_default="start a local Ray"),
    seed: int = typer.Option(0, help="Random seed (selection, k-means, ShapesWorld)."),
    overwrite: bool = typer.Option(False, help="Replace earlier outputs; without it other settings are refused."),
) -> None:
    """Clean, de-duplicate and diversity-select captions into Parquet caption shards, with a diversity report."""
    options = {k: v for k, v in locals().items() if k not in ("input", "output")}
    from pipeline.captions import CaptionsConfig, format_table, run_build_captions

    try:
        report = run_build_captions(CaptionsConfig(inputs=input, output=str(output), **options))
    except (ValueError, OSError) as e:
        _fail(e)
    typer.echo(format_table(report))
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "diversity"}))


_stage_command(
    "synthesize",
    "pipeline.synthesize.SynthConfig",
    "pipeline.synthesize.run_synthesize",
    "Teacher images for captions into webdataset .tar shards (image + .json), resumable, seeded per caption.",
    "synthesize: {images_this_run} images in {seconds} s ({images_per_s} images/s)",
)


@app.command("build-dpo-pairs")
def build_dpo_pairs(
    input: list[str] = typer.Option(
        ..., "--input", help="Images with captions: webdataset .tar, image folders, Parquet files, globs (repeat)."
    ),
    output: Path = typer.Option(..., help="Output folder: pair shards, judgements/, rejects, report, manifest."),
    model: str = typer.Option(..., help="LightGen checkpoint directory (save_pretrained) that draws the losers."),
    judge_backend: str = typer.Option("transformers", help="transformers, vllm (Qwen2.5-VL), shapes (ShapesWorld)."),
    judge_model: str = typer.Option(None, help="Local Qwen2.5-VL directory (transformers, vllm).", show_default="none"),
    min_judge_score: float = typer.Option(
        0.8, help="Keep images the judge scores at least this, in [0, 1] ('Score: N' = N/10, yes = 1, no = 0)."
    ),
    judge_max_new_tokens: int = typer.Option(16, help="Tokens the judge may answer with."),
    judge_max_pixels: int = typer.Option(1024 * 1024, help="Images are resized to at most this many pixels for Qwen."),
    judge_dtype: str = typer.Option(
        "auto", help="Judge dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16."
    ),
    vllm_gpu_memory_utilization: float = typer.Option(0.85, help="vLLM's share of a GPU's memory (vllm backend)."),
    vllm_max_model_len: int = typer.Option(4096, help="vLLM context length (vllm backend)."),
    min_aesthetic: float = typer.Option(
        None, help="Reject rows whose aesthetic score is lower (or missing).", show_default="no aesthetic filter"
    ),
    aesthetic_field: str = typer.Option(
        None, help="Field / column of the aesthetic score.", show_default="aesthetic, aesthetic_score, AESTHETIC_SCORE"
    ),
    caption_field: str = typer.Option(
        None, help="Caption column of Parquet inputs.", show_default="caption, prompt, text, TEXT"
    ),
    image_field: str = typer.Option(
        None, help="Image column of Parquet inputs (bytes or {bytes, path}).", show_default="image, jpg, png, ..."
    ),
    vae: str = typer.Option(
        None, help="Image tokenizer: 'pixel' or a local diffusers VAE directory.", show_default="the --model's vae"
    ),
    text_encoder: str = typer.Option(
        None, help="'minilm' or a local transformers encoder directory.", show_default="the --model's text_encoder"
    ),
    resolution: int = typer.Option(
        None, help="Side of winner crops and loser images, in pixels.", show_default="the --model's base_resolution"
    ),
    max_text_len: int = typer.Option(
        None, help="Text tokens kept per caption.", show_default="the --model's max_text_len"
    ),
    steps: int = typer.Option(64, help="Loser sampling iterations (masked-generation steps)."),
    cfg: float = typer.Option(4.0, help="Loser classifier-free guidance scale."),
    cfg_schedule: str = typer.Option("linear", help="Guidance schedule: linear, constant."),
    temperature: float = typer.Option(1.0, help="Loser sampling temperature."),
    use_ema: bool = typer.Option(True, help="Draw losers with the EMA weights when the checkpoint has them."),
    batch_size: int = typer.Option(8, help="Images per judge / encoder call."),
    shard_size: int = typer.Option(1000, help="Input records per output shard (the unit of resume)."),
    workers: int = typer.Option(1, help="Ray workers, one model copy each; 0 = no Ray, run in this process."),
    gpus_per_worker: float = typer.Option(
        None, help="GPUs per Ray worker.", show_default="the Ray cluster's GPUs shared evenly, at most 1 per worker"
    ),
    device: str = typer.Option("auto", help="auto (cuda if a worker sees a GPU), cpu, cuda[:N]."),
    dtype: str = typer.Option("float32", help="LightGen + encoder compute dtype: float32, bfloat16, float16."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster.", show_default="start a local Ray"),
    seed: int = typer.Option(0, help="Run seed; each loser's seed is a hash of it and the row id."),
    overwrite: bool = typer.Option(False, help="Replace earlier outputs in --output instead of resuming."),
    max_pixels: int = typer.Option(64_000_000, help="Reject images with more pixels (decompression bombs)."),
    min_size: int = typer.Option(32, help="Reject images whose shorter side is smaller."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """DPO pairs: judge-kept source images (winners) + the model's own images (losers), as Parquet pair shards."""
    options = {k: v for k, v in locals().items() if k not in ("input", "output", "quiet")}
    from pipeline.dpo_pairs import PairsConfig, run_build_dpo_pairs

    try:
        report = run_build_dpo_pairs(PairsConfig(inputs=input, output=str(output), progress=not quiet, **options))
    except (ValueError, OSError) as e:
        _fail(e)
    typer.echo(
        f"build-dpo-pairs: {report['written']} pairs of {report['inputs']} inputs ({report['rejected']} rejected), "
        f"{report['pairs_this_run']} made in {report['seconds']} s"
    )
    typer.echo(json.dumps(report))
