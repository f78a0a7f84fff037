"""The ShapesWorld vocabulary, GenEval-shaped scene metadata and the caption grammar.

A scene is described by a record with GenEval's `evaluation_metadata.jsonl` keys (`tag`, `include`,
optional `exclude`, `prompt`) plus `caption`, the paraphrased training caption. `prompt` is always the
canonical GenEval template ("a photo of a red circle"); `caption` is drawn from the paraphrase grammar.
Include entries may carry one key GenEval does not have, `size` ("small" | "large"), set only when the
caption says so; the teacher honours it and the scorer ignores it, as GenEval's evaluator would.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

# Shapes that stay distinct down to ~9 px: a disk, a full box, a half-filled box with its mass low
# (triangle) and a box with four empty corners (cross).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}

# Saturated colors far apart in RGB and all far from the light-gray background, so that a pixel's color
# is a clean mix of one palette entry and the background (the scorer relies on that).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 34, 40),
    "orange": (245, 135, 15),
    "yellow": (238, 212, 20),
    "green": (34, 160, 60),
    "blue": (36, 76, 214),
    "purple": (140, 46, 178),
}

# GenEval's relation strings exactly (metadata `position: [relation, target_index]`).
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MIRROR: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# GenEval's six tasks, in the order its metadata file lists them.
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZES: tuple[str, ...] = ("small", "large")


def article(word: str) -> str:
    """The indefinite article GenEval's prompts put before `word` ("an orange circle")."""
    return "an" if word[0] in "aeiou" else "a"


def _np(entry: dict[str, Any]) -> str:
    words = [entry["color"], entry["class"]] if "color" in entry else [entry["class"]]
    return f"{article(words[0])} {' '.join(words)}"


def canonical_prompt(meta: dict[str, Any]) -> str:
    """GenEval's "a photo of ..." template for a scene's metadata."""
    tag, inc = meta["tag"], meta["include"]
    if tag in ("single_object", "colors"):
        return f"a photo of {_np(inc[0])}"
    if tag in ("two_object", "color_attr"):
        return f"a photo of {_np(inc[0])} and {_np(inc[1])}"
    if tag == "counting":
        return f"a photo of {NUMBER_WORDS[inc[0]['count']]} {PLURALS[inc[0]['class']]}"
    if tag == "position":
        # GenEval lists the target first and the positioned object second: "B rel A".
        return f"a photo of {_np(inc[1])} {inc[1]['position'][0]} {_np(inc[0])}"
    raise ValueError(f"unknown tag {tag!r}; expected one of {CATEGORIES}")


def make_scene(tag: str, classes: list[str], colors: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    """Build one record's GenEval metadata (with its canonical prompt) from its parts.

    `count` (counting) and `relation` (position: `classes[1]` is `relation` of `classes[0]`) go in `kw`.
    """
    include: list[dict[str, Any]] = [{"class": c, "count": 1} for c in classes]
    for entry, color in zip(include, colors or [], strict=False):
        entry["color"] = color
    meta: dict[str, Any] = {"tag": tag, "include": include}
    if tag == "counting":
        include[0]["count"] = kw["count"]
        meta["exclude"] = [{"class": classes[0], "count": kw["count"] + 1}]
    if tag == "position":
        include[1]["position"] = [kw["relation"], 0]
    meta["prompt"] = canonical_prompt(meta)
    validate_metadata(meta)
    return meta


def enumerate_scenes(tag: str) -> list[dict[str, Any]]:
    """Every distinct scene metadata of one category, in a fixed order (the scene pool)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        return [make_scene(tag, [s]) for s in SHAPES]
    if tag == "two_object":
        return [make_scene(tag, list(p)) for p in pairs]
    if tag == "counting":
        return [make_scene(tag, [s], count=n) for s in SHAPES for n in COUNTS]
    if tag == "colors":
        return [make_scene(tag, [s], [c]) for s in SHAPES for c in COLORS]
    if tag == "position":
        return [make_scene(tag, list(p), relation=r) for p in pairs for r in RELATIONS]
    if tag == "color_attr":
        colors = list(itertools.permutations(COLORS, 2))
        return [make_scene(tag, list(p), list(c)) for p in pairs for c in colors]
    raise ValueError(f"unknown tag {tag!r}; expected one of {CATEGORIES}")


def _check_entry(entry: Any, where: str, n_entries: int) -> None:
    if not isinstance(entry, dict) or "class" not in entry or "count" not in entry:
        raise ValueError(f"{where}: expected an object with 'class' and 'count', got {entry!r}")
    if entry["class"] not in SHAPES:
        raise ValueError(f"{where}: unknown class {entry['class']!r}; expected one of {SHAPES}")
    if not isinstance(entry["count"], int) or not 1 <= entry["count"] <= 5:
        raise ValueError(f"{where}: count {entry['count']!r} is not an integer in [1, 5]")
    if "color" in entry and entry["color"] not in COLORS:
        raise ValueError(f"{where}: unknown color {entry['color']!r}; expected one of {tuple(COLORS)}")
    if "size" in entry and entry["size"] not in SIZES:
        raise ValueError(f"{where}: unknown size {entry['size']!r}; expected one of {SIZES}")
    if "position" in entry:
        pos = entry["position"]
        ok = isinstance(pos, list | tuple) and len(pos) == 2 and pos[0] in RELATIONS
        if not ok or not isinstance(pos[1], int) or not 0 <= pos[1] < n_entries:
            raise ValueError(f"{where}: bad position {pos!r}; expected [relation in {RELATIONS}, index]")


def validate_metadata(meta: Any) -> None:
    """Raise ValueError naming the bad value if `meta` is not a ShapesWorld GenEval record."""
    if not isinstance(meta, dict) or "include" not in meta or "tag" not in meta:
        raise ValueError(f"metadata must be an object with 'tag' and 'include', got {meta!r}")
    if meta["tag"] not in CATEGORIES:
        raise ValueError(f"unknown tag {meta['tag']!r}; expected one of {CATEGORIES}")
    include = meta["include"]
    if not isinstance(include, list) or not include:
        raise ValueError(f"'include' must be a non-empty list, got {include!r}")
    for i, entry in enumerate(include):
        _check_entry(entry, f"include[{i}]", len(include))
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError(f"'exclude' must be a list, got {exclude!r}")
    for i, entry in enumerate(exclude):
        _check_entry(entry, f"exclude[{i}]", 0)
    if sum(e["count"] for e in include) > 4:
        raise ValueError(f"at most 4 objects per scene (32-px renders), got include={include!r}")


def mirror_relation(meta: dict[str, Any]) -> dict[str, Any]:
    """A copy of a position scene's metadata with every relation mirrored (for deliberately wrong renders)."""
    out = _copy(meta)
    for entry in out["include"]:
        if "position" in entry:
            entry["position"] = [MIRROR[entry["position"][0]], entry["position"][1]]
    out["prompt"] = canonical_prompt(out)
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate metadata records, one JSON object a line; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
                validate_metadata(meta)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: {e}") from None
            records.append(meta)
    return records


def generate_prompts(
    n: int,
    seed: int,
    categories: list[str] | tuple[str, ...] | None = None,
    diversity: float = 1.0,
    scenes: int | None = None,
) -> list[dict[str, Any]]:
    """`n` scene records (GenEval metadata + `caption`), deterministic given `seed`.

    Categories are cycled round-robin, so each gets n / len(categories) records.
    The two data-diversity dials, independent of each other:
    - `diversity` in [0, 1] is caption diversity: each caption is, with probability `diversity`, a
      paraphrase drawn from the full grammar (openers such as "an image showing", word-order swaps,
      synonyms, digits, "there are ...", relation inversions, and with probability 0.3 per object a
      size adjective that the teacher honours); otherwise it is the canonical GenEval prompt.
      0 gives only canonical templates, 1 only paraphrases. The scenes drawn do not depend on it.
    - `scenes` caps the number of distinct scene metadata per category: a fixed, seed-chosen pool of
      `scenes` scenes is drawn once and records sample from it (None = the whole category, e.g. 360
      color_attr scenes). Small `scenes` with diversity 0 is the "many low-diversity captions" arm of
      the data-diversity ablation; large `scenes` with diversity 1 and small `n` is the "few diverse" arm.
    """
    cats = list(categories) if categories else list(CATEGORIES)
    for cat in cats:
        if cat not in CATEGORIES:
            raise ValueError(f"unknown category {cat!r}; expected some of {CATEGORIES}")
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    if scenes is not None and scenes < 1:
        raise ValueError(f"scenes must be >= 1 or None, got {scenes}")
    rng = random.Random(seed)
    # Captions draw from their own stream, so the scene sequence is the same at every `diversity`.
    caption_rng = random.Random(f"captions:{seed}")
    pools = {}
    for cat in cats:
        pool = enumerate_scenes(cat)
        pools[cat] = rng.sample(pool, min(scenes, len(pool))) if scenes else pool
    records = []
    for i in range(n):
        meta = _copy(rng.choice(pools[cats[i % len(cats)]]))
        paraphrased = caption_rng.random() < diversity
        meta["caption"] = paraphrase(meta, caption_rng) if paraphrased else meta["prompt"]
        records.append(meta)
    return records


def _copy(meta: dict[str, Any]) -> dict[str, Any]:
    # Records are mutated (sizes, caption); the pool must stay pristine. Key order follows GenEval.
    out: dict[str, Any] = {"tag": meta["tag"], "include": [dict(e) for e in meta["include"]]}
    for entry in out["include"]:
        if "position" in entry:
            entry["position"] = list(entry["position"])
    if "exclude" in meta:
        out["exclude"] = [dict(e) for e in meta["exclude"]]
    out["prompt"] = meta["prompt"]
    return out


# --- The paraphrase grammar -------------------------------------------------------------------------
# Every phrasing below keeps the scene's meaning: no words that claim things the teacher doesn't render
# (e.g. "next to" would claim a position, "three red squares" a color the metadata doesn't carry).
OPENERS = (
    "a photo of",
    "a picture of",
    "an image of",
    "an image showing",
    "a drawing of",
    "a rendering of",
    "a simple illustration of",
    "a photograph of",
    "a clean render of",
    "",
)
SYNONYMS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural)
    "circle": (("circle", "circles"), ("disk", "disks"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("square block", "square blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus shape", "plus shapes")),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of", "on the left side of"),
    "right of": ("right of", "to the right of", "on the right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "underneath", "lower than"),
}
SIZE_PROB = 0.3  # chance that a paraphrase gives an object a size adjective (stored as entry["size"])


def _noun(entry: dict[str, Any], rng: random.Random, plural: bool = False) -> str:
    """A (possibly plural) noun phrase without article: "[size] [color] shape" or "shape that is color"."""
    noun = rng.choice(SYNONYMS[entry["class"]])[1 if plural else 0]
    size = [rng.choice(SIZE_WORDS[entry["size"]])] if "size" in entry else []
    if "color" not in entry:
        return " ".join([*size, noun])
    color, form = entry["color"], rng.randrange(5)
    if form == 0:
        return " ".join([*size, f"{color}-colored", noun])
    if form == 1:
        return f"{' '.join([*size, noun])} that is {color}"
    if form == 2:
        return f"{' '.join([*size, noun])} colored {color}"
    return " ".join([*size, color, noun])  # the plain form, twice as likely


def _a(entry: dict[str, Any], rng: random.Random) -> str:
    phrase = _noun(entry, rng)
    return f"{article(phrase)} {phrase}"


def _opened(body: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} {body}".strip()


def _single(inc: list[dict[str, Any]], rng: random.Random) -> str:
    forms = [
        lambda: _opened(_a(inc[0], rng), rng),
        lambda: f"there is {_a(inc[0], rng)}",
        lambda: f"{_a(inc[0], rng)} on a plain background",
        lambda: f"a single {_noun(inc[0], rng)}",
        lambda: f"just {_a(inc[0], rng)}",
    ]
    return rng.choice(forms)()


def _pair(inc: list[dict[str, Any]], rng: random.Random) -> str:
    a, b = (inc[0], inc[1]) if rng.random() < 0.5 else (inc[1], inc[0])
    x, y = _a(a, rng), _a(b, rng)
    forms = [
        f"{x} and {y}",
        f"{x} together with {y}",
        f"{x} as well as {y}",
        f"both {x} and {y}",
        f"{x} and {y} on a plain background",
    ]
    i = rng.randrange(len(forms) + 1)
    return f"there is {x} and {y}" if i == len(forms) else _opened(forms[i], rng)


def _counting(inc: list[dict[str, Any]], rng: random.Random) -> str:
    n, u = inc[0]["count"], rng.random()
    num = NUMBER_WORDS[n] if u < 0.6 else str(n) if u < 0.85 else f"exactly {NUMBER_WORDS[n]}"
    many = f"{num} {_noun(inc[0], rng, plural=True)}"
    forms = [_opened(many, rng), f"there are {many}", f"a group of {many}", f"{many} on a plain background"]
    return rng.choice(forms)


def _position(inc: list[dict[str, Any]], rng: random.Random) -> str:
    subject, target, rel = inc[1], inc[0], inc[1]["position"][0]
    if rng.random() < 0.5:  # "A left of B" == "B right of A"
        subject, target, rel = target, subject, MIRROR[rel]
    s, t, r = _a(subject, rng), _a(target, rng), rng.choice(RELATION_WORDS[rel])
    forms = [_opened(f"{s} {r} {t}", rng), f"{s} is {r} {t}", f"there is {s} {r} {t}", f"{t} with {s} {r} it"]
    return rng.choice(forms)


def paraphrase(meta: dict[str, Any], rng: random.Random) -> str:
    """A random caption with the meaning of `meta`; may add `size` to its include entries (in place)."""
    for entry in meta["include"]:
        if rng.random() < SIZE_PROB:
            entry["size"] = rng.choice(SIZES)
    tag = meta["tag"]
    if tag in ("single_object", "colors"):
        return _single(meta["include"], rng)
    if tag in ("two_object", "color_attr"):
        return _pair(meta["include"], rng)
    if tag == "counting":
        return _counting(meta["include"], rng)
    return _position(meta["include"], rng)
