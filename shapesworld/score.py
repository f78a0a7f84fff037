"""The ShapesWorld scorer: GenEval's correctness rules on objects found by plain image analysis.

Detection, in place of GenEval's Mask2Former + CLIP:
1. the background color is the median of the image's outer frame;
2. each pixel is explained as a mix of the background and one palette color (the teacher composites
   exactly that way, and blur or anti-aliasing only moves a pixel along that line): it takes the color
   whose bg->color segment is nearest, if that is within RESIDUAL and at least half-way (alpha >= 0.5);
3. connected components of colored pixels (4-connectivity) smaller than MIN_AREA of the image, larger
   than MAX_AREA, of mixed colors (majority < PURITY) or elongated (aspect outside ASPECT) are dropped;
4. a component's color is its majority pixel color. Its shape is found by analysis-by-synthesis on its
   soft coverage map (the mixing weight of that color, so anti-aliased rims count fractionally): each
   shape is re-drawn by the teacher's code with the observed area and centroid, sharp and slightly
   blurred (BLURS), and the nearest one wins (L1 / area); over MAX_SHAPE_DIST it is no shape at all;
5. confidence = 1 - distance / 2 orders objects of a class, as GenEval orders by detector confidence;
   then GenEval's own rules (`evaluate`, `relative_position`) decide correctness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from shapesworld.render import CROSS_ARM, draw_shape
from shapesworld.world import COLORS, SHAPES, read_jsonl, validate_metadata

RESIDUAL = 60.0  # max RGB distance from a pixel to its bg->color segment
MIN_AREA = 0.012  # min component area / image area (the teacher's smallest shape covers ~0.045)
MAX_AREA = 0.6  # a component covering most of the image is a background change, not an object
PURITY = 0.6  # min share of a component's pixels in its majority color
ASPECT = (0.5, 2.0)  # all shapes have square boxes; allow a generator's squash
FIT_SIDE = 24  # shape fitting works on windows of at most this many pixels
MAX_SHAPE_DIST = 0.4
BLURS = (0.6, 1.2)  # Gaussian sigmas (in fitting-window pixels) tried on each candidate shape
# Area of each shape / area of its box, for the teacher's drawing code.
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 2 * CROSS_ARM - CROSS_ARM**2}
POSITION_THRESHOLD = 0.1  # GenEval's default


@dataclass(frozen=True)
class Detection:
    """One object found in an image: class, color, pixel box (x0, y0, x1, y1) and confidence."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    confidence: float
    area: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "class": self.shape,
            "color": self.color,
            "box": list(self.box),
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class ImageScore:
    """GenEval's verdict on one image: `correct`, the `reason` it is not, and what was detected."""

    correct: bool
    reason: str
    detections: list[Detection]


def to_array(image: Any) -> np.ndarray:
    """Accept a PIL RGB image or an (H, W, 3) uint8 array; raise ValueError naming anything else."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        image = np.asarray(image)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {desc}")
    return image


def background_color(image: np.ndarray) -> np.ndarray:
    """The median color of the image's outer frame (objects never touch it in the teacher's renders)."""
    k = max(1, min(image.shape[:2]) // 32)
    frame = [image[:k], image[-k:], image[:, :k], image[:, -k:]]
    return np.median(np.concatenate([f.reshape(-1, 3) for f in frame]), axis=0).astype(np.float32)


def _palette_offsets(bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.array(list(COLORS.values()), dtype=np.float32) - bg  # (K, 3)
    return v, (v * v).sum(1)


def label_pixels(image: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(H, W) int map: index into COLORS of each pixel's palette color, -1 for background / unexplained."""
    d = image.reshape(-1, 3).astype(np.float32) - bg  # (N, 3)
    v, norm2 = _palette_offsets(bg)
    usable = norm2 >= 40.0**2  # a palette color (nearly) equal to the bg explains nothing
    out = np.full(len(d), -1, dtype=np.int64)
    if not usable.any():
        return out.reshape(image.shape[:2])
    # alpha >= 0.5 needs |d| >= |v| / 2: skip the (mostly background) pixels that cannot qualify.
    d2 = (d * d).sum(1)
    cand = np.nonzero(d2 >= norm2[usable].min() / 4)[0]
    alpha = (d[cand] @ v.T) / np.maximum(norm2, 1.0)  # (M, K)
    # Squared distance to the line through bg along v, by Pythagoras: |d|^2 - alpha^2 |v|^2.
    resid = d2[cand, None] - alpha * alpha * norm2  # (M, K)
    resid[(alpha < 0.5) | (alpha > 1.6) | ~usable] = np.inf
    best = resid.argmin(1)
    ok = resid[np.arange(len(best)), best] <= RESIDUAL**2
    out[cand[ok]] = best[ok]
    return out.reshape(image.shape[:2])


def coverage(image: np.ndarray, bg: np.ndarray, color: int) -> np.ndarray:
    """(H, W) fraction in [0, 1] of each pixel covered by palette color `color` (its mixing weight)."""
    d = image.astype(np.float32) - bg  # (H, W, 3)
    v, norm2 = _palette_offsets(bg)
    alpha = (d @ v[color]) / max(float(norm2[color]), 1.0)
    resid2 = (d * d).sum(-1) - alpha * alpha * norm2[color]
    return np.where(resid2 <= (2 * RESIDUAL) ** 2, np.clip(alpha, 0.0, 1.0), 0.0)


def _render_coverage(shape: str, box: tuple[float, ...], hw: tuple[int, int]) -> np.ndarray:
    """The teacher's anti-aliased coverage of one shape in an (h, w) pixel window (same code path)."""
    ss = 4
    canvas = Image.new("L", (hw[1] * ss, hw[0] * ss))
    x0, y0, x1, y1 = (c * ss for c in box)
    draw_shape(ImageDraw.Draw(canvas), shape, (x0, y0, x1 - 1, y1 - 1), 255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0


def shape_distances(cov: np.ndarray) -> dict[str, float]:
    """Distance of a coverage window to each shape, by analysis-by-synthesis.

    For each shape, the box that matches the observed area and centroid is re-rendered and compared:
    distance = sum |observed - rendered| / observed area (0 = identical, 2 = disjoint). Windows larger
    than FIT_SIDE px are box-downsampled first, so the cost doesn't grow with resolution.
    """
    scale = max(1.0, max(cov.shape) / FIT_SIDE)
    if scale > 1:
        size = (max(1, round(cov.shape[1] / scale)), max(1, round(cov.shape[0] / scale)))
        cov = np.asarray(Image.fromarray(cov.astype(np.float32)).resize(size, Image.BOX))
    area = max(float(cov.sum()), 1e-6)
    ys, xs = np.mgrid[: cov.shape[0], : cov.shape[1]] + 0.5
    cx, cy = float((cov * xs).sum() / area), float((cov * ys).sum() / area)
    out = {}
    for shape in SHAPES:
        side = (area / FILL[shape]) ** 0.5
        by = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid is 2/3 down its box
        box = (cx - side / 2, by - side / 2, cx + side / 2, by + side / 2)
        ideal = _render_coverage(shape, box, cov.shape)
        # Also try blurred versions, so a soft (generated) image matches its shape rather than a rounder one.
        fits = [ideal] + [ndimage.gaussian_filter(ideal, sigma, mode="constant") for sigma in BLURS]
        out[shape] = min(float(np.abs(cov - fit).sum()) for fit in fits) / area
    return out


def detect_objects(image: Any) -> list[Detection]:
    """All shapes found in the image, most confident first."""
    image = to_array(image)
    bg = background_color(image)
    labels = label_pixels(image, bg)
    comps, _ = ndimage.label(labels >= 0)
    total, names = labels.size, list(COLORS)
    areas = np.bincount(comps.ravel())
    areas[0] = 0  # background
    # Noise makes thousands of specks: drop them on their area before touching their pixels.
    keep = np.nonzero((areas >= MIN_AREA * total) & (areas <= MAX_AREA * total))[0]
    slices = ndimage.find_objects(comps)
    found = []
    for i in keep:
        sl = slices[i - 1]
        mask = comps[sl] == i
        area = int(areas[i])
        counts = np.bincount(labels[sl][mask], minlength=len(names))
        h, w = mask.shape
        if counts.max() < PURITY * area or not ASPECT[0] <= w / h <= ASPECT[1]:
            continue
        color = int(counts.argmax())
        # A window padded by 2 px holds the anti-aliased rim; other components' pixels are masked out.
        win = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in sl)
        cov = coverage(image[win], bg, color) * np.isin(comps[win], (0, i))
        dists = shape_distances(cov)
        shape = min(dists, key=dists.get)
        dist = dists[shape]
        if dist > MAX_SHAPE_DIST:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        found.append(Detection(shape, names[color], box, round(1 - dist / 2, 4), area))
    return sorted(found, key=lambda d: -d.confidence)


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of `a` to `b`, factoring in object dimensions.

    The center offset a - b is shrunk per axis by threshold * (dim_a + dim_b) (dims = box width/height),
    then divided by the length of the unshrunk offset; "left of" / "right of" hold if its x part is
    < -0.5 / > 0.5, "above" / "below" if its y part is < -0.5 / > 0.5 (image y points down).
    """
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r, holds in rels.items() if holds}


def _check_include(req: dict[str, Any], found: list[Detection], groups: list) -> list[str]:
    """Reasons (empty if none) why one include clause fails; GenEval's per-clause logic."""
    cls, count = req["class"], req["count"]
    if len(found) < count:
        return [f"expected {cls}>={count}, found {len(found)}"]
    if "color" in req:
        colors = [d.color for d in found]
        if colors.count(req["color"]) < count:
            seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
            return [
                f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} {req['color']}; and {seen}"
            ]
    if "position" in req:
        rel, target = req["position"]
        if target >= len(groups) or groups[target] is None:  # GenEval would raise on a forward index
            return [f"no target for {cls} to be {rel}"]
        for obj in found:
            for other in groups[target]:
                true_rels = relative_position(obj, other)
                if rel not in true_rels:
                    return [f"expected {cls} {rel} target, found {' and '.join(sorted(true_rels))} target"]
    return []


def evaluate(detections: list[Detection], meta: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's `evaluate`: every include clause must hold (AND), any exclude clause fails it (OR).

    An include clause takes the `count` most confident objects of its class and needs that many; with
    `color`, all of them must have it; with `position` [rel, i], each must stand in `rel` to every object
    matched by clause i. An exclude clause fails the image if >= its `count` objects of its class are found.
    """
    by_class: dict[str, list[Detection]] = {}
    for det in detections:  # already sorted by confidence
        by_class.setdefault(det.shape, []).append(det)
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in meta.get("include", []):
        found = by_class.get(req["class"], [])[: req["count"]]
        why = _check_include(req, found, groups)
        reasons += why
        groups.append(None if why else found)
    for req in meta.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def score_image(image: Any, meta: dict[str, Any]) -> ImageScore:
    """Detect objects in `image` ((H, W, 3) uint8 or PIL RGB) and judge it against its GenEval metadata."""
    validate_metadata(meta)
    detections = detect_objects(image)
    correct, reason = evaluate(detections, meta)
    return ImageScore(correct, reason, detections)


# --- GenEval folders ----------------------------------------------------------------------------------


def read_sample(path: Path) -> np.ndarray:
    """Load one sample PNG as (H, W, 3) uint8; ValueError naming the file if it is not square RGB >= 32 px."""
    try:
        with Image.open(path) as im:
            im.load()
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if im.mode != "RGB":
        raise ValueError(f"{path}: image mode {im.mode!r}, expected 'RGB'")
    if im.width != im.height or im.width < 32:
        raise ValueError(f"{path}: image size {im.width}x{im.height}, expected square and >= 32 px")
    return np.asarray(im)


def read_geneval_folder(path: str | Path) -> list[tuple[dict[str, Any], list[Path]]]:
    """(metadata, sample paths) per prompt folder of a GenEval layout, in folder order."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    prompts = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_file = folder / "metadata.jsonl"
        if not meta_file.is_file():
            raise ValueError(f"{meta_file}: missing")
        metas = read_jsonl(meta_file)
        if len(metas) != 1:
            raise ValueError(f"{meta_file}: expected one JSON object, found {len(metas)}")
        # GenEval's own reader takes <digits>.png only; anything else in samples/ is not a sample.
        samples = sorted(p for p in (folder / "samples").glob("*.png") if p.stem.isdigit())
        if not samples:
            raise ValueError(f"{folder / 'samples'}: no <digits>.png samples")
        prompts.append((metas[0], samples))
    if not prompts:
        raise ValueError(f"{root}: no GenEval prompt folders (<00000>/metadata.jsonl + samples/)")
    return prompts


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of per-image results: image, prompt and per-task accuracies, task-mean overall.

    As in GenEval's summary_scores.py, prompts are grouped by their metadata JSON, tasks are listed in
    order of first appearance, and the overall score is the unweighted mean of the task accuracies.
    """
    prompts: dict[str, bool] = {}
    tasks: dict[str, list[bool]] = {}
    for r in results:
        key = json.dumps(r["metadata"])
        prompts[key] = prompts.get(key, False) or r["correct"]
        tasks.setdefault(r["tag"], []).append(r["correct"])
    per_task = {tag: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)} for tag, v in tasks.items()}
    return {
        "total_images": len(results),
        "total_prompts": len(prompts),
        "correct_images": sum(r["correct"] for r in results) / max(len(results), 1),
        "correct_prompts": sum(prompts.values()) / max(len(prompts), 1),
        "tasks": per_task,
        "overall": float(np.mean([t["accuracy"] for t in per_task.values()])) if per_task else 0.0,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary exactly as GenEval's summary_scores.py prints it."""
    lines = [
        "Summary",
        "=======",
        f"Total images: {summary['total_images']}",
        f"Total prompts: {summary['total_prompts']}",
        f"% correct images: {summary['correct_images']:.2%}",
        f"% correct prompts: {summary['correct_prompts']:.2%}",
        "",
        "Task breakdown",
        "==============",
    ]
    for tag, t in summary["tasks"].items():
        lines.append(f"{tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['total']})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def score_folder(path: str | Path, json_path: str | Path | None = None) -> dict[str, Any]:
    """Score every sample of a GenEval-layout folder; write per-image results + summary as JSON.

    The JSON goes to `json_path` (default `<path>/scores.json`): {"summary": ..., "images": [{"filename",
    "tag", "prompt", "correct", "reason", "metadata", "detections"}, ...]}. Returns the summary.
    """
    results = []
    for meta, samples in read_geneval_folder(path):
        for sample in samples:
            verdict = score_image(read_sample(sample), meta)
            results.append(
                {
                    "filename": str(sample),
                    "tag": meta["tag"],
                    "prompt": meta.get("prompt", ""),
                    "correct": verdict.correct,
                    "reason": verdict.reason,
                    "metadata": meta,
                    "detections": [d.as_dict() for d in verdict.detections],
                }
            )
    summary = summarize(results)
    out = Path(json_path) if json_path else Path(path) / "scores.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"summary": summary, "images": results}, indent=1))
    tmp.replace(out)
    return summary
