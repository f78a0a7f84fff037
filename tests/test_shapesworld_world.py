"""ShapesWorld vocabulary, GenEval metadata shape, prompt templates and the caption grammar."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from shapesworld.world import (
    CATEGORIES,
    COLORS,
    MIRROR,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SYNONYMS,
    canonical_prompt,
    enumerate_scenes,
    generate_prompts,
    make_scene,
    mirror_relation,
    paraphrase,
    read_jsonl,
    validate_metadata,
)


@pytest.fixture(scope="module")
def geneval(geneval_metadata: Path) -> list[dict]:
    """GenEval's 553 metadata records (the file must exist: see conftest)."""
    records = [json.loads(line) for line in geneval_metadata.read_text().splitlines()]
    assert len(records) == 553
    return records


def test_prompt_templates_reproduce_geneval_exactly(geneval: list[dict]) -> None:
    """Our canonical template, applied to GenEval's own metadata, gives GenEval's prompt string."""
    checked = 0
    for meta in geneval:
        if meta["tag"] == "counting":  # GenEval pluralizes its own classes; check the number phrasing
            assert meta["prompt"].startswith(f"a photo of {NUMBER_WORDS[meta['include'][0]['count']]} ")
            continue
        assert canonical_prompt(meta) == meta["prompt"]
        checked += 1
    assert checked > 400


def test_records_have_geneval_shape(geneval: list[dict]) -> None:
    """Same keys, key order, entry keys and value types as GenEval's file, plus `caption`."""
    shapes = {}
    for meta in geneval:
        shapes[meta["tag"]] = (list(meta), [sorted(e) for e in meta["include"]], meta.get("exclude"))
    for rec in generate_prompts(60, 0, diversity=0.0):
        keys, entries, exclude = shapes[rec["tag"]]
        assert list(rec) == [*keys, "caption"]
        assert [sorted(e) for e in rec["include"]] == entries
        if exclude is not None:
            assert rec["exclude"] == [{"class": rec["include"][0]["class"], "count": rec["include"][0]["count"] + 1}]
        for entry in rec["include"]:
            if "position" in entry:
                assert entry["position"][0] in RELATIONS and entry["position"][1] == 0


def test_geneval_relations_and_colors_are_ours(geneval: list[dict]) -> None:
    meta = geneval
    assert {m["include"][1]["position"][0] for m in meta if m["tag"] == "position"} == set(RELATIONS)
    geneval_colors = {e["color"] for m in meta for e in m["include"] if "color" in e}
    assert set(COLORS) <= geneval_colors  # our color names are GenEval color words


def test_enumerated_scenes_are_distinct_and_complete() -> None:
    sizes = {"single_object": 4, "two_object": 12, "counting": 12, "colors": 24, "position": 48, "color_attr": 360}
    for tag, size in sizes.items():
        scenes = enumerate_scenes(tag)
        assert len({json.dumps(s) for s in scenes}) == len(scenes) == size
        for s in scenes:
            classes = [e["class"] for e in s["include"]]
            assert len(set(classes)) == len(classes)  # GenEval never pairs a class with itself


def test_generate_prompts_is_deterministic_and_balanced() -> None:
    a, b = generate_prompts(60, 3), generate_prompts(60, 3)
    assert a == b
    assert a != generate_prompts(60, 4)
    assert [r["tag"] for r in a] == [CATEGORIES[i % 6] for i in range(60)]
    only = generate_prompts(10, 0, categories=["counting", "position"])
    assert {r["tag"] for r in only} == {"counting", "position"}


def test_diversity_zero_is_canonical_and_one_is_paraphrased() -> None:
    canon = generate_prompts(120, 1, diversity=0.0)
    assert all(r["caption"] == r["prompt"] for r in canon)
    assert all("size" not in e for r in canon for e in r["include"])
    full = generate_prompts(600, 1, diversity=1.0)
    paraphrased = sum(r["caption"] != r["prompt"] for r in full)
    assert paraphrased > 0.9 * len(full)
    assert len({r["caption"] for r in full}) > 3 * len({r["prompt"] for r in full}) / 2
    half = generate_prompts(600, 1, diversity=0.5)
    assert [r["prompt"] for r in half] == [r["prompt"] for r in generate_prompts(600, 1, diversity=0.0)]
    assert 0.35 < sum(r["caption"] != r["prompt"] for r in half) / 600 < 0.6


def test_scene_pool_caps_distinct_scenes() -> None:
    recs = generate_prompts(600, 2, diversity=0.0, scenes=3)
    for tag in CATEGORIES:
        assert len({r["prompt"] for r in recs if r["tag"] == tag}) <= 3
    assert len({r["prompt"] for r in generate_prompts(600, 2, diversity=0.0)}) > 100


def _words(entry: dict, plural: bool = False) -> list[str]:
    return [syn[1 if plural else 0] for syn in SYNONYMS[entry["class"]]]


def test_paraphrases_keep_the_meaning() -> None:
    """Every caption names each class (some synonym), each color, the count, and only the chosen sizes."""
    for rec in generate_prompts(600, 5, diversity=1.0):
        cap = rec["caption"]
        for entry in rec["include"]:
            assert any(w in cap for w in _words(entry, plural=entry["count"] > 1)), cap
            if "color" in entry:
                assert entry["color"] in cap, cap
            if "size" in entry:
                assert any(w in cap.split() for w in SIZE_WORDS[entry["size"]]), cap
        if not any("size" in e for e in rec["include"]):
            assert not any(w in cap.split() for ws in SIZE_WORDS.values() for w in ws), cap
        if rec["tag"] == "counting":
            n = rec["include"][0]["count"]
            assert NUMBER_WORDS[n] in cap or str(n) in cap, cap


def _first_mention(caption: str, words: tuple[str, ...]) -> int:
    return min(i for i in (caption.find(w) for w in words) if i >= 0)


def test_position_paraphrase_inverts_relation_consistently() -> None:
    """ "A left of B" may become "B right of A", never "A right of B"."""
    meta = make_scene("position", ["circle", "square"], relation="left of")  # a square left of a circle
    relations = set()
    for seed in range(200):
        cap = paraphrase(json.loads(json.dumps(meta)), random.Random(seed))
        square_first = _first_mention(cap, ("square", "box")) < _first_mention(cap, ("circle", "disk", "disc"))
        # Every form puts the subject first except "<target> with <subject> <rel> it".
        square_is_subject = square_first != cap.endswith(" it")
        relation = "left of" if "left" in cap else "right of"
        relations.add(relation)
        assert relation == ("left of" if square_is_subject else "right of"), cap
    assert relations == {"left of", "right of"}


def test_mirror_relation() -> None:
    meta = make_scene("position", ["circle", "cross"], relation="above")
    mirrored = mirror_relation(meta)
    assert mirrored["include"][1]["position"] == ["below", 0]
    assert mirrored["prompt"] == "a photo of a cross below a circle"
    assert meta["include"][1]["position"] == ["above", 0]  # the input is untouched
    assert all(MIRROR[MIRROR[r]] == r for r in RELATIONS)


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({"tag": "single_object", "include": [{"class": "bench", "count": 1}]}, "'bench'"),
        ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}]}, "'pink'"),
        ({"tag": "nonsense", "include": [{"class": "circle", "count": 1}]}, "'nonsense'"),
        ({"tag": "counting", "include": [{"class": "circle", "count": 9}]}, "9"),
        ({"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["near", 0]}]}, "'near'"),
        ({"tag": "single_object", "include": []}, "include"),
    ],
)
def test_validate_metadata_names_the_bad_value(meta: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        validate_metadata(meta)


def test_generate_prompts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'shapes'"):
        generate_prompts(4, 0, categories=["shapes"])
    with pytest.raises(ValueError, match="1.5"):
        generate_prompts(4, 0, diversity=1.5)


def test_read_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps(make_scene("single_object", ["cross"]))
    path = tmp_path / "meta.jsonl"
    path.write_text(f"{good}\n\n{good}\n")
    assert len(read_jsonl(path)) == 2
    path.write_text(f"{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:2"):
        read_jsonl(path)
    path.write_text(good.replace("cross", "hexagon") + "\n")
    with pytest.raises(ValueError, match=r"meta.jsonl:1: .*'hexagon'"):
        read_jsonl(path)


def test_vocabulary_sizes() -> None:
    assert len(SHAPES) >= 4 and len(COLORS) >= 6
