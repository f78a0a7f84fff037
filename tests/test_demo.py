"""The embedded default end to end, reduced to a tiny budget: every stage runs through its real CLI."""

from __future__ import annotations

import json

import pytest

from lightgen import demo

TINY = ["--pool", "240", "--captions", "120", "--budget-minutes", "0.15", "--dpo-minutes", "0.1", "--heldout", "6",
        "--samples", "2", "--pairs", "40", "--curve-prompts", "6", "--curve-points", "2", "--num-iter", "4",
        "--workers", "1", "--nproc", "2"]  # fmt: skip


@pytest.mark.slow
def test_reduced_chain_produces_consistent_artifacts(tmp_path, capsys):
    out = tmp_path / "demo"
    res = demo.main(["--out", str(out), *TINY])
    text = capsys.readouterr().out
    for stage in (
        "captions",
        "synthesize",
        "encode",
        "pretrain",
        "curve",
        "geneval_pretrain",
        "pairs",
        "dpo",
        "geneval_dpo",
    ):
        assert json.loads((out / "stages.json").read_text())[stage]["done"], stage
    d = res["data"]
    for name in ("captions", "images", "latents", "pairs"):
        assert d[name]["in"] == d[name]["written"] + d[name]["rejected"], name  # counts add up
    assert d["captions"]["in"] == 240 and d["captions"]["written"] == 120
    assert d["images"]["in"] == d["captions"]["written"] and d["latents"]["in"] == d["images"]["written"]
    assert d["pairs"]["in"] == min(demo.SYNTH_SHARD, d["images"]["written"])
    for which in ("pretrain", "dpo"):
        m = res["models"][which]
        assert m["summary"]["total_images"] == 12 and len(m["per_seed"]["seeds"]) == 2
        assert 0.0 <= m["summary"]["overall"] <= 1.0
    assert len(res["curve"]) >= 2 and res["curve"][-1]["minutes"] >= res["curve"][0]["minutes"]
    saved = json.loads((out / "scores.json").read_text())
    assert saved["models"] == json.loads(json.dumps(res["models"]))
    html = (out / "report.html").read_text()
    for word in ("single_object", "position", "<svg", "Stage timings", "PASS" if "PASS" in text else "FAIL"):
        assert word in html
    assert [r["target"] for r in res["targets"]][:3] == [
        "pretrain single_object >= 0.8", "pretrain colors >= 0.6", "pretrain overall >= 0.35"
    ]  # fmt: skip
    assert "=== targets (issue 9)" in text and ("PASS" in text or "FAIL" in text)
    # a rerun finds every stage done and recomputes the same scores
    again = demo.main(["--out", str(out), *TINY])
    assert again["models"] == res["models"]
    assert capsys.readouterr().out.count("done earlier") == 10
