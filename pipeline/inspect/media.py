"""The image parts of `lightgen-data inspect`: teacher images (synthesize), decoded latents (encode-latents), DPO
pairs side by side and the judge's verdicts (build-dpo-pairs and its `judgements/`)."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np

from pipeline.core import storage
from pipeline.core.schema import JUDGEMENT_FORMAT, moments_array
from pipeline.inspect.html import esc, histogram, image_file_uri, img, png_uri, tag
from pipeline.inspect.read import (
    InspectError,
    StageDir,
    open_stage,
    read_sampled_rows,
    read_tar_samples,
    sample_positions,
    scan_column,
)

SETTINGS = ("teacher", "model", "seed", "steps", "guidance", "resolution")  # a synthesize sample's settings


class MomentsDecoder:
    """Posterior moments (B, 2C, h, w) -> (B, H, W, 3) uint8 images through the tokenizer that made them.

    "pixel" moments are decoded directly; others need `vae` (a local VAE directory whose tokenizer name matches the
    shards'); without one `can_decode` is False and the page shows the rows without images.
    """

    def __init__(self, shards_vae: str, vae: str | None) -> None:
        from lightgen_model.encoders import image_tokenizer_name

        self.spec = vae if vae else ("pixel" if shards_vae == "pixel" else None)
        if self.spec is not None and image_tokenizer_name(self.spec) != shards_vae:
            name = image_tokenizer_name(self.spec)
            raise InspectError(f"--vae {self.spec} is the tokenizer {name!r}; these shards were made by {shards_vae!r}")
        self.tokenizer: Any = None

    def hint(self) -> str:
        """A line saying how to decode these latents, when they cannot be ("" when they can)."""
        return (
            "" if self.can_decode else tag("p", "pass --vae DIR (the VAE that made them) to decode them", class_="hint")
        )

    @property
    def can_decode(self) -> bool:
        """Whether images can be decoded (pixel moments, or a matching --vae)."""
        return self.spec is not None

    def __call__(self, moments: np.ndarray) -> list[np.ndarray]:
        """Decode the means (first half of the channels) of a (B, 2C, h, w) moments array."""
        import torch

        from lightgen_model.encoders import build_image_tokenizer

        if self.tokenizer is None:
            self.tokenizer = build_image_tokenizer(self.spec)
        C = moments.shape[1] // 2
        out = []
        for start in range(0, len(moments), 16):
            mean = torch.from_numpy(moments[start : start + 16, :C].astype(np.float32))  # (b, C, h, w)
            x = self.tokenizer.decode(mean).clamp(-1, 1)  # (b, 3, H, W) in [-1, 1]
            out += list(((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().astype(np.uint8))
        return out


def images_section(stage: StageDir, limit: int, seed: int) -> str:
    """A grid of seeded random teacher images; caption, teacher, seed and settings on hover."""
    figures = []
    for s, rows in sorted(sample_positions(stage.rows_per_shard, limit, seed).items()):
        for sample in read_tar_samples(stage.shards[s], rows):
            meta = json.loads(sample.get("json", b"{}"))
            key = sample["__key__"].decode()
            image = next((sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample), b"")
            settings = ", ".join(f"{k} {meta.get(k)}" for k in SETTINGS if meta.get(k) is not None)
            shard = posixpath.basename(stage.shards[s])
            title = f"{meta.get('caption', '')}\nid {meta.get('id', key)} ({shard})\n{settings}"
            body = img(image_file_uri(image), title) + tag("figcaption", esc(meta.get("caption", "")))
            figures.append(tag("figure", body, class_="sample", data_id=meta.get("id", key), title=title))
    head = tag("h2", f"Images: {len(figures)} random samples")
    return head + tag("div", "".join(figures), class_="grid")


def latents_section(stage: StageDir, limit: int, seed: int, vae: str | None) -> str:
    """Decoded round trips (image and flip) of seeded random rows, their captions and text lengths."""
    decoder = MomentsDecoder(stage.manifest.get("vae", ""), vae)
    picks = sample_positions(stage.rows_per_shard, limit, seed)
    t = read_sampled_rows(stage, picks, ["id", "caption", "moments_shape", "moments", "moments_flip", "text_len"])
    images = decoder(moments_array(t)) if decoder.can_decode and len(t) else []
    flips = decoder(moments_array(t, "moments_flip")) if images else []
    figures = []
    for i, row in enumerate(t.select(["id", "caption", "text_len"]).to_pylist()):
        title = f"{row['caption']}\nid {row['id']}\ntext_len {row['text_len']}"
        pics = img(png_uri(images[i]), title) + img(png_uri(flips[i]), title + " (flip)") if images else ""
        tokens = tag("span", f"[{row['text_len']} tokens]", class_="muted")
        cap = tag("figcaption", f"{esc(row['caption'])} {tokens}")
        figures.append(tag("figure", pics + cap, class_="sample", data_id=row["id"], title=title, style="width:264px"))
    lengths, scanned = scan_column(stage, "text_len", seed)
    plot = histogram(
        lengths.column("text_len").to_numpy(), f"text length (tokens) of {scanned} rows", data_plot="text_len"
    )
    head = tag("h2", f"Latents: {len(figures)} random rows, decoded (image | flip)")
    return head + decoder.hint() + tag("div", "".join(figures), class_="grid") + tag("div", plot, class_="plots")


def pairs_section(stage: StageDir, limit: int, seed: int, vae: str | None) -> str:
    """Winner and loser of seeded random pairs side by side, with the judge's answer and the loser's settings."""
    decoder = MomentsDecoder(stage.manifest.get("vae", ""), vae)
    cols = [
        "id",
        "caption",
        "moments_shape",
        "winner_moments",
        "loser_moments",
        "judge",
        "judge_answer",
        "judge_score",
        "loser_model",
        "loser_seed",
        "sampling",
        "loser_judge_answer",
        "loser_judge_score",
    ]
    t = read_sampled_rows(stage, sample_positions(stage.rows_per_shard, limit, seed), cols)
    winners = decoder(moments_array(t, "winner_moments")) if decoder.can_decode and len(t) else []
    losers = decoder(moments_array(t, "loser_moments")) if winners else []
    rows = []
    for i, row in enumerate(t.drop_columns(["winner_moments", "loser_moments"]).to_pylist()):
        title = f"{row['caption']}\nid {row['id']}"
        pics = labelled(winners[i], "winner", title) + labelled(losers[i], "loser", title) if winners else ""
        rows.append(tag("div", pics + pair_meta(row), class_="pair sample", data_id=row["id"]))
    head = tag("h2", f"DPO pairs: {len(rows)} random pairs (winner | loser)")
    return head + decoder.hint() + "".join(rows)


def pair_meta(row: dict[str, Any]) -> str:
    """The text beside a pair: caption, judge and score, raw answer, the loser's model, seed and settings."""
    sampling = json.loads(row["sampling"]) if row["sampling"] else {}
    settings = ", ".join(f"{k} {v}" for k, v in sorted(sampling.items()))
    score = tag("span", esc(f"{row['judge_score']:.3g}"), data_score=row["judge_score"])
    text = tag("b", esc(row["caption"])) + f"<br>id {esc(row['id'])}<br>judge {esc(row['judge'])}, score {score}"
    text += tag("pre", esc(row["judge_answer"]), class_="answer")
    if row["loser_judge_answer"] is not None:  # --judge-losers
        text += f"judge on the loser: score {row['loser_judge_score']:.3g}"
        text += tag("pre", esc(row["loser_judge_answer"]), class_="answer")
    text += f"loser: {esc(row['loser_model'])}, seed {esc(row['loser_seed'])}" + tag("pre", esc(settings))
    return tag("div", text, class_="meta")


def labelled(image: np.ndarray, label: str, title: str) -> str:
    """A decoded image with a one-word label under it."""
    return tag("figure", img(png_uri(image), title) + tag("figcaption", esc(label)))


def judged_figure(row: dict[str, Any]) -> str:
    """A judged image with its caption, verdict and raw answer."""
    score = "unparseable" if row["judge_score"] is None else f"{row['judge_score']:.3g}"
    verdict = "kept" if row["kept"] else f"{row['reason']}"
    title = f"{row['caption']}\nid {row['id']}\nsource {row['source']}\nscore {score}: {verdict}\n{row['judge_answer']}"
    body = img(image_file_uri(row["image"]), title) + tag("figcaption", esc(row["caption"]))
    body += tag("div", esc(f"{verdict}, score {score}"), class_="kept" if row["kept"] else "removed")
    body += tag("pre", esc(row["judge_answer"]), class_="answer")
    return tag("figure", body, class_="sample", data_id=row["id"], data_kept=str(row["kept"]).lower(), title=title)


JUDGED_COLUMNS = ["id", "source", "caption", "image", "judge_answer", "judge_score", "kept", "reason"]


def judged_rejected_section(judged: StageDir, limit: int, seed: int) -> str:
    """Seeded random judgement rows with kept=false (the `kept` column of a bounded set of shards is read)."""
    index, scanned = scan_column(judged, "kept", seed)
    rejected = np.flatnonzero(~index.column("kept").to_numpy(zero_copy_only=False).astype(bool))
    chosen = np.sort(np.random.default_rng(seed).choice(rejected, size=min(limit, len(rejected)), replace=False))
    picks: dict[int, list[int]] = {}
    for r in chosen.tolist():
        picks.setdefault(index.column("shard")[r].as_py(), []).append(index.column("row")[r].as_py())
    t = read_sampled_rows(judged, picks, JUDGED_COLUMNS)
    head = tag("h2", f"Judged and rejected: {len(rejected)} of {scanned} judged rows read")
    count = tag(
        "p", f"{len(t)} shown", class_="muted", data_count=len(rejected), data_scanned=scanned, id="judged-rejected"
    )
    return head + count + tag("div", "".join(judged_figure(r) for r in t.to_pylist()), class_="grid judged-rejected")


def judgements_section(stage: StageDir, limit: int, seed: int) -> str:
    """Seeded random judgement rows (kept or not) with their images, answers and verdicts."""
    t = read_sampled_rows(stage, sample_positions(stage.rows_per_shard, limit, seed), JUDGED_COLUMNS)
    head = tag("h2", f"Judgements: {len(t)} random rows")
    return head + tag("div", "".join(judged_figure(r) for r in t.to_pylist()), class_="grid")


def pairs_judgements(stage: StageDir) -> StageDir | None:
    """The judge stage's folder beside pair shards (`judgements/`), None when it is absent."""
    path = storage.join(stage.path, "judgements")
    return open_stage(path, (JUDGEMENT_FORMAT,)) if storage.is_dir(path) else None
