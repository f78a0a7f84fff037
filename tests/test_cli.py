"""The `lightgen` CLI."""

from __future__ import annotations

import json

import pytest
import typer.main
from typer.testing import CliRunner

from lightgen.cli import app
from lightgen_model import LightGen, count_parameters, preset, save_pretrained

runner = CliRunner()


def test_model_info_reports_parameter_split() -> None:
    res = runner.invoke(app, ["model-info", "--preset", "lightgen"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    p = info["parameters"]
    assert 0.70e9 <= p["total"] <= 0.82e9
    assert p["total"] == sum(v for k, v in p.items() if k != "total")
    assert info["config"]["encoder"]["depth"] == 16 and info["config"]["head_width"] == 1536


def test_model_info_from_directory_and_bad_preset(tmp_path) -> None:
    m = LightGen(preset("debug"))
    save_pretrained(m, tmp_path)
    res = runner.invoke(app, ["model-info", "--model", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parameters"] == count_parameters(m)
    res = runner.invoke(app, ["model-info", "--preset", "huge"])
    assert res.exit_code == 2 and res.output.startswith("error: unknown preset 'huge'"), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a message, not a traceback


SHARED = {
    "model": ...,
    "steps": None,
    "cfg": None,
    "cfg_schedule": None,
    "temperature": None,
    "seed": 0,
    "vae": None,
    "text_encoder": None,
    "device": "auto",
    "dtype": "float32",
    "ema": True,
    "head_steps": None,
}


@pytest.mark.parametrize("command", ["generate", "inpaint", "geneval"])
def test_model_commands_share_one_set_of_options(command: str) -> None:
    """The sampling and loading options, declared once, reach every command that loads a model, with their
    defaults, ranges and help."""
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    assert {name: params[name].default for name in SHARED} | {"model": ...} == SHARED
    assert params["model"].required and params["model"].opts == ["--model"]
    assert params["ema"].secondary_opts == ["--no-ema"]
    assert all(params[name].help for name in SHARED)
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0 and "--head-steps" in res.output and "--cfg-schedule" in res.output
    res = runner.invoke(app, [command, "--model", "m", "--steps", "0"])
    assert res.exit_code == 2 and "greater than or equal to 1" in res.output, res.output
