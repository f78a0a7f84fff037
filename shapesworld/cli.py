"""`lightgen shapes ...`: ShapesWorld prompts, teacher renders in GenEval's layout, and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lightgen.errors import user_errors
from lightgen.options import MAX_SEED, number

app = typer.Typer(
    help="ShapesWorld: procedural GenEval-style prompts, a teacher that renders them, and a scorer.",
    no_args_is_help=True,
    add_completion=False,
)
SEED = number(0, "Random seed (output is deterministic in it).", min=0, max=MAX_SEED)


@app.command()
@user_errors()
def prompts(
    n: int = number(..., "Number of records.", min=1),
    seed: int = SEED,
    categories: str = typer.Option("", help="Comma-separated GenEval tags; empty = all six."),
    diversity: float = number(1.0, "Share of captions paraphrased (0 = canonical).", min=0.0, max=1.0),
    scenes: int = number(0, "Distinct scenes per category (0 = all).", min=0),
    out: Path = typer.Option(None, help="Output JSONL file (default: stdout)."),
) -> None:
    """Write GenEval-shaped scene metadata (+ a `caption`), one JSON object a line."""
    from shapesworld.world import generate_prompts

    cats = [c.strip() for c in categories.split(",") if c.strip()] or None
    records = generate_prompts(n, seed, cats, diversity, scenes or None)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


@app.command()
@user_errors()
def render(
    metadata: Path = typer.Option(..., help="Metadata JSONL (from `prompts` or GenEval's file)."),
    out: Path = typer.Option(..., help="Output folder, GenEval layout."),
    resolution: int = number(64, "Image side in pixels, 32..1024."),
    samples: int = number(4, "Images per prompt.", min=1),
    seed: int = SEED,
) -> None:
    """Render every metadata line with the teacher into <out>/<00000>/{metadata.jsonl,samples/<0000>.png}."""
    from shapesworld.render import render_folder
    from shapesworld.world import read_jsonl

    count = render_folder(read_jsonl(metadata), out, resolution, samples, seed)
    typer.echo(f"wrote {count} images to {out}")


@app.command()
@user_errors()
def score(
    folder: Path = typer.Argument(..., help="A GenEval-layout folder of samples."),
    json_out: Path = typer.Option(
        None, "--json", help="Where to write per-image results (default <folder>/scores.json)."
    ),
) -> None:
    """Score a GenEval-layout folder and print GenEval's summary."""
    from shapesworld.score import format_summary, score_folder

    summary = score_folder(folder, json_out)
    typer.echo(format_summary(summary))
