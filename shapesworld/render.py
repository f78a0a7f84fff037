"""The ShapesWorld teacher: renders a scene from its GenEval metadata, procedurally and deterministically.

The layout (which objects, colors, sizes, centers) is drawn in normalized [0, 1] coordinates from the
seed alone, so one (metadata, seed) pair gives the same scene at every resolution; only the background
noise depends on the resolution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from shapesworld.world import COLORS, validate_metadata

MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024
BORDER = 0.04  # empty frame around the scene, as a fraction of the image side
GAP = 0.08  # minimum box-to-box distance between objects (> 2 px at 32 px, so blobs never touch)
CROSS_ARM = 0.38  # cross arm width / box side: thick enough to survive 32 px, corners still clearly empty
# Box side ranges by number of objects in the scene; at 32 px 0.3 is ~10 px, about the smallest legible shape.
SIZE_RANGES = {1: (0.32, 0.6), 2: (0.3, 0.42), 3: (0.3, 0.36), 4: (0.3, 0.36)}
SIZE_BAND = 0.35  # "small" draws from the lowest 35% of the range, "large" from the highest 35%
ASPECT = 0.3  # a positioned pair's off-axis offset is at most this fraction of its on-axis offset


@dataclass(frozen=True)
class PlacedObject:
    """One object of a laid-out scene: shape, color name, center and box side, all in [0, 1] units."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the object's square bounding box."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def _sample_size(rng: np.random.Generator, n_objects: int, size: str | None) -> float:
    lo, hi = SIZE_RANGES[min(n_objects, 4)]
    if size == "small":
        hi = lo + SIZE_BAND * (hi - lo)
    elif size == "large":
        lo = hi - SIZE_BAND * (hi - lo)
    return float(rng.uniform(lo, hi))


def _separated(a: PlacedObject, others: list[PlacedObject]) -> bool:
    for b in others:
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        reach = (a.size + b.size) / 2 + GAP
        if dx < reach and dy < reach:
            return False
    return True


def _free_place(rng: np.random.Generator, specs: list[tuple[str, str, float]]) -> list[PlacedObject] | None:
    """Rejection-sample non-overlapping centers; None if this draw doesn't fit quickly."""
    placed: list[PlacedObject] = []
    for shape, color, size in specs:
        lo, hi = BORDER + size / 2, 1 - BORDER - size / 2
        for _ in range(30):
            obj = PlacedObject(shape, color, *map(float, rng.uniform(lo, hi, size=2)), size)
            if _separated(obj, placed):
                placed.append(obj)
                break
        else:
            return None
    return placed


def _grid_place(rng: np.random.Generator, specs: list[tuple[str, str, float]]) -> list[PlacedObject]:
    """Jitter each object inside its own random cell of a 2 x 2 grid: always fits (sides <= 0.42)."""
    cells = rng.permutation(4)[: len(specs)]
    placed = []
    for (shape, color, size), cell in zip(specs, cells, strict=True):
        center = []
        for lo in (0.5 * (cell % 2), 0.5 * (cell // 2)):
            # The outer cell edge keeps BORDER, the inner one GAP / 2 (so two cells keep GAP between them).
            pad_lo, pad_hi = (BORDER, GAP / 2) if lo == 0 else (GAP / 2, BORDER)
            center.append(float(rng.uniform(lo + pad_lo + size / 2, lo + 0.5 - pad_hi - size / 2)))
        placed.append(PlacedObject(shape, color, center[0], center[1], size))
    return placed


def _pair_place(
    rng: np.random.Generator, target: tuple[str, str, float], subject: tuple[str, str, float], relation: str
) -> list[PlacedObject]:
    """Place `subject` `relation` `target` so GenEval's rule holds with a wide margin.

    The on-axis offset is at least the half-sides plus GAP (so the boxes never overlap and, after GenEval's
    0.1 x (dim_a + dim_b) shrink, the normalized offset stays above 0.75 > 0.5), and the off-axis offset is
    at most ASPECT of it (so no second relation is implied). Sides <= 0.42 always leave room for both.
    """
    sa, sb = target[2], subject[2]
    lo, hi = (sa + sb) / 2 + GAP, 1 - 2 * BORDER - (sa + sb) / 2
    along = float(rng.uniform(lo, hi))
    across = float(rng.uniform(-ASPECT, ASPECT)) * along
    # Coordinates along the relation axis: target first, then subject at +along (flipped below if needed).
    a0 = float(rng.uniform(BORDER + sa / 2, 1 - BORDER - sb / 2 - along))
    c_lo = max(BORDER + sa / 2, BORDER + sb / 2 - across)
    c_hi = min(1 - BORDER - sa / 2, 1 - BORDER - sb / 2 - across)
    c0 = float(rng.uniform(c_lo, c_hi))
    p_t, p_s = [a0, c0], [a0 + along, c0 + across]
    if relation in ("left of", "above"):  # the subject sits at the low end of the axis
        p_t[0], p_s[0] = 1 - p_t[0], 1 - p_s[0]
    if relation in ("above", "below"):  # axis is y
        p_t, p_s = p_t[::-1], p_s[::-1]
    return [PlacedObject(target[0], target[1], *p_t, sa), PlacedObject(subject[0], subject[1], *p_s, sb)]


def layout_scene(meta: dict[str, Any], rng: np.random.Generator) -> list[PlacedObject]:
    """Objects, colors, sizes and centers for a scene: exactly the include counts, nothing excluded."""
    validate_metadata(meta)
    include = meta["include"]
    n_objects = sum(e["count"] for e in include)
    palette = list(COLORS)
    specs = [
        [(e["class"], e.get("color") or palette[rng.integers(len(palette))], e.get("size")) for _ in range(e["count"])]
        for e in include
    ]
    positioned = [i for i, e in enumerate(include) if "position" in e]
    if positioned and n_objects != 2:
        raise ValueError(f"position scenes must hold exactly two objects, got include={include!r}")
    for _ in range(10):
        sized = [[(s, c, _sample_size(rng, n_objects, z)) for s, c, z in group] for group in specs]
        if positioned:  # a pair: always fits, see _pair_place
            i = positioned[0]
            relation, j = include[i]["position"]
            placed = _pair_place(rng, sized[j][0], sized[i][0], relation)
            return placed[::-1] if j > i else placed  # keep objects in include order
        placed = _free_place(rng, [spec for group in sized for spec in group])
        if placed is not None:
            return placed
    return _grid_place(rng, [spec for group in sized for spec in group])


def _background(rng: np.random.Generator, res: int) -> np.ndarray:
    """A light neutral background: a soft linear gradient, a faint tint and low-amplitude noise."""
    base = rng.uniform(212, 238) + rng.uniform(-4, 4, size=3)
    theta, amp = rng.uniform(0, 2 * np.pi), rng.uniform(6, 14)
    ramp = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    grad = amp * (np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None])  # (H, W)
    noise = rng.normal(0, 1.5, size=(res, res, 3)).astype(np.float32)
    return grad[..., None] + base.astype(np.float32) + noise  # (H, W, 3)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], fill: Any) -> None:
    """Draw one axis-aligned shape filling the pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        cx, cy, arm = (x0 + x1) / 2, (y0 + y1) / 2, CROSS_ARM * (x1 - x0) / 2
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def rasterize(objects: list[PlacedObject], res: int, rng: np.random.Generator) -> np.ndarray:
    """Render placed objects over a fresh background: (res, res, 3) uint8, anti-aliased by supersampling."""
    ss = 4 if res <= 128 else 2 if res <= 512 else 1  # keeps the drawing canvas <= 1024 px
    side = res * ss
    color = Image.new("RGB", (side, side))  # premultiplied color layer on black
    alpha = Image.new("L", (side, side))
    draw_c, draw_a = ImageDraw.Draw(color), ImageDraw.Draw(alpha)
    for obj in objects:
        box = tuple(v * side for v in obj.box())
        # PIL boxes are inclusive; shave the last pixel so the drawn side equals size * side.
        box = (box[0], box[1], box[2] - 1, box[3] - 1)
        draw_shape(draw_c, obj.shape, box, COLORS[obj.color])
        draw_shape(draw_a, obj.shape, box, 255)
    if ss > 1:
        color, alpha = color.reduce(ss), alpha.reduce(ss)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
    out = _background(rng, res) * (1 - a) + np.asarray(color, dtype=np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class ShapesTeacher:
    """The procedural teacher: `teacher(metadata, seed)` -> (H, W, 3) uint8 render of the scene."""

    def __init__(self, resolution: int = 64) -> None:
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution {resolution} outside [{MIN_RESOLUTION}, {MAX_RESOLUTION}]")
        self.resolution = resolution

    def layout(self, meta: dict[str, Any], seed: int) -> list[PlacedObject]:
        """The scene's objects for this seed (the same at every resolution)."""
        return layout_scene(meta, np.random.default_rng(seed))

    def __call__(self, meta: dict[str, Any], seed: int) -> np.ndarray:
        """Render one scene: (H, W, 3) uint8, deterministic in (meta, seed)."""
        rng = np.random.default_rng(seed)
        objects = layout_scene(meta, rng)  # layout first, so it doesn't depend on the resolution
        return rasterize(objects, self.resolution, rng)

    def batch(self, metas: list[dict[str, Any]], seeds: list[int]) -> np.ndarray:
        """Render many scenes: (B, H, W, 3) uint8."""
        if len(metas) != len(seeds):
            raise ValueError(f"{len(metas)} metadata records but {len(seeds)} seeds")
        out = np.empty((len(metas), self.resolution, self.resolution, 3), dtype=np.uint8)
        for i, (meta, seed) in enumerate(zip(metas, seeds, strict=True)):
            out[i] = self(meta, seed)
        return out

    def image(self, meta: dict[str, Any], seed: int) -> Image.Image:
        """Render one scene as a PIL RGB image."""
        return Image.fromarray(self(meta, seed))


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The teacher seed of one GenEval sample: independent streams per (run seed, prompt, sample)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def render_folder(
    records: list[dict[str, Any]], out: str | Path, resolution: int, samples: int = 4, seed: int = 0
) -> int:
    """Write renders in GenEval's layout: out/<00000>/metadata.jsonl and out/<00000>/samples/<0000>.png.

    metadata.jsonl holds the record unchanged. Files are written atomically (tmp + rename), so a rerun
    overwrites a partial folder cleanly. Returns the number of images written.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    teacher = ShapesTeacher(resolution)
    for meta in records:
        validate_metadata(meta)  # fail before writing anything
    for p, meta in enumerate(records):
        folder = Path(out) / f"{p:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "metadata.jsonl", lambda f, m=meta: f.write((json.dumps(m) + "\n").encode()))
        for s in range(samples):
            image = teacher.image(meta, sample_seed(seed, p, s))
            _atomic_write(folder / "samples" / f"{s:04d}.png", lambda f, im=image: im.save(f, format="PNG"))
    return len(records) * samples


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
