"""`lightgen shapes` sub-app: prompts -> render -> score, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from shapesworld.cli import app
from shapesworld.world import CATEGORIES, generate_prompts

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _fails(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_prompts_to_stdout_and_file(tmp_path: Path) -> None:
    out = _ok(["prompts", "--n", "12", "--seed", "3", "--diversity", "0.5"])
    records = [json.loads(line) for line in out.splitlines()]
    assert records == generate_prompts(12, 3, diversity=0.5)
    path = tmp_path / "p.jsonl"
    _ok(["prompts", "--n", "8", "--categories", "counting,position", "--scenes", "2", "--out", str(path)])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 8 and {r["tag"] for r in records} == {"counting", "position"}


def test_render_then_score_round_trip(tmp_path: Path) -> None:
    meta = tmp_path / "p.jsonl"
    _ok(["prompts", "--n", "6", "--seed", "1", "--out", str(meta)])
    lines = meta.read_text().splitlines()
    _ok(["render", "--metadata", str(meta), "--out", str(tmp_path / "a"), "--resolution", "32", "--samples", "2"])
    _ok(["render", "--metadata", str(meta), "--out", str(tmp_path / "b"), "--resolution", "32", "--samples", "2"])
    for p, line in enumerate(lines):
        folder = tmp_path / "a" / f"{p:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(line)
        for s in range(2):
            png = f"{p:05d}/samples/{s:04d}.png"
            assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()  # deterministic
    report = tmp_path / "r.json"
    out = _ok(["score", str(tmp_path / "a"), "--json", str(report)])
    assert "Overall score (avg. over tasks): 1.00000" in out
    for tag in CATEGORIES:
        assert f"{tag:<16} = 100.00% (2 / 2)" in out
    assert json.loads(report.read_text())["summary"]["overall"] == 1.0


def test_score_errors_are_one_line(tmp_path: Path) -> None:
    assert str(tmp_path / "missing") in _fails(["score", str(tmp_path / "missing")])
    meta = tmp_path / "p.jsonl"
    meta.write_text(json.dumps(generate_prompts(1, 0)[0]) + "\n")
    _ok(["render", "--metadata", str(meta), "--out", str(tmp_path / "o"), "--resolution", "32"])
    Image.new("L", (32, 32)).save(tmp_path / "o/00000/samples/0002.png")
    assert "0002.png: image mode 'L'" in _fails(["score", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("second_line", "named"),
    [
        ("{not json", "p.jsonl:2"),
        (
            '{"tag": "single_object", "include": [{"class": "bench", "count": 1}]}',
            "p.jsonl:2: include[0]: unknown class 'bench'",
        ),
        ('{"tag": "colors", "include": [{"class": "square", "count": 1, "color": "pink"}]}', "unknown color 'pink'"),
    ],
)
def test_render_names_bad_metadata_line(tmp_path: Path, second_line: str, named: str) -> None:
    meta = tmp_path / "p.jsonl"
    meta.write_text(json.dumps(generate_prompts(1, 0)[0]) + "\n" + second_line + "\n")
    assert named in _fails(["render", "--metadata", str(meta), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written before the input is known good


def test_render_rejects_bad_resolution_and_category(tmp_path: Path) -> None:
    meta = tmp_path / "p.jsonl"
    meta.write_text(json.dumps(generate_prompts(1, 0)[0]) + "\n")
    assert "4096" in _fails(["render", "--metadata", str(meta), "--out", str(tmp_path / "o"), "--resolution", "4096"])
    assert "'shapes'" in _fails(["prompts", "--n", "2", "--categories", "shapes"])
