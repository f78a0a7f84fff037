"""What a pipeline stage is: its own logic only. `pipeline.core.runner` does the rest for every stage.

A stage is one module plus one line in `pipeline/stages/registry.py`; its command (`lightgen-data <name>`) and its
`inspect` page are generated from the class. A stage class declares its name, output `format`, output kind (Parquet
with an Arrow `schema`, or webdataset tar), its `config` dataclass (the command's options), its `help` line, and
four methods:

- `validate()` (driver): check the settings up front, with errors that name the bad value; no models loaded.
- `plan()` (driver): the work units, one per output shard (`WorkUnit`: file paths and row ranges, never rows).
- `setup()` (worker): load models, once per worker.
- `read(unit)` (worker): the unit's items, or `Reject`s for inputs that cannot be read.
- `process(items)` (worker): one batch of items -> `Output` (rows or tar samples, and rejects with reasons).

Optional: `content()` (the settings that determine the rows, digested into the config digest; default: every
config field but the run options), `shard_meta()` (extra per-shard metadata such as encoder names, merged into the
manifest when every shard agrees), `report(counts)` (extra report fields), `summary` (a line printed before the
JSON report), `inspect_sections(...)` (the inspect page's own part; default: a table of sampled rows), `dry_run(cfg)`
(full-size models on the meta device) and `run(cfg)` (default: the runner's plan/resume/run; a stage made of global
phases, like build-captions, runs them itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.core.options import RUN_FIELDS, StageConfig

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir


@dataclass(frozen=True)
class WorkUnit:
    """The inputs of output shard `index`: whole files (`paths`) or rows [start, stop) of one file."""

    index: int
    kind: str  # what `paths` are: "tar", "images", "parquet", "captions", ... (the stage's reader decides)
    paths: tuple[str, ...]
    start: int = 0
    stop: int = -1  # -1: to the end
    base: str = ""  # the common parent of all inputs: ids are relative to it

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (units travel to workers as plain data)."""
        return {**asdict(self), "paths": list(self.paths)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> WorkUnit:
        """Inverse of `to_json`."""
        return WorkUnit(**{**d, "paths": tuple(d["paths"])})

    def digest(self) -> str:
        """Identifies the unit's inputs across runs: paths, sizes and modification times (through the input's
        filesystem: a local disk or a URI's store), and the row range. A store that does not answer is an error."""
        from pipeline.core import storage

        stats = []
        for p in self.paths:
            if storage.is_uri(p):
                info = storage.file_info(p)  # raises StorageError naming the URI when the store is unreachable
                found = info.type == pafs.FileType.File
                stats.append([p, info.size, info.mtime_ns] if found else [p, None, None])
                continue
            try:
                st = Path(p).stat()
                stats.append([p, st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([p, None, None])  # a vanished input: the worker rejects its rows with a reason
        obj = [self.kind, stats, self.start, self.stop, self.base]
        return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


@dataclass(frozen=True)
class Reject:
    """An input that did not make it into the output, and why."""

    id: str
    source: str
    reason: str
    detail: str = ""


@dataclass
class Output:
    """What `process` returns for one batch: rows (a table with the stage's schema, or tar samples) and rejects.

    A tar sample is a dict {"__key__": key, ext: bytes, ...} as webdataset writes it.
    """

    rows: pa.Table | list[dict[str, Any]] | None = None
    rejects: list[Reject] = field(default_factory=list)


class Stage:
    """Base class of the pipeline's stages; see the module docstring for what a subclass provides."""

    name: ClassVar[str]  # the command, e.g. "encode-latents"
    format: ClassVar[str]  # manifest `format`, e.g. "lightgen-latents"
    schema_version: ClassVar[int] = 1
    schema: ClassVar[pa.Schema | None] = None  # Parquet output schema; None: webdataset tar output
    dictionary_columns: ClassVar[tuple[str, ...]] = ()  # Parquet columns worth dictionary encoding
    # What the registry makes a command of:
    config: ClassVar[type[StageConfig]]  # the settings dataclass: its fields are the command's options
    help: ClassVar[str] = ""  # the command's --help text
    summary: ClassVar[str | None] = None  # a line printed before the JSON report: a template over the report's keys
    has_command: ClassVar[bool] = True  # False: run inside another stage's command (its output still gets inspected)
    optional_options: ClassVar[tuple[str, ...]] = ()  # of "inputs" / "output", those the command does not require

    @classmethod
    def run(cls, cfg: StageConfig) -> dict[str, Any]:
        """Run the stage end to end (resuming unless `cfg.overwrite`); returns the report also written to disk."""
        from pipeline.core.runner import run_stage

        return run_stage(cls(cfg))

    @classmethod
    def dry_run(cls, cfg: StageConfig) -> dict[str, Any]:
        """`--dry-run`: the stage's models at full size on the meta device (only stages that run a model)."""
        raise ValueError(f"--dry-run is not available for {cls.name}")

    @classmethod
    def report_lines(cls, report: dict[str, Any]) -> list[str]:
        """What the command prints when the run ends: the `summary` line, then the report as JSON."""
        head = [cls.summary.format(**report)] if cls.summary else []
        return [*head, json.dumps(report)]

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """This stage's part of its output's inspect page (HTML); default: a table of sampled rows."""
        from pipeline.inspect.rows import rows_section

        return rows_section(folder, limit, seed)

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg

    @property
    def output_ext(self) -> str:
        """`parquet` or `tar`."""
        return "parquet" if self.schema is not None else "tar"

    # ---- driver side
    def validate(self) -> None:
        """Check the settings (no models loaded); raise ValueError naming the bad value."""

    def plan(self) -> list[WorkUnit]:
        """The work units, one per output shard, in a deterministic order."""
        raise NotImplementedError

    def content(self) -> dict[str, Any]:
        """The settings that determine the rows (a resume refuses shards made with other values)."""
        run = set(RUN_FIELDS) | {"inputs", "output", "batch_size"}
        out = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg) if f.name not in run}
        return {**out, "schema_version": self.schema_version}

    def report(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Extra report fields computed from the run's counts (default: none)."""
        return {}

    # ---- worker side
    def setup(self) -> None:
        """Load models; called once per worker, before the first unit that needs computing."""

    def read(self, unit: WorkUnit) -> Iterator[Any | Reject]:
        """The unit's items in order; an input that cannot be read is yielded as a `Reject`."""
        raise NotImplementedError

    def process(self, items: Sequence[Any]) -> Output:
        """One batch of items -> rows and rejects."""
        raise NotImplementedError

    def shard_meta(self) -> dict[str, Any]:
        """Extra metadata recorded with each shard (e.g. encoder names); merged into the manifest."""
        return {}


def quiet_hf() -> None:
    """No per-worker "Loading weights" bars from transformers (call it in `setup`): the run shows one, over shards."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
