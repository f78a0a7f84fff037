"""`lightgen-data`: the offline data pipeline (Ray Data jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lightgen.errors import exit_with_error, user_errors
from pipeline.options import command

app = typer.Typer(help="LightGen data pipeline.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """LightGen data pipeline: build-captions, synthesize, encode-latents, build-dpo-pairs."""


_fail = exit_with_error  # `error: <message>` on stderr and exit code 2, as every entry point (lightgen.errors)


def _stage_command(name: str, config: str, run: str, doc: str, summary: str | None = None) -> None:
    """Register command `name`: options from `pipeline.<module>.<config>`, calling `<run>(cfg)` and printing the
    report (after the report's `summary` line template, if given). Stage modules are imported when the CLI starts,
    their heavy libraries only when a command runs."""
    import importlib

    module, cls = config.rsplit(".", 1)
    config_cls = getattr(importlib.import_module(module), cls)

    def run_cfg(cfg: object) -> None:
        mod, fn = run.rsplit(".", 1)
        with user_errors():
            report = getattr(importlib.import_module(mod), fn)(cfg)
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
    near_dup: bool = typer.Option(True, help="Remove near duplicates (MinHash LSH + one-word-edit buckets)."),
    near_dup_threshold: float = typer.Option(0.8, help="Word n-gram Jaccard similarity that makes a near duplicate."),
    ngram: int = typer.Option(2, help="Word n-gram size of the near-duplicate shingles."),
    near_dup_edit_words: int = typer.Option(
        8, help="A word inserted or deleted makes a near duplicate when both captions have this many words (0 = off)."
    ),
    near_dup_change_words: int = typer.Option(
        14, help="A word changed makes a near duplicate when both captions have this many words (0 = off)."
    ),
    embedder: str = typer.Option("minilm", help="Sentence embeddings for selection: minilm, hash (model-free)."),
    select: str = typer.Option("cluster", help="Selection: cluster (k-means, even per cluster), farthest, random."),
    clusters: int = typer.Option(64, help="k of the k-means over caption embeddings."),
    kmeans_sample: int = typer.Option(
        100_000, help="Captions k-means is fitted on (a seeded sample); all are assigned."
    ),
    shard_size: int = typer.Option(100_000, help="Captions per output shard."),
    batch_size: int = typer.Option(256, help="Captions per embedding call."),
    workers: int = typer.Option(0, help="Ray tasks in parallel (reading, de-duplication, embeddings); 0 = no Ray."),
    partitions: int = typer.Option(0, help="Shuffle partitions of the de-duplication (0 = from the input size)."),
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


_stage_command(
    "build-dpo-pairs",
    "pipeline.dpo_config.PairsConfig",
    "pipeline.dpo_pairs.run_build_dpo_pairs",
    "DPO pairs: judge-kept source images (winners) + the model's own images (losers), as Parquet pair shards.",
    "build-dpo-pairs: {written} pairs of {inputs} inputs ({rejected} rejected), {written_this_run} made in "
    "{seconds_total} s",
)


@app.command("inspect")
def inspect_output(
    directory: Path = typer.Argument(..., metavar="DIR", help="A finished stage output folder (with manifest.json)."),
    out: Path = typer.Option(None, help="The HTML page to write.", show_default="<DIR>-inspect.html beside DIR"),
    limit: int = typer.Option(48, help="Rows sampled per section."),
    seed: int = typer.Option(0, help="Sampling seed (the same seed shows the same rows)."),
    vae: str = typer.Option(None, help="Local VAE directory that made the latents.", show_default="pixel only"),
) -> None:
    """One self-contained HTML page showing a stage output: counts, samples, plots, rejects. Prints its path."""
    from pipeline.inspect import inspect_dataset

    with user_errors():
        typer.echo(str(inspect_dataset(directory, out=out, limit=limit, seed=seed, vae=vae)))
