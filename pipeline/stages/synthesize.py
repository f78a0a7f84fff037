"""`synthesize`: captions -> teacher images in webdataset `.tar` shards (`<key>.png` + `<key>.json`).

`SynthStage` holds the stage's own logic; `pipeline.core.runner` plans, resumes, runs it (in this process or on Ray)
and writes the manifest, rejects and report. Units: the `part-*.parquet` files of a build-captions folder (or any
Parquet caption file) are cut into row ranges of `--shard-size`; a JSONL / JSON / CSV caption file (or a webdataset
tar with `.json` members) is one unit. Each image's seed is a hash of (`--seed`, caption id), so a rerun redraws the
same image. The `.json` member: id, caption, teacher, model, seed, steps, guidance, resolution and the caption's
GenEval metadata when it has some; `encode-latents` and webdataset readers take it as is.

Rejects, with reasons: unreadable rows (`missing_field`, `bad_json`, `bad_record`, `unreadable`), `empty_caption`,
`duplicate_id`, `missing_metadata` (shapes teacher), and the post-filters `blank_image` and `nsfw`. Ids are checked
for duplicates within a unit only: a check across units would need every caption on the driver, and
build-captions' output has unique ids by construction.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.core import shards, storage
from pipeline.core.options import DeviceOption, StageConfig, opt
from pipeline.core.stage import Output, Reject, Stage, WorkUnit
from pipeline.io import inputs
from pipeline.io.caption_sources import CaptionRecord, read_captions
from pipeline.io.decode import RejectError
from pipeline.io.image_sources import check_caption, raise_if_store_failed
from pipeline.models.teachers import TEACHERS, build_teacher, is_blank
from pipeline.stages.captions.build import caption_id

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir

FORMAT = "lightgen-images"
FILTERS = ("blank", "nsfw")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CAPTION_EXTS = ("parquet", "jsonl", "json", "csv", "tar")
NSFW_DETAIL = "the pipeline's safety checker flagged the image"


@dataclass
class SynthConfig(DeviceOption, StageConfig):
    """Everything `synthesize` needs; written, resolved, into the manifest."""

    shared_defaults = {
        "inputs": ([], "Caption shards (build-captions) or JSONL/JSON/CSV/Parquet files."),
        "batch_size": (4, "Images per teacher call."),
        "shard_size": (1000, "Captions per output shard, for Parquet captions (the unit of resume)."),
        "workers": (1, "Ray workers, one teacher each; 0 = no Ray, draw in this process."),
        "seed": (0, "Run seed; each image's seed is a hash of it and the caption id."),
    }

    teacher: str = opt("shapes", "flux, diffusers (any local T2I pipeline), shapes (ShapesWorld).")
    model: str | None = opt(None, "Local diffusers pipeline directory (flux, diffusers).", show="none")
    field: str = opt("caption", "The record field / column holding the caption.")
    steps: int = opt(28, "Denoising steps (flux, diffusers).")
    guidance: float = opt(3.5, "Guidance scale (flux, diffusers).")
    resolution: int = opt(512, "Image side in pixels.")
    max_sequence_length: int = opt(512, "T5 tokens per caption (Flux / SD3-like pipelines).")
    dtype: str = opt("auto", "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    post_filter: str = opt("blank,nsfw", "Reject outputs: comma-separated blank, nsfw; 'none' = off.")


def filters(spec: str) -> list[str]:
    """'blank,nsfw' -> ['blank', 'nsfw'] ('' or 'none' -> [])."""
    return [f.strip() for f in spec.split(",") if f.strip() and f.strip() != "none"]


def image_seed(seed: int, cid: str) -> int:
    """The teacher seed of caption `cid` in a run with `--seed seed` (31 bits: valid for every RNG used)."""
    return int(shards.digest([seed, cid])[:8], 16) & 0x7FFFFFFF


def sample_key(cid: str) -> str:
    """A webdataset key from a caption id: no dots or slashes (they would split the key)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", cid)


# ------------------------------------------------------------------------------------------------ reading captions


def _is_caption_file(path: PurePosixPath) -> bool:
    """A file in a caption format (empty files are left out by `inputs.expand(nonempty=True)`)."""
    return inputs.ext(path) in CAPTION_EXTS


def _check_columns(path: str, field: str, needs_metadata: bool) -> None:
    """Parquet footers and CSV headers name their columns: a misspelt `--field` is an error before any drawing."""
    if inputs.ext(path) == "parquet":
        import pyarrow.parquet as pq

        with storage.open_input(path) as f, storage.named_errors(path, "cannot read"):
            names = pq.read_schema(f).names
    elif inputs.ext(path) == "csv":
        with storage.open_buffered(path) as raw:
            names = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")), [])
    else:
        return
    if field not in names:
        raise ValueError(f"unknown --field {field!r}: {storage.public(path)} has columns {names}")
    if needs_metadata and inputs.ext(path) == "parquet" and "metadata" not in names:
        raise ValueError(
            "--teacher shapes needs ShapesWorld captions with metadata (build-captions --shapes N); "
            f"{storage.public(path)} has none"
        )


def _parquet_record(row: dict[str, Any], field: str, path: str, i: int) -> CaptionRecord:
    """A caption record from one Parquet row (errors as `caption_sources` names them)."""
    value, meta, rid = row.get(field), row.get("metadata"), row.get("id")
    caption = value if isinstance(value, str) else None
    error = "" if caption is not None else ("missing_field" if value is None else "bad_record")
    meta = json.dumps(meta) if isinstance(meta, dict) else meta
    ref = f"{posixpath.basename(path)}:{i}"
    return CaptionRecord(path, ref, caption, meta, str(rid) if rid is not None else None, error)


def read_caption_range(path: str, start: int, stop: int, field: str) -> list[CaptionRecord]:
    """Rows [start, stop) of a caption Parquet file: only the row groups that hold them, only the needed columns."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.open_input(path) if storage.is_uri(path) else path)
    stop = pf.metadata.num_rows if stop < 0 else stop
    groups, first, offset = [], None, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    names = pf.schema_arrow.names
    if not groups:
        return []
    table = pf.read_row_groups(groups, columns=[c for c in (field, "id", "metadata") if c in names])
    rows = table.slice(start - first, stop - start).to_pylist()
    return [_parquet_record(row, field, path, start + k) for k, row in enumerate(rows)]


def _unit_records(unit: WorkUnit, field: str) -> Iterator[CaptionRecord | Reject]:
    """The unit's caption records; a file that cannot be read gives one `unreadable` reject per row (or per file)."""
    path = unit.paths[0]
    name = posixpath.basename(path)
    try:
        if unit.kind == "parquet":
            yield from read_caption_range(path, unit.start, unit.stop, field)
        elif storage.is_remote(path):
            yield from _remote_captions(path, field)
        else:
            yield from read_captions([Path(path)], field)
    except (OSError, pa.ArrowException) as e:  # e.g. a file deleted or damaged after planning
        raise_if_store_failed(path, e)
        rows = range(unit.start, unit.stop) if unit.kind == "parquet" else [None]
        for i in rows:
            ref = name if i is None else f"{name}:{i}"
            yield Reject(ref, ref, "unreadable", f"{type(e).__name__}: {e}")


def _remote_captions(path: str, field: str) -> list[CaptionRecord]:
    """The records of a JSONL / JSON / CSV / tar caption file on a remote store, read from a temporary local copy
    under the same name (records name their file by its base name, so they are what a local copy gives)."""
    with tempfile.TemporaryDirectory(prefix="lightgen-captions-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        with storage.named_errors(path, "cannot read"), storage.open_buffered(path) as src, open(local, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        return read_captions([Path(local)], field)


def caption_work_item(r: CaptionRecord, seen: set[str], needs_metadata: bool) -> dict[str, Any] | Reject:
    """A caption record -> work item {id, key, caption, metadata, source}, or a `Reject` with its reason."""
    text = (r.caption or "").strip()
    try:
        check_caption(text)
        bad = ""
    except RejectError as e:
        bad, text = e.reason, text.encode("utf-8", "backslashreplace").decode()
    cid = r.id or (caption_id(text) if not bad else r.ref)
    key = sample_key(cid)
    error = r.error or bad
    error = error or ("duplicate_id" if key in seen else "")
    error = error or ("missing_metadata" if needs_metadata and not r.metadata else "")
    seen.add(key)
    if error:
        return Reject(cid, r.ref, error, text)
    return {"id": cid, "key": key, "caption": text, "metadata": r.metadata, "source": r.ref}


# ------------------------------------------------------------------------------------------------------ the stage


def _png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless: the teacher's pixels are what the student learns from)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class SynthStage(Stage):
    """Captions -> teacher images: the teacher is loaded once per worker; one batch of captions per teacher call."""

    name = "synthesize"
    help = "Teacher images for captions into webdataset .tar shards (image + .json), resumable, seeded per caption."
    summary = "synthesize: {images_this_run} images in {seconds} s ({images_per_s} images/s)"
    config = SynthConfig
    format = FORMAT
    schema = None  # webdataset tars
    cfg: SynthConfig

    def validate(self) -> None:
        """Check the settings up front, with errors that name the bad value."""
        cfg = self.cfg
        if cfg.teacher not in TEACHERS:
            raise ValueError(f"unknown --teacher {cfg.teacher!r}: expected one of {TEACHERS}")
        if cfg.teacher != "shapes" and not cfg.model:
            raise ValueError(f"--teacher {cfg.teacher} needs --model DIR (a local diffusers pipeline directory)")
        if cfg.model and not storage.is_file(storage.join(cfg.model, "model_index.json")):
            what = "a diffusers" if storage.is_remote(cfg.model) else "a local diffusers"
            shown = storage.public(cfg.model)
            raise ValueError(f"--model {shown!r} is not {what} pipeline directory (no model_index.json)")
        for name in ("steps", "resolution", "max_sequence_length"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        if cfg.teacher == "shapes" and not 32 <= cfg.resolution <= 1024:
            raise ValueError(f"--resolution {cfg.resolution} outside [32, 1024] for --teacher shapes")
        bad = [f for f in filters(cfg.post_filter) if f not in FILTERS]
        if bad:
            raise ValueError(f"unknown --post-filter {bad[0]!r}: expected a comma-separated subset of {FILTERS}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {cfg.dtype!r}: expected auto, float32, bfloat16 or float16")

    def plan(self) -> list[WorkUnit]:
        """Caption files -> units (Parquet row ranges, other files whole); their columns are checked here."""
        files = inputs.expand(self.cfg.inputs, keep=_is_caption_file, nonempty=True)
        if not files:
            raise ValueError(f"no captions in inputs: {list(self.cfg.inputs)} (no non-empty {CAPTION_EXTS} files)")
        for f in files:
            _check_columns(f, self.cfg.field, needs_metadata=self.cfg.teacher == "shapes")
        return inputs.plan_units(files, self.cfg.shard_size)

    def content(self) -> dict[str, Any]:
        """The settings that determine the images: the model directory resolved; the device left out."""
        out = super().content()
        out.pop("device")
        if out["model"]:
            out["model"] = (
                storage.public(out["model"]) if storage.is_uri(out["model"]) else str(Path(out["model"]).resolve())
            )
        return out

    def setup(self) -> None:
        """Load the teacher (once per worker)."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {"resolution": cfg.resolution}
        if cfg.teacher != "shapes":
            keys = ("device", "dtype", "steps", "guidance", "max_sequence_length")
            model = storage.local_copy(cfg.model)  # a remote folder: copied once per node
            kwargs.update({k: getattr(cfg, k) for k in keys}, model=str(Path(model).resolve()))
        self.teacher = build_teacher(cfg.teacher, **kwargs)
        self.filters = filters(cfg.post_filter)

    def read(self, unit: WorkUnit) -> Iterator[dict[str, Any] | Reject]:
        """The unit's captions as work items; unreadable, empty, repeated or (shapes) metadata-less ones as rejects."""
        seen: set[str] = set()
        needs_metadata = self.cfg.teacher == "shapes"
        for r in _unit_records(unit, self.cfg.field):
            yield r if isinstance(r, Reject) else caption_work_item(r, seen, needs_metadata)

    def process(self, items: Sequence[dict[str, Any]]) -> Output:
        """One teacher call; kept images become tar samples, post-filtered ones rejects."""
        seeds = [image_seed(self.cfg.seed, it["id"]) for it in items]
        images, nsfw = self.teacher([it["caption"] for it in items], [it["metadata"] for it in items], seeds)
        samples, rejects = [], []
        for it, image, seed, flagged in zip(items, images, seeds, nsfw, strict=True):
            if "nsfw" in self.filters and flagged:
                rejects.append(Reject(it["id"], it["source"], "nsfw", NSFW_DETAIL))
            elif "blank" in self.filters and is_blank(image):
                rejects.append(Reject(it["id"], it["source"], "blank_image", f"pixel std {float(image.std()):.2f} < 2"))
            else:
                samples.append({"__key__": it["key"], "png": _png(image), "json": self.sidecar(it, seed)})
        return Output(samples, rejects)

    def sidecar(self, item: dict[str, Any], seed: int) -> bytes:
        """The sample's `.json` member."""
        diffusion = self.cfg.teacher != "shapes"
        obj = {
            "id": item["id"],
            "caption": item["caption"],
            "teacher": self.cfg.teacher,
            "model": self.teacher.name,
            "seed": seed,
            "steps": self.cfg.steps if diffusion else None,
            "guidance": self.cfg.guidance if diffusion else None,
            "resolution": self.cfg.resolution,
        }
        if item["metadata"]:
            obj["metadata"] = json.loads(item["metadata"])
        return json.dumps(obj, sort_keys=True).encode()

    def shard_meta(self) -> dict[str, Any]:
        """Teacher, its model name and the image side, recorded with each shard and in the manifest."""
        return {"teacher": self.cfg.teacher, "teacher_model": self.teacher.name, "resolution": self.cfg.resolution}

    def report(self, counts: dict[str, Any]) -> dict[str, Any]:
        """Images drawn in this run and their rate."""
        drawn, seconds = counts["written_this_run"], counts["seconds"]
        return {"images_this_run": drawn, "images_per_s": round(drawn / seconds, 3) if seconds > 0 else None}

    @classmethod
    def dry_run(cls, cfg: SynthConfig) -> dict[str, Any]:
        """The teacher at full size on the meta device, one batch."""
        from pipeline.core.dryrun import dry_synthesize

        return dry_synthesize(cfg)

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """A grid of sampled teacher images, their captions and settings."""
        from pipeline.inspect.media import images_section

        return images_section(folder, limit, seed)
