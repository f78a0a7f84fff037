"""ShapesWorld: a procedural teacher and a GenEval-style scorer that need no neural weights."""

from pathlib import Path

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

# GenEval's published prompt metadata (553 prompts, MIT; data/geneval/README.md says where it comes from)
GENEVAL_METADATA = Path(__file__).parent / "data" / "geneval" / "evaluation_metadata.jsonl"

__all__ = [
    "CATEGORIES",
    "GENEVAL_METADATA",
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
