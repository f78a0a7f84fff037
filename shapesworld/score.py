"""The ShapesWorld scorer: GenEval's correctness rules on objects found by plain image analysis.

Detection, in place of GenEval's Mask2Former + CLIP:
1. the background color is the median of the image's outer frame;
2. each pixel is explained as a mix of the background and one palette color (the teacher composites
   exactly that way, and blur or anti-aliasing only moves a pixel along that line): it takes the color
   whose bg->color segment is nearest, if that is within RESIDUAL and at least half-way (alpha >= 0.5);
3. connected components of colored pixels (4-connectivity) smaller than MIN_AREA of the image, larger
   than MAX_AREA, of mixed colors (majority < PURITY) or elongated (aspect outside ASPECT) are dropped;
4. a component's color is its majority pixel color; its shape is the nearest 16x16 template (mean
   absolute difference of the bbox-normalized masks), and it is dropped if that distance > MAX_SHAPE_DIST;
   confidence = 1 - distance orders objects of a class, as GenEval orders by detector confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from shapesworld.render import CROSS_ARM, draw_shape
from shapesworld.world import COLORS, SHAPES, validate_metadata

RESIDUAL = 60.0  # max RGB distance from a pixel to its bg->color segment
MIN_AREA = 0.012  # min component area / image area (the teacher's smallest shape is ~0.035)
MAX_AREA = 0.6  # a component covering most of the image is a background change, not an object
PURITY = 0.6
ASPECT = (0.5, 2.0)
FIT_SIDE = 24  # shape fitting works on windows of at most this many pixels
MAX_SHAPE_DIST = 0.5
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


def classify_shape(cov: np.ndarray) -> tuple[str, float]:
    """Nearest shape to a coverage window, by analysis-by-synthesis, and its distance.

    For each shape, the box that matches the observed area and centroid is re-rendered and compared:
    distance = sum |observed - rendered| / observed area (0 = identical, 2 = disjoint). Windows larger
    than FIT_SIDE px are box-downsampled first, so the cost doesn't grow with resolution.
    """
    scale = max(1.0, max(cov.shape) / FIT_SIDE)
    if scale > 1:
        size = (max(1, round(cov.shape[1] / scale)), max(1, round(cov.shape[0] / scale)))
        cov = np.asarray(Image.fromarray(cov.astype(np.float32), mode="F").resize(size, Image.BOX))
    area = float(cov.sum())
    ys, xs = np.mgrid[: cov.shape[0], : cov.shape[1]] + 0.5
    cx, cy = float((cov * xs).sum() / area), float((cov * ys).sum() / area)
    best, best_dist = SHAPES[0], np.inf
    for shape in SHAPES:
        side = (area / FILL[shape]) ** 0.5
        by = cy - side / 6 if shape == "triangle" else cy  # a triangle's centroid is 2/3 down its box
        box = (cx - side / 2, by - side / 2, cx + side / 2, by + side / 2)
        dist = float(np.abs(cov - _render_coverage(shape, box, cov.shape)).sum()) / area
        if dist < best_dist:
            best, best_dist = shape, dist
    return best, best_dist


def detect_objects(image: Any) -> list[Detection]:
    """All shapes found in the image, most confident first."""
    image = to_array(image)
    bg = background_color(image)
    labels = label_pixels(image, bg)
    comps, _ = ndimage.label(labels >= 0)
    total, names = labels.size, list(COLORS)
    found = []
    for i, sl in enumerate(ndimage.find_objects(comps), start=1):
        mask = comps[sl] == i
        area = int(mask.sum())
        if not MIN_AREA * total <= area <= MAX_AREA * total:
            continue
        counts = np.bincount(labels[sl][mask], minlength=len(names))
        h, w = mask.shape
        if counts.max() < PURITY * area or not ASPECT[0] <= w / h <= ASPECT[1]:
            continue
        color = int(counts.argmax())
        # A window padded by 2 px holds the anti-aliased rim; other components' pixels are masked out.
        win = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in sl)
        cov = coverage(image[win], bg, color) * np.isin(comps[win], (0, i))
        shape, dist = classify_shape(cov)
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
            return [f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                    f"{req['color']}; and {seen}"]  # fmt: skip
    if "position" in req:
        rel, target = req["position"]
        if groups[target] is None:
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
