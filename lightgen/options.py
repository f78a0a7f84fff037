"""The option groups the `lightgen` commands share, each written once as a dataclass.

A field declared with ``flag(typer.Option(...))`` is a command-line option; a command takes the whole group as one
parameter annotated with the dataclass, and ``@with_options`` expands it into the group's options (in --help and
on the command line) and builds the dataclass for the command:

    @app.command()
    @with_options
    def generate_cmd(model: Path = MODEL, ..., sampling: SamplingOptions, load: LoadOptions) -> None:
        pipe = load.pipeline(model)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

MAX_SEED = 2**63 - 1
MAX_SIDE = 16_384  # pixels of an image side: far above any trained size, low enough to stop absurd requests


def finite(value: float | None) -> float | None:
    """Option callback: refuse inf (typer's range check lets it through; nan it refuses itself)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def number(default: Any, help: str, *, min: float | None = None, max: float | None = None, **kw: Any) -> Any:
    """A numeric ``typer.Option``: typer checks the type and the range [min, max] (shown in --help); a float
    must also be finite. Every numeric option of the `lightgen` commands is declared with it."""
    return typer.Option(default, min=min, max=max, callback=finite, help=help, **kw)


def side(help: str) -> Any:
    """An optional image size option in pixels: 1 .. MAX_SIDE (multiples of the token size are checked later)."""
    return number(None, help, min=1, max=MAX_SIDE)


MODEL = typer.Option(..., "--model", help="Model directory (config.json + model[_ema].safetensors).")
DEVICE = typer.Option("auto", help="Device: auto (cuda if available), cpu, cuda, cuda:1, ...")
SEED = number(0, "Random seed (the same seed and batch size give the same images).", min=0, max=MAX_SEED)


def flag(option: Any) -> Any:
    """A dataclass field that is the command-line option ``option`` (a ``typer.Option``), with its default."""
    default = None if option.default is ... else option.default
    return dataclasses.field(default=default, metadata={"option": option})


@dataclass
class SamplingOptions:
    """Sampling settings from the command line; None = the model's recorded default (config.json "sampling"),
    else the library's (named in the help)."""

    steps: int | None = flag(
        number(None, "Masked-generation iterations (default: the model's recorded one, else 64).", min=1)
    )
    cfg: float | None = flag(
        number(None, "Classifier-free guidance scale, 1 = off (default: the model's, else 4.0).", min=0.0)
    )
    cfg_schedule: str | None = flag(
        typer.Option(
            None,
            help="Guidance schedule: linear (1 -> cfg as tokens appear), constant, or linear-reference (linear with "
            "the reference code's last step, 1 + (cfg-1)(L-1)/L) (default: the model's, else linear).",
        )
    )
    temperature: float | None = flag(
        number(None, "Temperature of the diffusion head's noise, > 0 (default: the model's, else 1.0).", min=0.0)
    )
    seed: int = flag(SEED)

    def check(self) -> None:
        """Check the given settings before a model is loaded (ValueError naming the bad one)."""
        self.settings()

    def settings(self, pipe: Any = None) -> Any:
        """The ``SamplingDefaults`` a run uses: the given settings, else the recorded ones of ``pipe``'s model (a
        ``LightGenPipeline``; without one, the library's)."""
        from lightgen_model import SamplingDefaults

        base = SamplingDefaults() if pipe is None else pipe.sampling_settings()
        return base.replace(
            steps=self.steps, cfg=self.cfg, cfg_schedule=self.cfg_schedule, temperature=self.temperature
        )

    def run_keywords(self, pipe: Any) -> dict[str, Any]:
        """The `settings` and `seed` keywords of `run_generate`, `run_inpaint` and `run_geneval` for `pipe`."""
        return {"settings": self.settings(pipe), "seed": self.seed}


@dataclass
class LoadOptions:
    """How a command loads its model: component overrides, device, dtype, EMA weights, head sampling steps."""

    vae: str | None = flag(
        typer.Option(None, help="Image tokenizer: 'pixel' or a local diffusers VAE dir (default: the config's vae).")
    )
    text_encoder: str | None = flag(
        typer.Option(
            None, help="Text encoder: 'minilm' or a local transformers dir (default: the config's text_encoder)."
        )
    )
    device: str = flag(DEVICE)
    dtype: str = flag(
        typer.Option("float32", help="dtype of the LightGen network: float32, bfloat16, float16 or auto (bf16 on GPU).")
    )
    ema: bool = flag(typer.Option(True, "--ema/--no-ema", help="Use the EMA weights when the directory has them."))
    head_steps: str | None = flag(
        typer.Option(
            None,
            help="Diffusion-head sampling steps: N, 'ddimN' or 'a,b,...' (default: the config's num_sampling_steps).",
        )
    )

    verbose: bool = flag(
        typer.Option(False, "--verbose", help="Errors in full: every key of weights that do not fit the config.")
    )

    def pipeline(self, model: Path) -> Any:
        """The ``LightGenPipeline`` of the model directory ``model`` (torch is imported here: --help stays fast).

        Weights that do not fit the config are one error line naming the first few keys; with ``--verbose`` every
        key is listed on stderr first."""
        from lightgen.api import LightGenPipeline
        from lightgen_model.hub import WeightsMismatchError

        steps = self.head_steps
        head_steps = int(steps) if steps is not None and steps.strip().isdigit() else steps
        overrides = {"vae": self.vae, "text_encoder": self.text_encoder, "head_steps": head_steps}
        try:
            return LightGenPipeline.from_pretrained(
                model, **overrides, device=self.device, dtype=self.dtype, use_ema=self.ema
            )
        except WeightsMismatchError as e:
            if self.verbose:
                typer.echo("\n".join(e.details()), err=True)
                e.args = (f"{e.args[0]} (all {len(e.details())} listed above)",)
            else:
                e.args = (f"{e.args[0]}; --verbose lists them all",)
            raise


def _is_group(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def with_options(fn: Callable[..., None]) -> Callable[..., None]:
    """A typer command from ``fn``: each parameter annotated with an option group becomes the group's options
    (in place, in field order), and ``fn`` receives the group built from them."""
    hints = typing.get_type_hints(fn)
    params, groups = [], {}
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        if not _is_group(hint):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hint))
            continue
        groups[p.name] = hint
        field_hints = typing.get_type_hints(hint)
        params += [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"], annotation=field_hints[f.name]
            )
            for f in dataclasses.fields(hint)
        ]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        """``fn`` with each group built from its options."""
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        fn(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must read the signature above, not fn's
    return command
