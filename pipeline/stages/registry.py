"""The registered stages, one line each: `lightgen-data`'s commands and `lightgen-data inspect`'s formats are
generated from this list (see `pipeline.core.stage.Stage` for what a stage class declares)."""

from __future__ import annotations

import dataclasses

from pipeline.core.options import StageConfig
from pipeline.core.stage import Stage
from pipeline.stages.captions.build import CaptionsStage
from pipeline.stages.dpo_pairs.judging import JudgeStage
from pipeline.stages.dpo_pairs.pairs import PairsStage
from pipeline.stages.encode_latents import EncodeStage
from pipeline.stages.synthesize import SynthStage

STAGES: list[type[Stage]] = [
    CaptionsStage,
    SynthStage,
    EncodeStage,
    JudgeStage,
    PairsStage,
]


def register(stage: type[Stage]) -> type[Stage]:
    """Add a stage after the built-in ones (usable as a class decorator); its command name and output format must be
    new. `pipeline.cli.make_app()` builds the command line from the stages registered when it is called."""
    missing = [a for a in ("name", "format", "config") if not hasattr(stage, a)]
    if missing or not (isinstance(stage, type) and issubclass(stage, Stage)):
        what = f"lacks {', '.join(missing)}" if missing else "is not a Stage subclass"
        raise ValueError(f"cannot register {stage!r}: it {what} (see pipeline/core/stage.py)")
    if not (dataclasses.is_dataclass(stage.config) and issubclass(stage.config, StageConfig)):
        raise ValueError(f"cannot register {stage.name!r}: its config {stage.config!r} is not a StageConfig dataclass")
    for other in STAGES:
        if other is not stage and (other.name == stage.name or other.format == stage.format):
            raise ValueError(f"stage {stage.name!r} ({stage.format}) clashes with {other.name!r} ({other.format})")
    if stage not in STAGES:
        STAGES.append(stage)
    return stage


def formats() -> tuple[str, ...]:
    """The output formats `inspect` reads: one per registered stage."""
    return tuple(s.format for s in STAGES)


def by_format(fmt: str) -> type[Stage]:
    """The stage that writes outputs of format `fmt`."""
    for s in STAGES:
        if s.format == fmt:
            return s
    raise KeyError(f"no registered stage writes {fmt!r}; known: {', '.join(formats())}")
