"""`build-dpo-pairs`: source images the judge keeps (winners) + the current model's images (losers) -> pair shards.

Two stages on `pipeline.core.runner`, one after the other (`PairsStage.run`):

1. `JudgeStage` ("judge-images", `pipeline.stages.dpo_pairs.judging`): the inputs, screened and judged, into
   `<output>/judgements/` (one row per image the judge saw, kept or not; screened-out inputs are its rejects).
2. `PairsStage` ("build-dpo-pairs"): one unit per judgement shard. The judge stage's rejects of that shard pass
   through, so `<output>/rejects.parquet` lists every input that did not become a pair with its reason; images the
   judge did not keep become rejects (`judge_rejected` / `judge_unparseable`, the answer in the detail). Per batch
   of kept images: the captions' text states (unpadded, as `encode-latents` stores them), one loser per caption
   drawn by `lightgen.api.LightGenPipeline` with a CPU generator seeded by `loser_seed(--seed, id)` (what
   `lightgen generate --seed <that seed>` draws for the caption), with `--judge-losers` the judge's verdict on each
   loser (a pair whose loser scores no lower than its winner would teach nothing true: a reject, `loser_not_worse`),
   and the moments of winner (center-cropped like `encode-latents`) and loser, each with its flip, through
   `encode_with_flip`. Rows go to `part-NNNNN.parquet` (`PAIR_SCHEMA`).

Counts add up: `inputs = written + rejected` for the run, and the judge stage's inputs are the run's inputs. Each
stage resumes on its own: a finished judgement shard is not judged again, a finished pair shard is not remade.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import shards, storage
from pipeline.core.schema import JUDGEMENT_FORMAT, MANIFEST, PAIR_FORMAT, PAIR_SCHEMA, PAIR_SCHEMA_VERSION
from pipeline.core.shards import rejects_name, shard_name
from pipeline.core.stage import Output, Reject, Stage, WorkUnit, quiet_hf
from pipeline.core.storage import Storage
from pipeline.io.decode import RejectError, center_crop_resize, decode_image
from pipeline.models.encoders import Encoders, f16_column
from pipeline.models.judges import judge_name
from pipeline.stages.dpo_pairs.config import PairsConfig, judge_content, loser_seed, resolve
from pipeline.stages.dpo_pairs.judging import JudgeStage, ask_judge, judgements_dir, load_judge

if TYPE_CHECKING:
    from pipeline.inspect.read import RejectSample, StageDir

__all__ = ["PairsConfig", "PairsStage", "loser_seed"]


@dataclass
class Kept:
    """A kept judgement row with its winner image, center-cropped: (R, R, 3) uint8."""

    id: str
    source: str
    caption: str
    judge_answer: str
    judge_score: float
    metadata: dict[str, Any] | None
    winner: np.ndarray


class PairsStage(Stage):
    """Judgement shards -> pair rows (`PAIR_SCHEMA`); loads a `LightGenPipeline` with its encoders once per worker."""

    name = "build-dpo-pairs"
    help = "DPO pairs: judge-kept source images (winners) + the model's own images (losers), as Parquet pair shards."
    summary = (
        "build-dpo-pairs: {written} pairs of {inputs} inputs ({rejected} rejected), {written_this_run} made in "
        "{seconds_total} s"
    )
    config = PairsConfig
    format = PAIR_FORMAT
    schema_version = PAIR_SCHEMA_VERSION
    schema = PAIR_SCHEMA
    dictionary_columns = ("vae", "text_encoder", "resolution", "text_len", "judge", "loser_model", "sampling")
    cfg: PairsConfig

    def __init__(self, cfg: PairsConfig) -> None:
        super().__init__(cfg)
        self.judge_report: dict[str, Any] | None = None  # the judge stage's report, set by `run`
        self._content: dict[str, Any] | None = None

    @classmethod
    def run(cls, cfg: PairsConfig) -> dict[str, Any]:
        """Run both stages (each resuming unless `cfg.overwrite`); returns the pairs report with the judge's inside."""
        from pipeline.core import locks, runtime
        from pipeline.core.runner import run_stage

        # 1. Check every setting of both stages before any work.
        cfg.check()
        judge = JudgeStage(dataclasses.replace(cfg, output=judgements_dir(cfg.output)))
        pairs = cls(cfg)
        judge.validate()
        pairs.validate()
        # The output folder, judgements included, is held for both stages (`run_stage`'s own hold of it nests).
        with locks.hold(Storage(cfg.output)), runtime.ray_session(cfg.ray_address, enabled=cfg.workers > 0):
            # 2. Judge every input into <output>/judgements/.
            pairs.judge_report = run_stage(judge)
            del judge
            _free_memory()
            # 3. Winners, losers and moments from the judgements.
            return run_stage(pairs)

    @classmethod
    def dry_run(cls, cfg: PairsConfig) -> dict[str, Any]:
        """The judge, the loser model and its encoders at full size on the meta device, one batch."""
        from pipeline.core.dryrun import dry_pairs

        return dry_pairs(cfg)

    @classmethod
    def inspect_sections(cls, folder: StageDir, rejects: RejectSample, limit: int, seed: int, vae: str | None) -> str:
        """Winner and loser side by side, then the images the judge turned down (from `judgements/`)."""
        from pipeline.inspect.html import tag
        from pipeline.inspect.media import judged_rejected_section, pairs_judgements, pairs_section

        judged = pairs_judgements(folder)
        turned_down = judged_rejected_section(judged, limit, seed) if judged else tag("p", "no judgements/ folder")
        return pairs_section(folder, limit, seed, vae) + turned_down

    # ---- driver side
    def validate(self) -> None:
        """Check the loser model and sampling settings up front (no weights loaded)."""
        self.res = resolve(self.cfg)

    def content(self) -> dict[str, Any]:
        """What determines the pairs: the judgements' settings, the model (weights by checksum), encoders, sampling."""
        if self._content is None:
            res, cfg = self.res, self.cfg
            self._content = {
                "judgements": shards.digest(judge_content(cfg)),
                "loser_model": res.loser_model,
                "weights_sha256": res.weights_sha256,
                "vae": res.public(res.vae),
                "text_encoder": res.public(res.text_encoder),
                "max_text_len": res.max_text_len,
                "sampling": res.sampling,
                "seed": cfg.seed,
                "judge_losers": cfg.judge_losers,
                "max_pixels": cfg.max_pixels,
                "min_size": cfg.min_size,
                "schema_version": PAIR_SCHEMA_VERSION,
            }
        return self._content

    def plan(self) -> list[WorkUnit]:
        """One unit per judgement shard: the shard and the judge stage's rejects of the same inputs."""
        store = Storage(judgements_dir(self.cfg.output))
        manifest = store.read_json(MANIFEST)
        if not (isinstance(manifest, dict) and manifest.get("complete") and manifest.get("format") == JUDGEMENT_FORMAT):
            raise ValueError(f"{store.uri} holds no finished judge-images run (PairsStage.run runs it first)")
        return [
            WorkUnit(i, "judgements", (store.spec(shard_name(i)), store.spec(rejects_name(i))), base=store.uri)
            for i in range(manifest["n_shards"])
        ]

    def report(self, counts: dict[str, Any]) -> dict[str, Any]:
        """The judge stage's report, and the seconds of both stages."""
        if self.judge_report is None:
            return {}
        return {"seconds_total": round(self.judge_report["seconds"] + counts["seconds"], 3), "judge": self.judge_report}

    # ---- worker side
    def setup(self) -> None:
        """Load the image tokenizer, the text encoder and the LightGen pipeline that draws the losers."""
        from lightgen.api import LightGenPipeline
        from lightgen_model.encoders import resolve_device

        cfg = self.cfg
        quiet_hf()
        self.res = res = resolve(cfg)
        device = resolve_device(cfg.device)
        enc = Encoders(res.vae, res.text_encoder, device, cfg.dtype, res.max_text_len, res.resolution)
        self.encoders, self.tokenizer, self.text, self.moments_shape = enc, enc.tokenizer, enc.text, enc.moments_shape
        self.pipe = LightGenPipeline.from_pretrained(
            storage.local_copy(cfg.model),
            vae=self.tokenizer,
            text_encoder=self.text,
            device=device,
            dtype=cfg.dtype,
            use_ema=cfg.use_ema,
        )
        self.store = Storage(judgements_dir(cfg.output))
        self.judge = judge_name(cfg.judge_backend, cfg.judge_model)
        self.loser_judge = load_judge(cfg) if cfg.judge_losers else None

    def shard_meta(self) -> dict[str, Any]:
        """Encoder names and shapes (the trainer checks them), judge, loser model and sampling settings."""
        return {
            **self.encoders.meta(),
            "judge": self.judge,
            "loser_model": self.res.loser_model,
            "sampling": self.res.sampling,
        }

    def _rows(self, path: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """The rows of a Parquet file of the judge stage, a few at a time (judgement rows carry images)."""
        with storage.open_input(path) as f, storage.named_errors(path, "cannot read"):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
                yield from batch.to_pylist()

    def read(self, unit: WorkUnit) -> Iterator[Kept | Reject]:
        """The judge stage's rejects, the judged images it did not keep (as rejects), then the kept ones."""
        judged, rejected = unit.paths
        for r in self._rows(rejected):
            yield Reject(r["id"], r["source"], r["reason"], r["detail"])
        for r in self._rows(judged):
            if not r["kept"]:
                yield Reject(r["id"], r["source"], r["reason"], r["detail"])
                continue
            try:
                image = decode_image(r["image"], max_pixels=self.cfg.max_pixels, min_size=self.cfg.min_size)
            except RejectError as e:
                yield Reject(r["id"], r["source"], e.reason, str(e))
                continue
            winner = center_crop_resize(image, self.res.resolution)
            meta = None if r["metadata"] is None else json.loads(r["metadata"])
            yield Kept(r["id"], r["source"], r["caption"], r["judge_answer"], r["judge_score"], meta, winner)

    def draw_losers(self, captions: list[str], seeds: list[int]) -> list[np.ndarray | None]:
        """The model's images for `captions`, one CPU generator per image seeded with its seed (a batch gives each
        image what `LightGenPipeline` gives it alone): (R, R, 3) uint8 each, None where the latents are not finite."""
        import torch

        s = self.res.sampling  # the given settings, the model's recorded ones for the rest
        out = self.pipe(
            captions,
            num_inference_steps=s["steps"],
            guidance_scale=s["cfg"],
            guidance_schedule=s["cfg_schedule"],
            temperature=s["temperature"],
            resolution=self.res.resolution,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
        ok = torch.isfinite(out.latents.float()).flatten(1).all(1)
        return [np.asarray(im.convert("RGB")) if bool(ok[i]) else None for i, im in enumerate(out.images)]

    def process(self, items: Sequence[Kept]) -> Output:
        """Kept images -> pair rows; non-finite text, losers or moments become rejects."""
        import torch

        from lightgen_model.encoders import encode_with_flip

        rejects: list[Reject] = []
        texts = self.text([it.caption for it in items])
        ready = []
        for it, text in zip(items, texts, strict=True):
            if np.isfinite(text).all():
                ready.append((it, text, loser_seed(self.cfg.seed, it.id)))
            else:
                rejects.append(Reject(it.id, it.source, "nonfinite_text", "text embedding contains NaN or inf"))
        losers = self.draw_losers([r[0].caption for r in ready], [r[2] for r in ready]) if ready else []
        rows = []
        for (it, text, seed), loser in zip(ready, losers, strict=True):
            if loser is None:
                rejects.append(
                    Reject(it.id, it.source, "nonfinite_loser", f"the model's image (seed {seed}) has NaN or inf")
                )
            else:
                rows.append((it, text, seed, loser, None))
        if self.loser_judge is not None and rows:
            rows = self._judge_losers(rows, rejects)
        if not rows:
            return Output(None, rejects)
        pixels = torch.from_numpy(np.stack([r[0].winner for r in rows] + [r[3] for r in rows])).permute(0, 3, 1, 2)
        moments, flipped = encode_with_flip(self.tokenizer, pixels.float() / 127.5 - 1.0)  # (2n, 2C, h, w) each
        # Cast before the finiteness check: values beyond float16's range become inf and must be caught too.
        m16, f16 = moments.numpy().astype(np.float16), flipped.numpy().astype(np.float16)
        n, keep = len(rows), []
        for i, (it, *_rest) in enumerate(rows):
            if not (np.isfinite(m16[i]).all() and np.isfinite(f16[i]).all()):
                rejects.append(Reject(it.id, it.source, "nonfinite_latent", "winner moments contain NaN or inf"))
            elif not (np.isfinite(m16[n + i]).all() and np.isfinite(f16[n + i]).all()):
                rejects.append(Reject(it.id, it.source, "nonfinite_loser", "loser moments contain NaN or inf"))
            else:
                keep.append(i)
        winners = [(m16[i], f16[i]) for i in keep]
        losers_m = [(m16[n + i], f16[n + i]) for i in keep]
        return Output(self._table([rows[i] for i in keep], winners, losers_m), rejects)

    def _judge_losers(self, rows: list[tuple], rejects: list[Reject]) -> list[tuple]:
        """The rows whose loser the judge scores below the winner, each with that judgement; rejects for the rest."""
        from PIL import Image

        judged = ask_judge(
            self.loser_judge,
            [Image.fromarray(r[3]) for r in rows],
            [r[0].caption for r in rows],
            [r[0].metadata for r in rows],
            self.cfg.min_judge_score,
        )
        kept = []
        for (it, text, seed, loser, _), j in zip(rows, judged, strict=True):
            if isinstance(j, str):  # the judge refused the image
                rejects.append(Reject(it.id, it.source, "loser_judge_error", j))
            elif j.score is None:
                rejects.append(Reject(it.id, it.source, "loser_judge_unparseable", f"answer: {j.answer}"))
            elif j.score >= it.judge_score:
                detail = f"the judge scores the loser {j.score:g}, the winner {it.judge_score:g}; answer: {j.answer}"
                rejects.append(Reject(it.id, it.source, "loser_not_worse", detail))
            else:
                kept.append((it, text, seed, loser, j))
        return kept

    def _table(self, rows: list[tuple], winners: list[tuple], losers: list[tuple]) -> pa.Table:
        """Assemble kept pairs into a table with `PAIR_SCHEMA`."""
        meta = self.shard_meta()
        n = len(rows)
        columns = self.encoders.columns([r[0].id for r in rows], [r[0].caption for r in rows], [r[1] for r in rows])
        columns.update(
            winner_moments=f16_column([w[0] for w in winners]),
            winner_moments_flip=f16_column([w[1] for w in winners]),
            loser_moments=f16_column([x[0] for x in losers]),
            loser_moments_flip=f16_column([x[1] for x in losers]),
            judge=pa.array([meta["judge"]] * n, pa.string()),
            judge_answer=pa.array([r[0].judge_answer for r in rows], pa.string()),
            judge_score=pa.array([r[0].judge_score for r in rows], pa.float32()),
            loser_model=pa.array([meta["loser_model"]] * n, pa.string()),
            loser_seed=pa.array([r[2] for r in rows], pa.int64()),
            sampling=pa.array([json.dumps(meta["sampling"], sort_keys=True)] * n, pa.string()),
            loser_judge_answer=pa.array([None if r[4] is None else r[4].answer for r in rows], pa.string()),
            loser_judge_score=pa.array([None if r[4] is None else r[4].score for r in rows], pa.float32()),
        )
        return pa.table({f.name: columns[f.name] for f in PAIR_SCHEMA}, schema=PAIR_SCHEMA)


def _free_memory() -> None:
    """Drop the judge's memory before the loser model loads (in-process runs)."""
    gc.collect()
    torch = sys.modules.get("torch")  # only if this process used it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
