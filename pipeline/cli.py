"""`lightgen-data`: the offline data pipeline (Ray Data jobs)."""

from __future__ import annotations

import typer

app = typer.Typer(help="LightGen data pipeline.", no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """LightGen data pipeline: build-captions, synthesize, encode-latents, build-dpo-pairs.

    None of the stages exists yet: they land with the pipeline issues (4, 5, 7).
    """
