"""`judge-images`, the first stage of `build-dpo-pairs`: images with captions -> judgement shards.

Per input: the caption, the image's bytes, the optional aesthetic score and ShapesWorld metadata are read and
screened (aesthetic filter, metadata for the shapes judge, decoding and size checks); what fails becomes a `Reject`
with a reason. The rest go to the judge (`pipeline.models.judges`) a batch at a time. Every image the judge saw is a row of
`JUDGEMENT_SCHEMA` (kept or not, with the raw answer and the image's bytes) in `<output>/judgements/`, which the
pairs stage (`pipeline.stages.dpo_pairs.pairs`) reads.

Inputs: webdataset `.tar` shards and image folders (`pipeline.io.image_sources`: captions and extra fields from the `.json`
member, a `captions.jsonl` line or a sidecar) and Parquet files with an image column (bytes, or a struct with
`bytes` as Hugging Face datasets store it), a caption column and optional aesthetic, `metadata` and `id` columns.
One unit per tar, per `--shard-size` image files and per `--shard-size` rows of a Parquet file; a repeated id
(only a Parquet `id` column can repeat one) is rejected as `duplicate_id` within its unit. Folders holding other
stages' outputs (latents, captions, pairs, judgements) are never inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.core import storage
from pipeline.core.schema import (
    JUDGEMENT_FORMAT,
    JUDGEMENT_SCHEMA,
    JUDGEMENT_SCHEMA_VERSION,
    PAIR_FORMAT,
)
from pipeline.core.stage import Output, Reject, Stage, WorkUnit, quiet_hf
from pipeline.io import inputs
from pipeline.io.decode import RejectError, decode_image
from pipeline.io.image_sources import (
    BlobReader,
    JsonlIndex,
    Raw,
    check_caption,
    folder_of,
    input_folders,
    raise_if_store_failed,
    read_raws,
    unit_records,
)
from pipeline.models.judges import Judge, Judgement, build_judge, judge_batch
from pipeline.stages.dpo_pairs.config import PairsConfig, check_judge_options, judge_content

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir

JUDGEMENTS = "judgements"  # sub-folder of the pairs output holding the judge stage's output
CAPTION_FIELDS = ("caption", "prompt", "text", "TEXT")
IMAGE_FIELDS = ("image", "jpg", "jpeg", "png", "webp", "img")
AESTHETIC_FIELDS = ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE")
# Folders written by the other stages: never image sources of this one (synthesize's are).
NOT_SOURCES = ("lightgen-latents", "lightgen-captions", PAIR_FORMAT, JUDGEMENT_FORMAT)


@dataclass
class Sample:
    """One screened input, ready for the judge."""

    raw: Raw
    aesthetic: float | None
    metadata: dict[str, Any] | None
    pixels: Image.Image
    where: str = ""  # raw.source relative to the inputs' common folder: the same wherever the inputs live


def relative_source(source: str, base: str) -> str:
    """`source` (a file, `file:row`, local or URI) relative to `base`, the inputs' common folder, when below it."""
    head = base.rstrip("/") + "/"
    return source[len(head) :] if base and source.startswith(head) else source


def judgements_dir(output: str) -> str:
    """`<output>/judgements`: where the judge stage of a `build-dpo-pairs` run writes (paths or URIs)."""
    return f"{str(output).rstrip('/')}/{JUDGEMENTS}"


# ------------------------------------------------------------------------------------------------ reading inputs


def _pick(names: Sequence[str], wanted: str | None, candidates: Sequence[str], flag: str, path: str) -> str | None:
    """The column for `flag`: `wanted` (must exist) or the first candidate present (None if none is)."""
    if wanted:
        if wanted not in names:
            raise ValueError(f"unknown {flag} {wanted!r}: {storage.public(path)} has columns {list(names)}")
        return wanted
    return next((c for c in candidates if c in names), None)


def _parquet_file(path: str) -> pq.ParquetFile:
    """A Parquet input (local path or URI), its footer read."""
    with storage.named_errors(path, "cannot read"):
        return pq.ParquetFile(storage.open_input(path) if storage.is_uri(path) else path)


def parquet_columns(path: str, cfg: PairsConfig) -> dict[str, str | None]:
    """The columns of a Parquet input holding caption, image, aesthetic score, metadata and id (from its footer)."""
    names = _parquet_file(path).schema_arrow.names
    columns = {
        "caption": _pick(names, cfg.caption_field, CAPTION_FIELDS, "--caption-field", path),
        "image": _pick(names, cfg.image_field, IMAGE_FIELDS, "--image-field", path),
        "aesthetic": _pick(names, cfg.aesthetic_field, AESTHETIC_FIELDS, "--aesthetic-field", path),
        "metadata": "metadata" if "metadata" in names else None,
        "id": "id" if "id" in names else None,
    }
    for key, flag in (("caption", "--caption-field"), ("image", "--image-field")):
        if columns[key] is None:
            raise ValueError(
                f"{storage.public(path)} has no {key} column (tried {flag} candidates); columns: {list(names)}"
            )
    return columns


def _parquet_raw(rid: str, source: str, row: dict[str, Any], columns: dict[str, str | None]) -> Raw:
    """Caption, image bytes and extra fields of a Parquet row; `RejectError` with the first problem found."""
    caption = row.get(columns["caption"])
    if caption is None:
        raise RejectError("missing_caption", f"column {columns['caption']!r} is null")
    if not isinstance(caption, str):
        raise RejectError("bad_caption", f"column {columns['caption']!r} holds {type(caption).__name__}")
    caption = check_caption(caption)
    image = row.get(columns["image"])
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        if image.get("bytes") is None and image.get("path"):
            raise RejectError("missing_image", f"image {image['path']!r} is a path only (no bytes in the file)")
        image = image.get("bytes")
    if image is None:
        raise RejectError("missing_image", f"column {columns['image']!r} is null")
    if not isinstance(image, bytes | bytearray):
        raise RejectError("missing_image", f"column {columns['image']!r} holds {type(image).__name__}, not bytes")
    fields = {c: row.get(c) for key in ("aesthetic", "metadata") if (c := columns[key])}
    return Raw(rid, source, caption, bytes(image), fields)


def parquet_rows(unit: WorkUnit, cfg: PairsConfig) -> Iterator[Raw | Reject]:
    """Rows [start, stop) of a Parquet unit, read a row group at a time. Ids: the `id` column where there is one,
    else `<file path without suffix>/<row number>`."""
    path = unit.paths[0]
    columns = parquet_columns(path, cfg)
    pf = _parquet_file(path)
    stop = pf.metadata.num_rows if unit.stop < 0 else unit.stop
    rel = storage.relative(path, unit.base) if storage.is_uri(path) else Path(path).relative_to(unit.base).as_posix()
    prefix = posixpath.splitext(rel)[0]
    wanted = sorted({c for c in columns.values() if c})
    first = 0
    for group in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        lo, hi = max(unit.start, first), min(stop, first + n)
        if lo < hi:
            try:
                rows: list[Any] = pf.read_row_group(group, columns=wanted).slice(lo - first, hi - lo).to_pylist()
            except (OSError, pa.ArrowException) as e:
                raise_if_store_failed(path, e)
                rows = [RejectError("read_error", f"{path} row group {group}: {type(e).__name__}: {e}")] * (hi - lo)
            for r, row in zip(range(lo, hi), rows, strict=True):
                given = row.get(columns["id"]) if columns["id"] and isinstance(row, dict) else None
                rid, source = (f"{prefix}/{r:06d}" if given is None else str(given)), f"{path}:{r}"
                try:
                    if isinstance(row, RejectError):
                        raise row
                    yield _parquet_raw(rid, source, row, columns)
                except RejectError as e:
                    yield Reject(rid, source, e.reason, str(e))
        first += n


def _aesthetic(fields: dict[str, Any], field: str | None) -> tuple[float | None, str]:
    """(score, problem) of the aesthetic field of a record's extra fields; (None, "") when it has none."""
    key = field if field else next((k for k in AESTHETIC_FIELDS if k in fields), None)
    value = fields.get(key) if key else None
    if value is None:
        return None, ""
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean")
        score = float(value)
        if not math.isfinite(score):
            raise ValueError("not finite")
    except (TypeError, ValueError) as e:
        return None, f"aesthetic field {key!r} = {value!r} is not a number ({e})"
    return score, ""


def _metadata(fields: dict[str, Any]) -> dict[str, Any] | None:
    """GenEval / ShapesWorld metadata of a record: its `metadata` field (object or JSON text), or the record itself
    when it is a GenEval metadata line (`tag` + `include`); None when it has none."""
    meta = fields.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise RejectError("bad_metadata", f"metadata is not valid JSON: {e}") from e
    if meta is None and "tag" in fields and "include" in fields:
        meta = {k: v for k, v in fields.items() if k not in CAPTION_FIELDS}
    if meta is not None and not isinstance(meta, dict):
        raise RejectError("bad_metadata", f"metadata is not a JSON object: {meta!r:.200}")
    return meta


def load_judge(cfg: PairsConfig) -> Judge:
    """The judge the settings name, loaded (the judge stage's, and the pairs stage's with --judge-losers)."""
    if cfg.judge_backend != "shapes":
        quiet_hf()
    model = str(Path(storage.local_copy(cfg.judge_model)).resolve()) if cfg.judge_model else None
    return build_judge(
        cfg.judge_backend,
        model,
        device=cfg.device,
        dtype=cfg.judge_dtype,
        max_new_tokens=cfg.judge_max_new_tokens,
        max_pixels=cfg.judge_max_pixels,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        max_model_len=cfg.vllm_max_model_len,
        seed=cfg.seed,
    )


def ask_judge(
    judge: Judge, images: list[Image.Image], captions: list[str], metadata: list[dict | None], min_score: float
) -> list[Judgement | str]:
    """Judgements for a batch. An image the judge refuses (ValueError, e.g. an extreme aspect ratio for Qwen's
    resizer) gets its error text instead, found by retrying the batch one by one; other errors end the run."""
    try:
        return list(judge_batch(judge, images, captions, metadata, min_score))
    except ValueError:
        pass
    out: list[Judgement | str] = []
    for i in range(len(images)):
        try:
            out.append(judge_batch(judge, images[i : i + 1], captions[i : i + 1], metadata[i : i + 1], min_score)[0])
        except ValueError as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


# ----------------------------------------------------------------------------------------------------- the stage


class JudgeStage(Stage):
    """Images with captions -> judgement rows (`JUDGEMENT_SCHEMA`); loads the judge once per worker.

    Its config is the run's `PairsConfig` with `output` set to `judgements_dir(<pairs output>)`."""

    name = "judge-images"
    has_command = False  # run by build-dpo-pairs, into <output>/judgements/
    config = PairsConfig
    format = JUDGEMENT_FORMAT
    schema_version = JUDGEMENT_SCHEMA_VERSION
    schema = JUDGEMENT_SCHEMA
    dictionary_columns = ("judge",)
    cfg: PairsConfig

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """Sampled judgements (kept or not) with their images and answers, then the images turned down."""
        from pipeline.inspect.media import judged_rejected_section, judgements_section

        return judgements_section(folder, limit, seed) + judged_rejected_section(folder, limit, seed)

    def validate(self) -> None:
        """Check the judge's settings up front (no weights loaded)."""
        check_judge_options(self.cfg)

    def content(self) -> dict[str, Any]:
        """The settings that determine the judgements."""
        return judge_content(self.cfg)

    def plan(self) -> list[WorkUnit]:
        """One unit per input tar, per `--shard-size` images and per `--shard-size` rows of a Parquet file."""
        formats: dict[str, str | None] = {}

        def output_format(folder: str) -> str | None:
            """The `format` of the pipeline output in `folder`, if it holds one."""
            if folder not in formats:
                manifest = storage.join(folder, "manifest.json")
                try:
                    formats[folder] = json.loads(storage.read_bytes(manifest)).get("format")
                except (OSError, ValueError, AttributeError) as e:
                    raise_if_store_failed(manifest, e)  # a missing manifest is no pipeline output; a failed store ends
                    formats[folder] = None
            return formats[folder]

        for spec in map(str, self.cfg.inputs):
            if storage.is_dir(spec) and output_format(folder_of(spec)) in NOT_SOURCES:
                shown = storage.public(spec)
                raise ValueError(f"input {shown} holds {output_format(folder_of(spec))!r} shards, not images")
        ok_ext = ("tar", "parquet", *inputs.IMAGE_EXTS)
        files = inputs.expand(self.cfg.inputs, keep=lambda p: inputs.ext(p) in ok_ext)
        files = [f for f in files if output_format(storage.parent(f)) not in NOT_SOURCES]
        if not files:
            raise ValueError(f"no .tar shards, images or Parquet files found in inputs: {list(self.cfg.inputs)}")
        for f in files:
            if inputs.ext(f) == "parquet":
                parquet_columns(f, self.cfg)  # a missing or unknown column is an error now, not a reject per row
        return inputs.plan_units(files, self.cfg.shard_size)

    def setup(self) -> None:
        """Load the judge; open the readers."""
        self.judge = load_judge(self.cfg)
        self.blobs = BlobReader()
        self.folders = input_folders(self.cfg.inputs)
        self.jsonl = JsonlIndex()  # captions.jsonl files are read once per worker, not once per unit

    def shard_meta(self) -> dict[str, Any]:
        """The judge's name (backend and model)."""
        return {"judge": self.judge.name}

    def read(self, unit: WorkUnit) -> Iterator[Sample | Reject]:
        """The unit's screened inputs; a `Reject` with the first problem for the others."""
        seen: set[str] = set()  # ids repeat only where a Parquet `id` column repeats one
        raws = (
            parquet_rows(unit, self.cfg)
            if unit.kind == "parquet"
            else read_raws(unit_records(unit, self.folders, self.jsonl), self.blobs)
        )
        for raw in raws:
            if isinstance(raw, Reject):
                yield raw
            elif raw.id in seen:
                yield Reject(raw.id, raw.source, "duplicate_id", "an earlier input has the same id")
            else:
                seen.add(raw.id)
                try:
                    yield dataclasses.replace(self._screen(raw), where=relative_source(raw.source, unit.base))
                except RejectError as e:
                    yield Reject(raw.id, raw.source, e.reason, str(e))

    def _screen(self, raw: Raw) -> Sample:
        """Aesthetic filter, metadata (shapes judge), decoding and size checks; `RejectError` for the first failure."""
        cfg = self.cfg
        aesthetic, problem = _aesthetic(raw.fields, cfg.aesthetic_field)
        if cfg.min_aesthetic is not None:
            if problem:
                raise RejectError("bad_aesthetic", problem)
            if aesthetic is None:
                raise RejectError("missing_aesthetic", "no aesthetic score, and --min-aesthetic is set")
            if aesthetic < cfg.min_aesthetic:
                raise RejectError(
                    "below_min_aesthetic", f"aesthetic {aesthetic:g} < --min-aesthetic {cfg.min_aesthetic:g}"
                )
        metadata = _metadata(raw.fields)
        if cfg.judge_backend == "shapes":
            if metadata is None:
                raise RejectError(
                    "missing_metadata", "the shapes judge needs ShapesWorld metadata (synthesize's .json)"
                )
            from shapesworld.world import validate_metadata

            try:
                validate_metadata(metadata)
            except ValueError as e:
                raise RejectError("bad_metadata", str(e)) from e
        pixels = decode_image(raw.image, max_pixels=cfg.max_pixels, min_size=cfg.min_size)
        return Sample(raw, aesthetic, metadata, pixels)

    def process(self, items: Sequence[Sample]) -> Output:
        """Judge a batch: one row per image, kept or not; an image the judge refuses is a `judge_error` reject."""
        rows, rejects = [], []
        for s, j in zip(items, self._ask(items), strict=True):
            if isinstance(j, str):
                rejects.append(Reject(s.raw.id, s.raw.source, "judge_error", j))
                continue
            rows.append(
                {
                    "id": s.raw.id,
                    "source": s.where,
                    "caption": s.raw.caption,
                    "image": s.raw.image,
                    "metadata": None if s.metadata is None else json.dumps(s.metadata, sort_keys=True),
                    "aesthetic": s.aesthetic,
                    "judge": self.judge.name,
                    "judge_answer": j.answer,
                    "judge_score": j.score,
                    "kept": j.kept,
                    "reason": j.reason,
                    "detail": j.detail,
                }
            )
        return Output(pa.Table.from_pylist(rows, schema=JUDGEMENT_SCHEMA), rejects)

    def _ask(self, items: Sequence[Sample]) -> list[Judgement | str]:
        """Judgements for a batch (`ask_judge`)."""
        return ask_judge(
            self.judge,
            [s.pixels for s in items],
            [s.raw.caption for s in items],
            [s.metadata for s in items],
            self.cfg.min_judge_score,
        )
