"""Stage configs and their command-line options, written once.

A stage's config is a dataclass deriving from `StageConfig` (the run options every stage shares); each field
declared with `opt(default, help)` becomes a `--flag` of the stage's command, with that default and help text
(`command(...)` builds the typer command from the dataclass).

A stage changes the default and help of an option it inherits (from `StageConfig`, `DeviceOption`,
`ImageLimits`) in its `shared_defaults`, name -> (default, help), rather than by declaring the field again; the
field keeps its type, flag and place. Shared options that a stage does not use are named in its `shared_unused`:
they get no `--flag` and keep their defaults.

    @dataclass
    class SynthConfig(DeviceOption, StageConfig):
        shared_defaults = {"batch_size": (4, "Images per teacher call.")}
        teacher: str = opt("shapes", "flux, diffusers (any local T2I pipeline), shapes (ShapesWorld).")
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

RUN_FIELDS = (
    "workers",
    "gpus_per_worker",
    "cpus_per_worker",
    "shard_size",
    "ray_address",
    "overwrite",
    "progress",
    "dry_run",
)


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    show: str | None = None,
    required: bool = False,
) -> Any:
    """A config field with its command-line help (`flag`: the option name if not `--field-name`; `show`: the
    default as shown in --help when the value itself says little, e.g. None; `required`: the command line must
    give it, though the dataclass has a default)."""
    meta = {"help": help, "flag": flag, "show": show, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StageConfig:
    """The options every stage shares: inputs, output, and how the run is spread and resumed."""

    inputs: list[str] = opt([], "Input files, folders or globs (repeat).", flag="--input")
    output: str = opt("", "Output folder (or a pyarrow filesystem URI): shards, manifest.json, rejects, report.json.")
    batch_size: int = opt(32, "Items per model call.")
    shard_size: int = opt(1000, "Input items per output shard, where inputs can be split (the unit of resume).")
    workers: int = opt(1, "Ray workers, one model copy each; 0 = no Ray, run in this process.")
    gpus_per_worker: float | None = opt(None, "GPUs per Ray worker.", show="the GPUs shared, at most 1 each")
    cpus_per_worker: float | None = opt(None, "CPUs per Ray worker.", show="a node's CPUs shared by its workers")
    ray_address: str | None = opt(None, "Join this Ray cluster.", show="start a local Ray")
    seed: int = opt(0, "Random seed.")
    overwrite: bool = opt(False, "Replace earlier outputs instead of resuming.")
    progress: bool = opt(True, "Show a progress bar.", flag="--progress/--quiet")

    # A stage's own default and help of inherited options, name -> (default, help); see the module docstring.
    shared_defaults: ClassVar[dict[str, tuple[Any, str]]] = {}
    # Shared options a stage does not use: no --flag on its command; the fields keep their defaults.
    shared_unused: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Before `@dataclass` reads the subclass: each `shared_defaults` entry becomes a field of the subclass
        with the inherited field's type, flag and shown default, and the stage's default and help."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__annotations__", {})
        if "__annotations__" not in cls.__dict__:
            cls.__annotations__ = own
        for name, (default, help) in cls.__dict__.get("shared_defaults", {}).items():
            if name in own:
                raise TypeError(f"{cls.__name__}.{name} is declared and in shared_defaults: give it once")
            inherited, hint = _inherited(cls, name)
            meta = inherited.metadata
            flag, show, required = meta.get("flag"), meta.get("show"), meta.get("required", False)
            setattr(cls, name, opt(default, help, flag=flag, show=show, required=required))
            own[name] = hint
        for name in cls.__dict__.get("shared_unused", ()):
            _inherited(cls, name)  # a misspelt name is an error

    def check(self) -> None:
        """Checks every stage shares; errors name the bad value."""
        if not self.output:
            raise ValueError("--output is required")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = no Ray), got {self.workers}")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


@dataclass
class DeviceOption:
    """For stages that run a model."""

    device: str = opt("auto", "auto (cuda if a worker sees a GPU), cpu, cuda[:N].")
    dry_run: bool = opt(
        False,
        "Build the models on the meta device from their configs (conf/models names work) and report FLOPs, "
        "memory and shapes of one batch; read no weights, write nothing.",
    )


@dataclass
class ImageLimits:
    """For stages that decode input images."""

    max_pixels: int = opt(64_000_000, "Reject images with more pixels (decompression bombs).")
    min_size: int = opt(32, "Reject images whose shorter side is smaller.")


def _inherited(cls: type, name: str) -> tuple[dataclasses.Field, Any]:
    """The field `name` of the first dataclass base of `cls` that has it, and its type."""
    for base in cls.__mro__[1:]:
        if name in getattr(base, "__dataclass_fields__", {}):
            return base.__dataclass_fields__[name], typing.get_type_hints(base)[name]
    raise TypeError(f"{cls.__name__}: {name!r} is not an option it inherits")


def _flag(f: dataclasses.Field) -> str:
    """The option declaration of a field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    """A field's default value."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def command(
    config_cls: type, run: Callable[[Any], None], doc: str, optional: tuple[str, ...] = ()
) -> Callable[..., None]:
    """A typer command function whose options are the fields of the dataclass `config_cls`; it calls `run(config)`.
    `--input` and `--output` are required unless named in `optional`; the config's `shared_unused` get no option."""
    import typer

    hints = typing.get_type_hints(config_cls)
    shared = {f.name for f in dataclasses.fields(StageConfig)}
    # --input and --output first, then the stage's own options, then the run options every stage shares.
    order = lambda f: (f.name not in ("inputs", "output"), f.name in shared)
    params = []
    unused = getattr(config_cls, "shared_unused", ())
    for f in sorted((f for f in dataclasses.fields(config_cls) if f.name not in unused), key=order):
        default = _default(f)
        if (f.name in ("inputs", "output") and f.name not in optional) or f.metadata.get("required"):
            default = ...  # required on the command line
        show = f.metadata.get("show")
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        metavar = {bool: None, int: "INT", float: "FLOAT", str: "TEXT"}.get(kinds[0], "VALUE")
        metavar = "PATH" if f.name in ("inputs", "output") else metavar
        option = typer.Option(
            default,
            *_flag(f).split(" "),
            help=f.metadata.get("help", ""),
            show_default=show if show else True,
            metavar=metavar,
        )
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name])
        )

    def cmd(**kwargs: Any) -> None:
        run(config_cls(**kwargs))

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__doc__ = doc
    return cmd
