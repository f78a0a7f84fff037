"""`synthesize`: captions -> teacher images in webdataset `.tar` shards (`<key>.png` + `<key>.json`).

`Synthesizer` is the stage: it loads the teacher once per worker and turns a shard task (a list of caption items)
into one `part-NNNNN.tar` plus its rejects. `run_synthesize(cfg)` reads the captions (caption shards of
`build-captions`, or JSONL / Parquet / CSV / webdataset files with `--field`), cuts them into shards by position,
skips the shards a previous run finished, maps the stage over the rest (in process or on Ray), then writes
`rejects.parquet`, `manifest.json` and `report.json`. Each image's seed is a hash of (`--seed`, caption id), so a
rerun redraws the same image. The `.json` member: id, caption, teacher, model, seed, steps, guidance, resolution
and the caption's GenEval metadata when it has some; `encode-latents` and webdataset readers take it as is.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import shards
from pipeline.caption_sources import read_captions
from pipeline.captions import caption_id
from pipeline.teachers import TEACHERS, build_teacher, is_blank

FORMAT = "lightgen-images"
SCHEMA_VERSION = 1
FILTERS = ("blank", "nsfw")
CONTENT_KEYS = (
    *("teacher", "model", "field", "steps", "guidance", "resolution", "max_sequence_length", "dtype", "seed"),
    *("post_filter", "shard_size"),
)


@dataclass
class SynthConfig:
    """Everything `synthesize` needs; written, resolved, into the manifest."""

    inputs: list[str]
    output: str
    teacher: str = "shapes"
    model: str | None = None
    field: str = "caption"
    steps: int = 28
    guidance: float = 3.5
    resolution: int = 512
    max_sequence_length: int = 512
    batch_size: int = 4
    shard_size: int = 1000
    workers: int = 1
    gpus_per_worker: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    ray_address: str | None = None
    seed: int = 0
    overwrite: bool = False
    post_filter: str = "blank,nsfw"
    progress: bool = False

    def content(self) -> dict[str, Any]:
        """The settings that determine the images (the model directory resolved to an absolute path)."""
        out = {k: getattr(self, k) for k in CONTENT_KEYS}
        if out["model"]:
            out["model"] = str(Path(out["model"]).resolve())
        return {**out, "schema_version": SCHEMA_VERSION}


def validate(cfg: SynthConfig) -> None:
    """Check a config up front, with errors that name the bad value."""
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"unknown --teacher {cfg.teacher!r}: expected one of {TEACHERS}")
    if cfg.teacher != "shapes" and not cfg.model:
        raise ValueError(f"--teacher {cfg.teacher} needs --model DIR (a local diffusers pipeline directory)")
    if cfg.model and not (Path(cfg.model) / "model_index.json").is_file():
        raise ValueError(f"--model {cfg.model!r} is not a local diffusers pipeline directory (no model_index.json)")
    for name in ("steps", "resolution", "max_sequence_length", "batch_size", "shard_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = no Ray), got {cfg.workers}")
    if cfg.teacher == "shapes" and not 32 <= cfg.resolution <= 1024:
        raise ValueError(f"--resolution {cfg.resolution} outside [32, 1024] for --teacher shapes")
    bad = [f for f in filters(cfg.post_filter) if f not in FILTERS]
    if bad:
        raise ValueError(f"unknown --post-filter {bad[0]!r}: expected a comma-separated subset of {FILTERS}")
    if cfg.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"unknown --dtype {cfg.dtype!r}: expected auto, float32, bfloat16 or float16")


def filters(spec: str) -> list[str]:
    """'blank,nsfw' -> ['blank', 'nsfw'] ('' or 'none' -> [])."""
    return [f.strip() for f in spec.split(",") if f.strip() and f.strip() != "none"]


def image_seed(seed: int, cid: str) -> int:
    """The teacher seed of caption `cid` in a run with `--seed seed` (31 bits: valid for every RNG used)."""
    return int(shards.digest([seed, cid])[:8], 16) & 0x7FFFFFFF


def sample_key(cid: str) -> str:
    """A webdataset key from a caption id: no dots or slashes (they would split the key)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", cid)


def caption_items(inputs: list[str], field: str, needs_metadata: bool) -> list[dict[str, Any]]:
    """Caption records -> work items {id, key, caption, metadata, source, error} in input order.

    Unreadable captions, repeated ids (or keys) and, for the shapes teacher, captions without metadata keep an
    `error` reason: they become rejects of their shard, so every input is counted.
    """
    records = read_captions(inputs, field)
    if not records:
        raise ValueError(f"no captions in inputs: {inputs}")
    if needs_metadata and not any(r.metadata for r in records):
        raise ValueError("--teacher shapes needs ShapesWorld captions with metadata (build-captions --shapes N)")
    items, seen = [], set()
    for r in records:
        text = (r.caption or "").strip()
        cid = r.id or (caption_id(text) if text else r.ref)
        key = sample_key(cid)
        error = r.error or ("empty_caption" if not text else "")
        error = error or ("duplicate_id" if key in seen else "")
        error = error or ("missing_metadata" if needs_metadata and not r.metadata else "")
        seen.add(key)
        items.append({"id": cid, "key": key, "caption": text, "metadata": r.metadata, "source": r.ref, "error": error})
    return items


class Synthesizer:
    """The stage: loads the teacher once per worker; a shard task in, one `part-NNNNN.tar` (+ rejects) out."""

    def __init__(self, output: str, config_digest: str, teacher: str, batch_size: int, post_filter: str, **kw) -> None:
        self.output = output
        self.config_digest = config_digest
        self.teacher_name = teacher
        self.seed = kw.pop("seed")  # the run seed; teachers get one seed per image instead
        self.teacher = build_teacher(teacher, **kw)
        self.batch_size = batch_size
        self.filters = filters(post_filter)
        self.resolution = kw["resolution"]
        self.steps = None if teacher == "shapes" else kw["steps"]
        self.guidance = None if teacher == "shapes" else kw["guidance"]

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Synthesize each shard task of the batch into its tar; one summary row per shard."""
        out: dict[str, list] = {"index": [], "rows": [], "rejected": [], "bytes": [], "sha256": [], "name": []}
        for index, input_digest, items in zip(batch["shard"], batch["input_digest"], batch["items"], strict=True):
            result = self.synth_shard(int(index), str(input_digest), json.loads(str(items)))
            for key, value in result.to_dict().items():
                out[key].append(value)
        return out

    def synth_shard(self, index: int, input_digest: str, items: list[dict[str, Any]]) -> shards.ShardResult:
        """Draw `items` in batches into tar shard `index` (published atomically with its rejects)."""
        meta = {"config_digest": self.config_digest, "input_digest": input_digest}
        rejects = [_reject(it, it["error"], "") for it in items if it["error"]]
        good = [it for it in items if not it["error"]]
        with shards.TarShardWriter(self.output, index, meta) as writer:
            for start in range(0, len(good), self.batch_size):
                rejects += self.draw(good[start : start + self.batch_size], writer)
            return writer.commit(shards.rejects_table(rejects))

    def draw(self, items: list[dict[str, Any]], writer: shards.TarShardWriter) -> list[dict[str, str]]:
        """One teacher call; kept images go to `writer`, post-filtered ones come back as rejects."""
        seeds = [image_seed(self.seed, it["id"]) for it in items]
        images, nsfw = self.teacher([it["caption"] for it in items], [it["metadata"] for it in items], seeds)
        rejects = []
        for it, image, seed, flagged in zip(items, images, seeds, nsfw, strict=True):
            if "nsfw" in self.filters and flagged:
                rejects.append(_reject(it, "nsfw", "the pipeline's safety checker flagged the image"))
            elif "blank" in self.filters and is_blank(image):
                rejects.append(_reject(it, "blank_image", f"pixel std {float(image.std()):.2f} < 2"))
            else:
                writer.add(it["key"], {"png": _png(image), "json": self._sidecar(it, seed)})
        return rejects

    def _sidecar(self, item: dict[str, Any], seed: int) -> bytes:
        """The sample's `.json` member."""
        obj = {
            "id": item["id"],
            "caption": item["caption"],
            "teacher": self.teacher_name,
            "model": self.teacher.name,
            "seed": seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "resolution": self.resolution,
        }
        if item["metadata"]:
            obj["metadata"] = json.loads(item["metadata"])
        return json.dumps(obj, sort_keys=True).encode()


def _png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless: the teacher's pixels are what the student learns from)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _reject(item: dict[str, Any], reason: str, detail: str) -> dict[str, str]:
    """A rejects row for a work item."""
    return {"id": item["id"], "source": item["source"], "reason": reason, "detail": detail or item["caption"]}


# ------------------------------------------------------------------------------------------------------ the run


def shard_tasks(items: list[dict[str, Any]], shard_size: int) -> list[dict[str, Any]]:
    """One task per shard: items at positions [k * shard_size, (k + 1) * shard_size) go to shard k."""
    tasks = []
    for k, span in enumerate(shards.plan_shards(len(items), shard_size)):
        chunk = [items[i] for i in span]
        tasks.append({"shard": k, "input_digest": shards.digest(chunk), "items": json.dumps(chunk)})
    return tasks


def _resume_state(out: Path, cfg: SynthConfig, tasks: list[dict[str, Any]], config_digest: str) -> set[int]:
    """Prepare `out` and return the shards a previous run finished (same rules as `encode-latents`)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        shards.remove_outputs(out, ext="tar")
    shards.clean_temporaries(out)
    done = set()
    for index in shards.shard_indices(out, "tar"):
        meta = shards.complete_tar_meta(out, index)
        if meta is None or index >= len(tasks):
            continue
        if meta.get("config_digest") != config_digest:
            raise ValueError(
                f"{out} holds shards made with other settings (e.g. {shards.shard_name(index, 'tar')}); "
                "pass --overwrite to replace them or choose another --output"
            )
        if meta.get("input_digest") == tasks[index]["input_digest"]:
            done.add(index)
    shards.remove_outputs(out, keep_below=len(tasks), ext="tar")
    return done


def _header(cfg: SynthConfig, config_digest: str, n_shards: int) -> dict[str, Any]:
    """The manifest's fixed part: format, versions, the resolved config."""
    config = {**asdict(cfg), **cfg.content(), "inputs": [str(Path(p).resolve()) for p in cfg.inputs]}
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "stage": "synthesize",
        "code_version": shards.code_version(),
        "config": {**config, "output": str(Path(cfg.output).resolve())},
        "config_digest": config_digest,
        "n_shards": n_shards,
        "teacher": cfg.teacher,
    }


def _stage_kwargs(cfg: SynthConfig, config_digest: str) -> dict[str, Any]:
    """Constructor arguments of `Synthesizer` (plain values: they travel to Ray workers)."""
    keys = ("teacher", "batch_size", "post_filter", "steps", "guidance", "resolution", "max_sequence_length", "seed")
    kwargs = {k: getattr(cfg, k) for k in (*keys, "device", "dtype")}
    if cfg.teacher != "shapes":
        kwargs["model"] = str(Path(cfg.model).resolve())
    return {**kwargs, "output": str(cfg.output), "config_digest": config_digest}


def _report(out: Path, n_shards: int, skipped: int, drawn: int, seconds: float) -> dict[str, Any]:
    """Merge the rejects and count; `inputs = written + rejected` holds by construction."""
    rejects = shards.merge_rejects(out, range(n_shards))
    written = sum(shards.tar_shard_result(out, i).rows for i in range(n_shards))
    return {
        "inputs": written + len(rejects),
        "written": written,
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(rejects.column("reason").to_pylist()).items())),
        "shards": n_shards,
        "shards_skipped": skipped,
        "shards_drawn": n_shards - skipped,
        "images_this_run": drawn,
        "seconds": round(seconds, 3),
        "images_per_s": round(drawn / seconds, 3) if seconds > 0 else None,
    }


def run_synthesize(cfg: SynthConfig, on_shard: Callable[[shards.ShardResult], None] | None = None) -> dict[str, Any]:
    """Run the stage end to end (resuming unless `cfg.overwrite`); returns the report also written to disk."""
    from pipeline import runtime

    t0 = time.perf_counter()
    # 1. Check the settings; read the captions in a fixed order.
    validate(cfg)
    items = caption_items(cfg.inputs, cfg.field, needs_metadata=cfg.teacher == "shapes")
    # 2. Cut them into shards by position; keep what a previous run finished.
    out = Path(cfg.output)
    tasks = shard_tasks(items, cfg.shard_size)
    config_digest = shards.digest(cfg.content())
    done = _resume_state(out, cfg, tasks, config_digest)
    manifest = shards.ManifestWriter(out, _header(cfg, config_digest, len(tasks)))
    previous = manifest.previous_entries()
    for index in sorted(done):
        manifest.add(shards.tar_shard_result(out, index, previous.get(shards.shard_name(index, "tar"))), write=False)
    manifest.write()
    # 3. Draw the pending shards, in process (workers=0) or on a Ray actor pool (one teacher per worker/GPU).
    pending = [t for t in tasks if t["shard"] not in done]
    drawn = 0
    n_pending = sum(len(json.loads(t["items"])) for t in pending)
    bar = _progress_bar(n_pending, cfg.progress and n_pending > 0)
    with runtime.ray_session(cfg.ray_address, enabled=cfg.workers > 0 and bool(pending)):
        rows = runtime.map_stage(
            Synthesizer,
            pending,
            constructor_kwargs=_stage_kwargs(cfg, config_digest),
            workers=cfg.workers,
            gpus_per_worker=cfg.gpus_per_worker,
            address=cfg.ray_address,
        )
        for row in rows:
            result = shards.ShardResult(**{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()})
            manifest.add(result)
            drawn += result.rows
            if bar is not None:
                bar.update(result.rows + result.rejected)
                bar.set_postfix(img_per_s=f"{drawn / (time.perf_counter() - t0):.2f}")
            if on_shard is not None:
                on_shard(result)
    if bar is not None:
        bar.close()
    # 4. Merge the rejects; write the report and the final manifest.
    report = _report(out, len(tasks), len(done), drawn, time.perf_counter() - t0)
    shards.write_json_atomic(out / shards.REPORT, report)
    manifest.write(complete=True, resolution=cfg.resolution)
    return report


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar over captions (None when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="synthesize")
