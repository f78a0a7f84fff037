"""`lightgen-data` commands as a user types them: options from the stage configs, runs, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightgen_model import LightGen, preset, save_pretrained
from pipeline.cli import app
from pipeline.core.options import StageConfig
from pipeline.stages.captions.build import CaptionsConfig
from pipeline.stages.dpo_pairs.config import PairsConfig
from pipeline.stages.encode_latents import EncodeConfig
from pipeline.stages.synthesize import SynthConfig

runner = CliRunner()


def invoke(*args: str):
    """Run a command in process; returns the result."""
    return runner.invoke(app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


@pytest.mark.parametrize(
    ("command", "config"), [("synthesize", SynthConfig), ("build-dpo-pairs", PairsConfig)], ids=["synth", "dpo"]
)
def test_help_lists_every_config_field_with_its_default(command, config):
    import dataclasses

    text = re.sub(r"\s+", " ", invoke(command, "--help").output)
    for f in dataclasses.fields(config):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag.split("/")[0] in text, f"{flag} missing from {command} --help"
    assert "[default: 4]" in text if command == "synthesize" else "[default: 8]" in text  # batch size of the stage
    assert "--quiet" in text and "--workers" in text and "--cpus-per-worker" in text


def test_shared_options_are_declared_once():
    import dataclasses

    shared = [f.name for f in dataclasses.fields(StageConfig)]
    for config in (SynthConfig, PairsConfig, EncodeConfig, CaptionsConfig):
        names = [f.name for f in dataclasses.fields(config)]
        assert len(names) == len(set(names)) and names[: len(shared)] == shared  # inherited, in StageConfig's order


def test_shared_defaults_change_default_and_help_only():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(SynthConfig)}
    assert (SynthConfig().batch_size, SynthConfig().workers, SynthConfig().inputs) == (4, 1, [])
    assert fields["batch_size"].metadata["help"] == "Images per teacher call."
    assert fields["inputs"].metadata["flag"] == "--input"  # the inherited flag
    assert CaptionsConfig().shard_size == 100_000 and EncodeConfig().batch_size == 32 and PairsConfig().seed == 0
    with pytest.raises(TypeError, match="'batchsize' is not an option it inherits"):

        @dataclasses.dataclass
        class Misspelt(StageConfig):
            shared_defaults = {"batchsize": (4, "Items per call.")}

    with pytest.raises(TypeError, match="give it once"):

        @dataclasses.dataclass
        class Twice(StageConfig):
            shared_defaults = {"seed": (1, "Seed.")}
            seed: int = 2


def test_build_captions_help_keeps_its_options_and_leaves_out_the_unused_ones():
    text = re.sub(r"\s+", " ", invoke("build-captions", "--help").output)
    for expected in (
        "--shard-size INT Captions per output shard. [default: 100000]",
        "--batch-size INT Captions per embedding call. [default: 256]",
        "--workers INT Ray tasks in parallel (reading, de-duplication, embeddings); 0 = no Ray. [default: 0]",
        "--seed INT Random seed (selection, k-means, ShapesWorld). [default: 0]",
        "--ray-address",
        "--overwrite",
        "--partitions",
        "--kmeans-sample",
    ):
        assert expected in text, expected
    for unused in ("--gpus-per-worker", "--cpus-per-worker", "--quiet", "--progress"):
        assert unused not in text, unused


@pytest.fixture(scope="module")
def shapes_captions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("captions")
    result = invoke("build-captions", "--shapes", "40", "--n", "12", "--embedder", "hash", "--output", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_synthesize_then_build_dpo_pairs_from_the_command_line(tmp_path, shapes_captions):
    images = tmp_path / "images"
    result = invoke(
        "synthesize",
        "--input",
        str(shapes_captions),
        "--output",
        str(images),
        "--teacher",
        "shapes",
        "--resolution",
        "32",
        "--workers",
        "0",
        "--quiet",
        "--shard-size",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"synthesize: 12 images in [\d.]+ s", result.output)
    report = json.loads(result.output.strip().splitlines()[-1])
    assert (report["inputs"], report["written"], report["shards"]) == (12, 12, 3)
    model = tmp_path / "model"
    save_pretrained(LightGen(preset("debug")), model)
    result = invoke(
        "build-dpo-pairs",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "pairs"),
        "--model",
        str(model),
        "--judge-backend",
        "shapes",
        "--min-judge-score",
        "0",
        "--steps",
        "2",
        "--workers",
        "0",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["inputs"] == 12 and report["written"] + report["rejected"] == 12 and report["written"] > 0
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == "lightgen-dpo-pairs"
    assert manifest["sampling"]["steps"] == 2 and manifest["sampling"]["cfg_schedule"] == "linear"  # model default


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synthesize", "--input", "{missing}"], "does not exist: .*missing"),
        (["synthesize", "--input", "{captions}", "--teacher", "dalle"], "dalle"),
        (["synthesize", "--input", "{captions}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["synthesize", "--input", "{captions}", "--workers", "-1"], "--workers must be >= 0"),
        (["build-dpo-pairs", "--input", "{captions}", "--model", "{missing}"], "needs --judge-model DIR"),
        (
            ["build-dpo-pairs", "--input", "{captions}", "--model", "{missing}", "--judge-backend", "shapes"],
            "not a LightGen checkpoint",
        ),
        (["encode-latents", "--input", "{captions}", "--vae", "sd35"], "unknown --vae 'sd35'"),
    ],
)
def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path, shapes_captions, args, message):
    args = [a.format(missing=tmp_path / "missing", captions=shapes_captions) for a in args]
    workers = [] if "--workers" in args else ["--workers", "0"]
    result = invoke(*args, "--output", str(tmp_path / "out"), *workers)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output


def test_required_options_are_required(tmp_path):
    result = invoke("build-dpo-pairs", "--input", str(tmp_path), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2 and "--model" in result.output


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).with_name("lightgen-data")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("build-captions", "synthesize", "encode-latents", "build-dpo-pairs"):
        assert command in out
