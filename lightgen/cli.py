"""`lightgen`: model, generation and evaluation commands."""

from __future__ import annotations

import json

import typer

from shapesworld.cli import app as shapes_app

app = typer.Typer(help="LightGen model commands.", no_args_is_help=True, add_completion=False)
app.add_typer(shapes_app, name="shapes", help="ShapesWorld: prompts, teacher renders, GenEval-style scoring.")


@app.callback()
def _root() -> None:
    """LightGen: generate, inpaint, evaluate and inspect models; `lightgen shapes` for ShapesWorld."""


@app.command("model-info")
def model_info(
    preset: str = typer.Option("lightgen", help="Preset name (debug, shapes, lightgen)."),
    model: str = typer.Option(None, help="A saved model directory instead of a preset."),
) -> None:
    """Print JSON with the trainable parameter count, in total and per part, and the config."""
    import torch

    from lightgen_model import LightGen, count_parameters, load_config
    from lightgen_model import preset as get_preset

    try:
        cfg = load_config(model) if model else get_preset(preset)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    with torch.device("meta"):  # no memory, no init cost: only shapes are needed
        counts = count_parameters(LightGen(cfg))
    typer.echo(
        json.dumps({"preset": None if model else preset, "parameters": counts, "config": cfg.to_dict()}, indent=2)
    )


def main() -> None:
    """Entry point for ``python -m lightgen``."""
    app()
