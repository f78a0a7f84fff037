"""`lightgen`: model, generation and evaluation commands (thin wrappers over ``lightgen.api`` and friends)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lightgen.errors import user_errors
from lightgen.options import DEVICE, MODEL, LoadOptions, SamplingOptions, number, side, with_options
from shapesworld.cli import app as shapes_app

app = typer.Typer(help="LightGen model commands.", no_args_is_help=True, add_completion=False)
app.add_typer(shapes_app, name="shapes", help="ShapesWorld: prompts, teacher renders, GenEval-style scoring.")


@app.callback()
def _root() -> None:
    """LightGen: generate, inpaint, evaluate and inspect models; `lightgen shapes` for ShapesWorld."""


def model_command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``@app.command(name)`` for a command that loads a model: its option groups (``SamplingOptions``,
    ``LoadOptions``) are expanded by ``with_options``, and bad input is one error line (``user_errors``)."""
    return lambda command: app.command(name)(with_options(user_errors()(command)))


@app.command("model-info")
@user_errors()
def model_info(
    preset: str = typer.Option("lightgen", help="Preset name (debug, shapes, lightgen)."),
    model: str = typer.Option(None, help="A saved model directory instead of a preset."),
) -> None:
    """Print JSON with the trainable parameter count, in total and per part, and the config."""
    import torch

    from lightgen_model import LightGen, count_parameters, load_config
    from lightgen_model import preset as get_preset

    cfg = load_config(model) if model else get_preset(preset)
    with torch.device("meta"):  # no memory, no init cost: only shapes are needed
        counts = count_parameters(LightGen(cfg))
    info = {"preset": None if model else preset, "parameters": counts, "config": cfg.to_dict()}
    typer.echo(json.dumps(info, indent=2))


@model_command("generate")
def generate_cmd(
    *,
    model: Path = MODEL,
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts: Path = typer.Option(None, help="Prompt file: one a line, or .jsonl objects (see --field)."),
    field: str = typer.Option("prompt", help="Field holding the prompt in a .jsonl prompt file."),
    out: Path = typer.Option(..., help="Output folder: 00000.png, 00001.png, ... and generation.json."),
    resolution: int = side("Square image side in px (default: the model's base_resolution)."),
    height: int = side("Image height in px (overrides --resolution)."),
    width: int = side("Image width in px (overrides --resolution)."),
    images_per_prompt: int = number(1, "Images per prompt.", min=1),
    sampling: SamplingOptions,
    batch_size: int = number(8, "Images per batch.", min=1),
    load: LoadOptions,
) -> None:
    """Generate images for prompts: PNGs plus generation.json (settings, the prompt of each file, images/s)."""
    from lightgen.api import check_prompts
    from lightgen.generate import read_prompts, run_generate

    if bool(prompt) == (prompts is not None):
        raise ValueError("give either --prompt (one or more) or --prompts FILE")
    texts = check_prompts(list(prompt), "--prompt", start=1) if prompt else read_prompts(prompts, field)
    sampling.check()
    pipe = load.pipeline(model)
    res = run_generate(
        pipe,
        texts,
        out,
        **sampling.run_keywords(pipe),
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        height=resolution if height is None else height,
        width=resolution if width is None else width,
        record={"model": str(model)},
    )
    typer.echo(
        f"wrote {len(res['images'])} images to {out} in {res['seconds']} s ({res['images_per_second']} images/s)"
    )


@model_command("inpaint")
def inpaint_cmd(
    *,
    model: Path = MODEL,
    image: Path = typer.Option(..., help="Input image; its sides must be multiples of the model's token size."),
    mask: Path = typer.Option(..., help="Mask image of the same size: white = regenerate, black = keep."),
    prompt: str = typer.Option(..., help="What the masked region should show."),
    out: Path = typer.Option(..., help="Output PNG (settings go to the .json beside it)."),
    sampling: SamplingOptions,
    load: LoadOptions,
) -> None:
    """Zero-shot inpainting: regenerate the white part of --mask; the rest is the input's tokenizer round trip."""
    from lightgen.api import check_prompts
    from lightgen.generate import run_inpaint
    from lightgen.images import read_image

    check_prompts([prompt], "--prompt", start=1)
    src, msk = read_image(image, "RGB"), read_image(mask)
    sampling.check()
    pipe = load.pipeline(model)
    run_inpaint(
        pipe,
        src,
        msk,
        prompt,
        out,
        **sampling.run_keywords(pipe),
        record={"model": str(model), "image": str(image), "mask": str(mask)},
    )
    typer.echo(f"wrote {out}")


@model_command("geneval")
def geneval_cmd(
    *,
    model: Path = MODEL,
    metadata: Path = typer.Option(..., help="GenEval evaluation_metadata.jsonl (or `lightgen shapes prompts` output)."),
    out: Path = typer.Option(
        ..., help="Output folder in GenEval's layout: <00000>/{metadata.jsonl,samples/<0000>.png}."
    ),
    samples: int = number(4, "Images per prompt.", min=1),
    resolution: int = side("Image side in px (default: the model's base_resolution)."),
    sampling: SamplingOptions,
    batch_size: int = number(16, "Images per batch (batch_size // samples prompts at a time).", min=1),
    limit: int = number(None, "Only the first N metadata lines.", min=1),
    field: str = typer.Option("prompt", help="Metadata field used as the prompt (ShapesWorld also has 'caption')."),
    overwrite: bool = typer.Option(False, help="Start over (otherwise a rerun skips finished prompt folders)."),
    load: LoadOptions,
) -> None:
    """Generate GenEval samples for every metadata line; resumable; `lightgen shapes score OUT` scores ShapesWorld."""
    from lightgen.geneval import run_geneval

    sampling.check()
    pipe = load.pipeline(model)
    grid: dict[str, Any] = {"samples": samples, "resolution": resolution, "batch_size": batch_size, "limit": limit}
    res = run_geneval(pipe, metadata, out, **sampling.run_keywords(pipe), **grid, field=field, overwrite=overwrite)
    speed = f", {res['images_per_second']} images/s" if res["images"] else ""
    typer.echo(
        f"{res['prompts']} prompts: {res['skipped']} already done, {res['generated']} generated "
        f"({res['images']} images in {res['seconds']} s{speed}) -> {out}"
    )


@app.command("fid")
@user_errors()
def fid_cmd(
    real: Path = typer.Option(..., help="Folder of reference images (searched recursively)."),
    fake: Path = typer.Option(..., help="Folder of generated images (searched recursively, e.g. a GenEval folder)."),
    inception_weights: Path = typer.Option(
        None, envvar="LIGHTGEN_INCEPTION_WEIGHTS", help="Local pt_inception-2015-12-05 weights (.pth or .safetensors)."
    ),
    feature: int = number(2048, "Inception feature layer: 64, 192, 768 or 2048 (the FID standard)."),
    batch_size: int = number(50, "Images per batch.", min=1),
    device: str = DEVICE,
    antialias: bool = typer.Option(False, help="Antialiased resize to 299 px (off = the original TF resize)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Fréchet Inception Distance between two image folders (torchmetrics; Inception weights from a local file)."""
    from lightgen.fid import run_fid
    from lightgen_model.encoders import resolve_device

    res = run_fid(real, fake, inception_weights, feature, batch_size, resolve_device(device), antialias)
    if json_out is not None:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
    typer.echo(f"FID {res['fid']:.4f} ({res['real_images']} real, {res['fake_images']} fake images)")


@app.command("convert-reference")
@user_errors()
def convert_reference_cmd(
    checkpoint: Path = typer.Option(..., help="Reference checkpoint (checkpoint-last.pth)."),
    out: Path = typer.Option(..., help="Output model directory (config.json + safetensors)."),
    heads: int = number(None, "Attention heads (default: from args.model, e.g. fluid_large = 16).", min=1),
    latent_channels: int = number(None, "VAE latent channels (default: args.vae_embed_dim or 16).", min=1),
    patch_size: int = number(None, "Token patch size (default: args.patch_size or 2).", min=1),
    vae_stride: int = number(None, "VAE stride (default: args.vae_stride or 8).", min=1),
    vae_name: str = typer.Option(None, help="`vae` recorded in config.json (default: the lightgen preset's)."),
    text_encoder_name: str = typer.Option(None, help="`text_encoder` recorded in config.json (default: preset's)."),
    head_steps: str = typer.Option(
        None, help="Head sampling steps: N, 'ddimN' or 'a,b,...' (default: args.num_sampling_steps, else 100)."
    ),
) -> None:
    """Convert a reference-implementation checkpoint to our layout (EMA weights preferred), loading it safely.

    config.json records the reference's sampling settings (64 steps, constant cfg 4.0, temperature 1.0), which
    `lightgen generate` / `geneval` and LightGenPipeline then use unless told otherwise."""
    from lightgen.convert import convert_reference
    from lightgen_model import PRESETS

    res = convert_reference(
        checkpoint,
        out,
        head_steps,
        heads=heads,
        latent_channels=latent_channels,
        patch_size=patch_size,
        vae_stride=vae_stride,
        vae=vae_name or PRESETS["lightgen"]["vae"],
        text_encoder=text_encoder_name or PRESETS["lightgen"]["text_encoder"],
    )
    typer.echo(
        f"wrote {out}: {res['parameters']:,} parameters, weights {'+'.join(res['weights'])} "
        f"(from_pretrained loads {res['loads']}), epoch {res['epoch']}"
    )


@app.command("plan")
@user_errors()
def plan_cmd(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml", help="A recipe, e.g. conf/recipes/paper.yaml."),
    gpu: str = typer.Option("h100", help="a100, h100 or h200."),
    gpus: int = number(8, "GPUs the stages run on.", min=1),
    cache: Path = typer.Option(
        None, help="JSON file keeping the dry runs' counts for later plans.", show_default="none"
    ),
    calibration: bool = typer.Option(False, help="Also print the calibration points behind the utilisation."),
) -> None:
    """What a recipe costs: per stage FLOPs (counted on the meta device), GPU-hours, wall-clock, memory per GPU."""
    from lightgen.plan import run_plan

    typer.echo(run_plan(recipe, gpu, gpus, cache, calibration))


def main() -> None:
    """Entry point of the ``lightgen`` console script and ``python -m lightgen``."""
    from lightgen.errors import run_app

    run_app(app)


if __name__ == "__main__":  # python -m lightgen.cli
    main()
