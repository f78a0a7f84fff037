"""A toy stage for the runner's tests: text files of integers -> Parquet rows (value, square).

Lines that are not integers are rejected (`not_an_int`). Fault injection for the tests: a line `die` kills the worker
process once (it leaves `<output>/died` behind, so the retry succeeds); a line `sleep` sleeps 30 s; a line `boom`
raises while `TOY_BOOM` is set in the environment.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core import storage
from pipeline.core.options import StageConfig, opt
from pipeline.core.stage import Output, Reject, Stage, WorkUnit
from pipeline.io import inputs

TOY_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("value", pa.int64()), pa.field("square", pa.int64())])


@dataclass
class ToyConfig(StageConfig):
    """Toy settings."""

    shared_defaults = {"batch_size": (2, "Items per call.")}

    offset: int = opt(0, "Added to every value.")


class ToyStage(Stage):
    """Squares integers."""

    name = "toy"
    format = "toy-squares"
    schema = TOY_SCHEMA

    def plan(self) -> list[WorkUnit]:
        files = inputs.expand(self.cfg.inputs, keep=lambda p: p.suffix == ".txt")
        return inputs.plan_units(files, self.cfg.shard_size)

    def setup(self) -> None:
        self.pid = os.getpid()

    def read(self, unit: WorkUnit) -> Iterator[Any]:
        path = unit.paths[0]
        rel = posixpath.splitext(storage.relative(path, unit.base))[0]
        for n, line in enumerate(storage.read_bytes(path).decode().splitlines()):
            rid = f"{rel}/{n}"
            if line.strip() in ("die", "sleep", "boom"):
                yield (rid, line.strip())
                continue
            try:
                yield (rid, int(line))
            except ValueError:
                yield Reject(rid, path, "not_an_int", repr(line[:40]))

    def process(self, items: Sequence[Any]) -> Output:
        rows, rejects = [], []
        for rid, value in items:
            if value == "die":
                marker = Path(self.cfg.output) / "died"
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)
                rejects.append(Reject(rid, "", "died_once", "the worker died on this item and was retried"))
            elif value == "sleep":
                time.sleep(30)
            elif value == "boom" and os.environ.get("TOY_BOOM"):
                raise RuntimeError("boom")
            elif isinstance(value, int):
                v = value + self.cfg.offset
                rows.append({"id": rid, "value": v, "square": v * v})
            else:
                rejects.append(Reject(rid, "", "special", value))
        return Output(pa.Table.from_pylist(rows, schema=TOY_SCHEMA), rejects)
