"""ShapesWorld: a procedural teacher and a GenEval-style scorer that need no neural weights."""

from shapesworld.render import PlacedObject, ShapesTeacher, render_folder
from shapesworld.score import Detection, ImageScore, detect_objects, format_summary, score_folder, score_image
from shapesworld.world import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    generate_prompts,
    mirror_relation,
    read_jsonl,
    validate_metadata,
)

__all__ = [
    "CATEGORIES",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "Detection",
    "ImageScore",
    "PlacedObject",
    "ShapesTeacher",
    "detect_objects",
    "format_summary",
    "generate_prompts",
    "mirror_relation",
    "read_jsonl",
    "render_folder",
    "score_folder",
    "score_image",
    "validate_metadata",
]
