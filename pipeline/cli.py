"""`lightgen-data`: the offline data pipeline (Ray Data jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lightgen.errors import user_errors
from pipeline.core.options import command
from pipeline.core.storage import masked_errors

app = typer.Typer(help="LightGen data pipeline.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """LightGen data pipeline: build-captions, synthesize, encode-latents, build-dpo-pairs."""


def _stage_command(name: str, config: str, run: str, doc: str, summary: str | None = None) -> None:
    """Register command `name`: options from `pipeline.<module>.<config>`, calling `<run>(cfg)` and printing the
    report (after the report's `summary` line template, if given). Stage modules are imported when the CLI starts,
    their heavy libraries only when a command runs."""
    import importlib

    module, cls = config.rsplit(".", 1)
    config_cls = getattr(importlib.import_module(module), cls)

    def run_cfg(cfg: object) -> None:
        mod, fn = run.rsplit(".", 1)
        with user_errors(), masked_errors():  # no storage endpoint or key in the error line
            if getattr(cfg, "dry_run", False):  # models on the meta device; nothing read or written
                from pipeline.core.dryrun import dry_run

                typer.echo(json.dumps(dry_run(cfg)))
                return
            report = getattr(importlib.import_module(mod), fn)(cfg)
        if summary:
            typer.echo(summary.format(**report))
        typer.echo(json.dumps(report))

    app.command(name)(command(config_cls, run_cfg, doc))


_stage_command(
    "encode-latents",
    "pipeline.stages.encode_latents.EncodeConfig",
    "pipeline.stages.encode_latents.run_encode_latents",
    "VAE moments (image + flip) and unpadded text embeddings, 16-bit, into Parquet training shards.",
)


def _run_build_captions(cfg: object) -> None:
    """build-captions: the diversity table, then the report as JSON."""
    from pipeline.stages.captions.build import format_table, run_build_captions

    with user_errors(), masked_errors():  # no storage endpoint or key in the error line
        report = run_build_captions(cfg)
    typer.echo(format_table(report))
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "diversity"}))


def _build_captions_command() -> None:
    """Register build-captions (global phases on the runner's executor, not per-shard units; options from its
    config)."""
    from pipeline.stages.captions.build import CaptionsConfig

    doc = "Clean, de-duplicate and diversity-select captions into Parquet caption shards, with a diversity report."
    app.command("build-captions")(command(CaptionsConfig, _run_build_captions, doc, optional=("inputs",)))


_build_captions_command()


_stage_command(
    "synthesize",
    "pipeline.stages.synthesize.SynthConfig",
    "pipeline.stages.synthesize.run_synthesize",
    "Teacher images for captions into webdataset .tar shards (image + .json), resumable, seeded per caption.",
    "synthesize: {images_this_run} images in {seconds} s ({images_per_s} images/s)",
)


_stage_command(
    "build-dpo-pairs",
    "pipeline.stages.dpo_pairs.config.PairsConfig",
    "pipeline.stages.dpo_pairs.pairs.run_build_dpo_pairs",
    "DPO pairs: judge-kept source images (winners) + the model's own images (losers), as Parquet pair shards.",
    "build-dpo-pairs: {written} pairs of {inputs} inputs ({rejected} rejected), {written_this_run} made in "
    "{seconds_total} s",
)


@app.command("inspect")
def inspect_output(
    directory: str = typer.Argument(
        ..., metavar="DIR", help="A finished stage output folder (with manifest.json): a local path or a URI."
    ),
    out: Path = typer.Option(None, help="The HTML page to write.", show_default="<DIR>-inspect.html beside DIR"),
    limit: int = typer.Option(48, help="Rows sampled per section."),
    seed: int = typer.Option(0, help="Sampling seed (the same seed shows the same rows)."),
    vae: str = typer.Option(None, help="Local VAE directory that made the latents.", show_default="pixel only"),
) -> None:
    """One self-contained HTML page showing a stage output: counts, samples, plots, rejects. Prints its path."""
    from pipeline.inspect.page import inspect_dataset

    with user_errors(), masked_errors():
        typer.echo(str(inspect_dataset(directory, out=out, limit=limit, seed=seed, vae=vae)))


def main() -> None:
    """Entry point of the ``lightgen-data`` console script."""
    from lightgen.errors import run_app

    run_app(app)
