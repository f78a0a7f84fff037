"""A stage is one module plus one line in the registry: the example stage of docs/pipeline.md ("Writing a stage"),
registered the way the page says, gets a `lightgen-data` command with its options, resumes, and gets an inspect
page with its own section; the built-in commands and inspect formats are the registry's."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app, make_app
from pipeline.stages import registry

REPO = Path(__file__).resolve().parents[1]


def example_module(tmp_path: Path):
    """The docs' example stage, written to a module and imported (the docs and this test cannot drift apart)."""
    text = (REPO / "docs" / "pipeline.md").read_text()
    block = re.search(r"<!-- example: count-words.*?-->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/pipeline.md lost its 'Writing a stage' example"
    code = block.group(1)
    assert len(code.splitlines()) <= 50, "the example should stay short"
    path = tmp_path / "count_words_stage.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("count_words_stage", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["count_words_stage"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def count_words(tmp_path: Path):
    """The example stage, registered; the registry is restored afterwards."""
    before = list(registry.STAGES)
    stage = registry.register(example_module(tmp_path).CountWords)
    yield stage
    registry.STAGES[:] = before
    sys.modules.pop("count_words_stage", None)


def notes(root: Path) -> Path:
    """Two text files: 5 lines of words and 2 one-word lines (rejected with --min-words 2)."""
    root.mkdir()
    (root / "a.txt").write_text("a red cube\nthree blue spheres on a table\nhello\n")
    (root / "b.txt").write_text("two words\nfour words in line\nbye\nthe last one\n")
    return root


def test_a_registered_stage_gets_a_command_resume_and_an_inspect_page(tmp_path: Path, count_words) -> None:
    cli, runner = make_app(), CliRunner()
    assert "count-words" in runner.invoke(cli, ["--help"], terminal_width=200).output
    help_text = runner.invoke(cli, ["count-words", "--help"], terminal_width=200).output
    assert "--min-words" in help_text and "Lines with fewer words" in help_text
    src, out = notes(tmp_path / "notes"), tmp_path / "words"
    args = ["count-words", "--input", str(src), "--output", str(out), "--workers", "0", "--min-words", "2", "--quiet"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[0] == "count-words: 5 lines kept, 2 rejected"
    report = json.loads(first.output.splitlines()[1])
    assert (report["inputs"], report["written"], report["rejected"], report["shards_run"]) == (7, 5, 2, 2)
    rows = [r for name in ("part-00000.parquet", "part-00001.parquet") for r in pq.read_table(out / name).to_pylist()]
    assert [(r["id"], r["words"]) for r in rows][:2] == [("a.txt/0", 3), ("a.txt/1", 6)]
    assert sorted(pq.read_table(out / "rejects.parquet").column("id").to_pylist()) == ["a.txt/2", "b.txt/2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["stage"], manifest["format"], manifest["config"]["min_words"]) == (
        "count-words",
        "example-word-counts",
        2,
    )
    # The same command again resumes: every shard is kept, none is remade.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = json.loads(runner.invoke(cli, args).output.splitlines()[1])
    assert (again["shards_skipped"], again["shards_run"], again["written"]) == (2, 0, 5)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps
    # Other settings are refused.
    refused = runner.invoke(cli, [*args[:-3], "--min-words", "3", "--quiet"])
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    # inspect finds the stage by its format and shows its own section, the counts and the rejects.
    page_path = tmp_path / "words.html"
    shown = runner.invoke(cli, ["inspect", str(out), "--out", str(page_path)])
    assert shown.exit_code == 0, shown.output
    page = page_path.read_text()
    assert 'data-format="example-word-counts"' in page and "Words per line" in page and "<svg" in page
    assert 'data-count="7"' in page and 'data-reason="too_few_words"' in page and 'data-id="b.txt/2"' in page


def test_a_stage_without_its_own_section_gets_a_table_of_rows(tmp_path: Path, count_words) -> None:
    del count_words.inspect_sections  # back to the default: sampled rows' scalar columns
    out = tmp_path / "words"
    args = ["count-words", "--input", str(notes(tmp_path / "notes")), "--output", str(out), "--workers", "0"]
    assert CliRunner().invoke(make_app(), [*args, "--quiet"]).exit_code == 0
    result = CliRunner().invoke(make_app(), ["inspect", str(out), "--out", str(tmp_path / "p.html"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "p.html").read_text()
    assert "Rows: 7 random samples" in page and "Words per line" not in page
    for rid in [f"a.txt/{n}" for n in range(3)] + [f"b.txt/{n}" for n in range(4)]:  # --min-words 1 keeps all 7
        assert f'data-id="{rid}"' in page
    assert "three blue spheres on a table" in page


def test_registry_refuses_a_clash_and_names_unknown_formats() -> None:
    clash = type("Clash", (registry.STAGES[1],), {"format": "new-format"})
    with pytest.raises(ValueError, match="clashes with 'synthesize'"):
        registry.register(clash)
    without_config = type("NoConfig", (registry.Stage,), {"name": "no-config", "format": "no-config"})
    with pytest.raises(ValueError, match="'?NoConfig.*lacks config"):
        registry.register(without_config)
    not_dataclass = type("BadConfig", (registry.Stage,), {"name": "bad", "format": "bad", "config": dict})
    with pytest.raises(ValueError, match="'bad'.*not a StageConfig dataclass"):
        registry.register(not_dataclass)
    assert without_config not in registry.STAGES and not_dataclass not in registry.STAGES
    with pytest.raises(KeyError, match="no registered stage writes 'nope'"):
        registry.by_format("nope")


def test_the_cli_is_the_registry() -> None:
    commands = {c.name for c in app.registered_commands}
    assert commands == {s.name for s in registry.STAGES if s.has_command} | {"inspect"}
    assert "judge-images" not in commands  # run inside build-dpo-pairs; its output still has an inspect page
    assert "lightgen-judgements" in registry.formats()


def test_pipeline_is_laid_out_by_role() -> None:
    root = REPO / "pipeline"
    assert sorted(p.name for p in root.glob("*.py")) == ["__init__.py", "cli.py"]  # the rest lives in role folders
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "core",
        "inspect",
        "io",
        "models",
        "stages",
    ]
    stage_modules = {s.__module__ for s in registry.STAGES}
    assert all(m.startswith("pipeline.stages.") for m in stage_modules), stage_modules


def test_inspect_names_a_damaged_shard(tmp_path: Path, count_words) -> None:
    out = tmp_path / "words"
    args = ["count-words", "--input", str(notes(tmp_path / "notes")), "--output", str(out), "--workers", "0"]
    assert CliRunner().invoke(make_app(), [*args, "--quiet"]).exit_code == 0
    (out / "part-00000.parquet").write_bytes(b"garbage")
    result = CliRunner().invoke(make_app(), ["inspect", str(out), "--out", str(tmp_path / "p.html")])
    assert result.exit_code != 0 and "part-00000.parquet is not a readable Parquet shard" in result.output
    assert not (tmp_path / "p.html").exists()
