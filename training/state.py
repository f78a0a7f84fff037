"""The trainer's counters (`TrainState`), torchtitan's shape: the state owns `state_dict()` / `load_state_dict()`,
and what a checkpoint must hold of it is derived from its fields (`TrainState.problems`), not listed again."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _natural(v: Any) -> bool:
    return type(v) is int and v >= 0


def _seconds(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


# a field's annotation -> whether a state.json value is of that type
_CHECKS = {"int": _natural, "float": _seconds, "int | None": lambda v: v is None or _natural(v)}


@dataclass
class TrainState:
    """The counters a checkpoint's state.json carries at its top level (the loader's position beside them)."""

    step: int = 0
    elapsed_s: float = 0.0  # training time, summed over resumes (what train.budget_minutes limits)
    nonfinite: int = 0  # skipped steps in total
    schedule_total: int | None = None  # the lr schedule's length, fixed by the run that started it

    def state_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take every field from `state` (a checkpoint's state document, checked by `problems`)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])

    @classmethod
    def problems(cls, doc: dict[str, Any]) -> list[str]:
        """The fields missing from `doc` or of the wrong type, in field order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in doc or not _CHECKS[str(f.type)](doc[f.name])]
