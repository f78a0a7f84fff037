"""The `lightgen` CLI."""

from __future__ import annotations

import json

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
    assert info["config"]["encoder_depth"] == 16 and info["config"]["head_width"] == 1536


def test_model_info_from_directory_and_bad_preset(tmp_path) -> None:
    m = LightGen(preset("debug"))
    save_pretrained(m, tmp_path)
    res = runner.invoke(app, ["model-info", "--model", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["parameters"] == count_parameters(m)
    res = runner.invoke(app, ["model-info", "--preset", "huge"])
    assert res.exit_code != 0 and "unknown preset 'huge'" in res.output
