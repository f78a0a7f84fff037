"""`lightgen-data`: the offline data pipeline. One command per registered stage (`pipeline/stages/registry.py`),
its options the fields of the stage's config, plus `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lightgen.errors import user_errors
from pipeline.core.options import command
from pipeline.core.stage import Stage
from pipeline.core.storage import masked_errors
from pipeline.stages.registry import STAGES


def stage_command(stage: type[Stage]) -> typer.models.CommandFunctionType:
    """The command of `stage`: its options from `stage.config`; it runs the stage (or its dry run) and prints the
    report. Stage modules are imported when the CLI starts, their heavy libraries only when a command runs."""

    def run_cfg(cfg: object) -> None:
        with user_errors(), masked_errors():  # no storage endpoint or key in the error line
            if getattr(cfg, "dry_run", False):  # models on the meta device; nothing read or written
                typer.echo(json.dumps(stage.dry_run(cfg)))
                return
            report = stage.run(cfg)
        for line in stage.report_lines(report):
            typer.echo(line)

    return command(stage.config, run_cfg, stage.help, optional=stage.optional_options)


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


def make_app() -> typer.Typer:
    """The `lightgen-data` application: a command per registered stage that has one, and `inspect`."""
    commands = [s for s in STAGES if s.has_command]
    app = typer.Typer(
        help="LightGen data pipeline: " + ", ".join(s.name for s in commands) + "; inspect.",
        no_args_is_help=True,
        add_completion=False,
    )
    for stage in commands:
        app.command(stage.name)(stage_command(stage))
    app.command("inspect")(inspect_output)
    return app


app = make_app()


def main() -> None:
    """Entry point of the ``lightgen-data`` console script."""
    from lightgen.errors import run_app

    run_app(app)
