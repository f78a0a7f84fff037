"""The embedded default end to end, reduced to a tiny budget: every stage runs through its real CLI.

The scores of so short a training are whatever they are; what must hold is that every stage left complete,
mutually consistent output, and that the scores, verdicts and report are exactly what that output implies.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from lightgen import demo
from lightgen_model.config import PRESETS

POOL, CAPTIONS, HELDOUT, SAMPLES = 240, 120, 6, 2
STEPS, DPO_STEPS = 6, 3  # 6 steps of 2 x 32 images
TINY = ["--pool", str(POOL), "--captions", str(CAPTIONS), "--images", str(64 * STEPS), "--dpo-steps", str(DPO_STEPS),
        "--heldout", str(HELDOUT), "--samples", str(SAMPLES), "--pairs", "40", "--curve-prompts", "6",
        "--curve-points", "2", "--num-iter", "4", "--workers", "1", "--nproc", "2"]  # fmt: skip
STAGES = ("captions", "synthesize", "encode", "pretrain", "curve", "heldout", "geneval_pretrain", "pairs", "dpo",
          "geneval_dpo")  # fmt: skip
MANIFESTS = {"captions": "build-captions", "images": "synthesize", "latents": "encode-latents",
             "pairs": "build-dpo-pairs", "pairs/judgements": "judge-images"}  # fmt: skip


def check_manifest(folder: Path, stage: str) -> dict[str, Any]:
    """A finished stage's manifest: complete, totals that add up, every shard on disk with its size and sha256."""
    m = json.loads((folder / "manifest.json").read_text())
    assert m["stage"] == stage and m["complete"] is True, folder
    shards = m["shards"]
    assert len(shards) == m["n_shards"] >= 1 and m["rows_per_shard"] == [s["rows"] for s in shards]
    assert m["rows"] == sum(s["rows"] for s in shards) and m["inputs"] == m["rows"] + m["rejected"]
    for s in shards:
        data = (folder / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"], s["name"]
    return m


def check_geneval_folder(folder: Path, heldout: list[bytes]) -> dict[str, Any]:
    """GenEval's layout for every held-out line, and a scores.json whose summary is the recount of its images."""
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(len(heldout))]
    for i, line in enumerate(heldout):
        assert (folder / f"{i:05d}" / "metadata.jsonl").read_bytes() == line
        assert sorted(p.name for p in (folder / f"{i:05d}" / "samples").iterdir()) == [
            f"{s:04d}.png" for s in range(SAMPLES)
        ]
    doc = json.loads((folder / "scores.json").read_text())
    images, summary = doc["images"], doc["summary"]
    assert len(images) == summary["total_images"] == len(heldout) * SAMPLES
    assert summary["total_prompts"] == len(heldout)
    tags = {json.loads(line)["tag"] for line in heldout}
    assert set(summary["tasks"]) == tags
    for tag, task in summary["tasks"].items():
        hits = [r["correct"] for r in images if r["tag"] == tag]
        assert (task["total"], task["correct"]) == (len(hits), sum(hits))
        assert task["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert summary["overall"] == pytest.approx(np.mean([t["accuracy"] for t in summary["tasks"].values()]))
    return doc


def recount_per_seed(images: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Accuracy per sample index (= seed index) and category, and their mean as `overall`."""
    rows: dict[int, dict[str, list[bool]]] = {}
    for r in images:
        rows.setdefault(int(Path(r["filename"]).stem), {}).setdefault(r["tag"], []).append(r["correct"])
    acc = {k: {t: float(np.mean(v)) for t, v in tags.items()} for k, tags in rows.items()}
    return {k: a | {"overall": float(np.mean(list(a.values())))} for k, a in acc.items()}


def check_models(out: Path, res: dict[str, Any], heldout: list[bytes]) -> None:
    """Both trainings saved a model; both were scored on every held-out prompt; per-seed scores recount."""
    for which in ("pretrain", "dpo"):
        assert {p.name for p in (out / which / "model").iterdir()} >= {"config.json", "model.safetensors"}
        summary = json.loads((out / which / "summary.json").read_text())
        steps = STEPS if which == "pretrain" else DPO_STEPS  # the budget in work, whatever the machine's speed
        assert (summary["step"], summary["nonfinite"], summary["stopped_by"]) == (steps, 0, "max_steps")
        metrics = [json.loads(x) for x in (out / which / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == summary["step"] and all(np.isfinite(m["loss"]) for m in metrics)
        doc = check_geneval_folder(out / "geneval" / which, heldout)
        model = res["models"][which]
        assert model["summary"] == doc["summary"]
        assert model["sha256"] == hashlib.sha256((out / which / "model" / "model.safetensors").read_bytes()).hexdigest()
        seeds = recount_per_seed(doc["images"])
        assert sorted(seeds) == sorted(int(k) for k in model["per_seed"]["seeds"]) == list(range(SAMPLES))
        for k, row in model["per_seed"]["seeds"].items():
            assert row == pytest.approx(seeds[int(k)])
        for key, spread in model["per_seed"]["spread"].items():
            assert spread["mean"] == pytest.approx(np.mean([s[key] for s in seeds.values()]))
            assert spread["std"] == pytest.approx(np.std([s[key] for s in seeds.values()]))
    dpo = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["implicit_acc"] <= 1.0 for m in dpo)


def check_curve(out: Path, res: dict[str, Any]) -> None:
    """One curve point per kept pretraining checkpoint, each the score of its own GenEval folder."""
    checkpoints = sorted((out / "pretrain" / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 2 and len(res["curve"]) == len(checkpoints)
    for ck, row in zip(checkpoints, res["curve"], strict=True):
        state = json.loads((ck / "state.json").read_text())
        assert row["step"] == state["step"] and row["minutes"] == round(state["elapsed_s"] / 60, 2)
        summary = json.loads((out / "geneval" / "curve" / ck.name / "scores.json").read_text())["summary"]
        assert row["overall"] == summary["overall"] and 0.0 <= row["overall"] <= 1.0
    steps = [r["step"] for r in res["curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == json.loads((out / "pretrain/summary.json").read_text())["step"]


def expected_targets(res: dict[str, Any]) -> list[tuple[str, float, bool]]:
    """The verdicts the scores imply: the score targets on the pretrained model, then DPO's two."""
    pre = res["models"]["pretrain"]["summary"]
    acc = lambda tag: pre["tasks"].get(tag, {}).get("accuracy", 0.0)
    mean = lambda which, key: res["models"][which]["per_seed"]["spread"].get(key, {"mean": 0.0})["mean"]
    d_over = mean("dpo", "overall") - mean("pretrain", "overall")
    d_pos = mean("dpo", "position") - mean("pretrain", "position")
    stages = res["stages"]
    share = sum(stages[k] for k in ("curve", "geneval_pretrain", "pairs", "geneval_dpo")) / sum(stages.values())
    return [
        ("pretrain single_object >= 0.8", acc("single_object"), acc("single_object") >= 0.8),
        ("pretrain colors >= 0.6", acc("colors"), acc("colors") >= 0.6),
        ("pretrain overall >= 0.5", pre["overall"], pre["overall"] >= 0.5),
        (f"DPO: overall does not fall ({SAMPLES} seeds)", d_over, d_over >= 0),
        (f"DPO: position improves ({SAMPLES} seeds)", d_pos, d_pos > 0),
        ("sampling <= 20% of the demo's time", share, share <= 0.2),
    ]


def check_verdicts(res: dict[str, Any], text: str, report: str, seconds: float) -> None:
    """The targets follow from the scores, and the console and the report state each one as it is."""
    expected = expected_targets(res)
    assert [(r["target"], r["value"], r["pass"]) for r in res["targets"]] == [
        (t, round(v, 3), p) for t, v, p in expected
    ]
    for r in res["targets"]:
        verdict = "PASS" if r["pass"] else "FAIL"
        assert f"{verdict}  {r['target']}: {r['value']}\n" in text, r
        cell = "PASS" if r["pass"] else "<b>FAIL</b>"
        assert f"<tr><td>{cell}</td><td>{html.escape(r['target'])}</td><td>{r['value']}</td></tr>" in report, r
    verdict = "PASS" if seconds <= 1800 else "FAIL"
    assert f"total stage time {seconds / 60:.1f} min (target <= 30 on 2 idle cores; " in text
    assert f"): {verdict}\n" in text


def check_report(out: Path, res: dict[str, Any], state: dict[str, Any], report: str) -> None:
    """Per-category rows with both models' scores, one sample per held-out prompt and model, data counts, stage
    timings, curves, and links to an inspect page per stage output."""
    for tag, a in res["models"]["pretrain"]["per_seed"]["spread"].items():
        b = res["models"]["dpo"]["per_seed"]["spread"][tag]
        row = f"<tr><td>{tag}</td><td>{a['mean']:.3f} ± {a['std']:.3f}</td><td>{b['mean']:.3f} ± {b['std']:.3f}</td>"
        assert row in report, tag
    images = re.findall(r'<img src="([^"]+)"', report)
    assert len(images) == 2 * HELDOUT and all((out / src).is_file() for src in images)  # one category per prompt
    for name, d in res["data"].items():
        assert f"<tr><td>{name}</td><td>{d['in']}</td><td>{d['written']}</td><td>{d['rejected']}</td></tr>" in report
    for stage, s in state.items():
        assert f"<tr><td>{stage}</td><td>{s['seconds']:.0f} s</td></tr>" in report
    assert report.count("<svg") == 4  # pretraining loss, DPO loss and implicit accuracy, score vs minutes
    for name, folder in demo.INSPECT_PAGES.items():
        page = out / "inspect" / f"{name}.html"
        assert page.stat().st_size > 0 and f'href="inspect/{name}.html"' in report, folder


@pytest.mark.slow
def test_reduced_chain_produces_consistent_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    res = demo.main(["--out", str(out), *TINY])
    text = capsys.readouterr().out
    # 1. every stage finished, and the saved scores are the returned ones
    state = json.loads((out / "stages.json").read_text())
    assert list(state) == list(STAGES) and all(s["done"] and s["seconds"] > 0 for s in state.values())
    assert res["stages"] == {k: round(v["seconds"], 1) for k, v in state.items()}
    assert json.loads((out / "scores.json").read_text()) == json.loads(json.dumps(res))
    assert res["budget"] == {"steps": STEPS, "images": 64 * STEPS, "minutes": None, "dpo_steps": DPO_STEPS}
    assert res["device"] == "cpu"
    # 2. data: complete manifests whose counts chain from stage to stage
    m = {folder: check_manifest(out / folder, stage) for folder, stage in MANIFESTS.items()}
    assert res["data"] == {k: {"in": m[k]["inputs"], "written": m[k]["rows"], "rejected": m[k]["rejected"]}
                           for k in ("captions", "images", "latents", "pairs")}  # fmt: skip
    assert (m["captions"]["inputs"], m["captions"]["rows"]) == (POOL, CAPTIONS)
    assert m["images"]["inputs"] == m["captions"]["rows"] and m["latents"]["inputs"] == m["images"]["rows"]
    assert m["pairs"]["inputs"] == m["pairs/judgements"]["inputs"] == min(demo.SYNTH_SHARD, m["images"]["rows"])
    weights, sha = m["pairs"]["loser_model"].split("@")[0].split(":")  # the pretrained weights, by content
    assert (
        m["pairs"]["rows"] >= 1
        and hashlib.sha256((out / "pretrain" / "model" / weights).read_bytes()).hexdigest()[:16] == sha
    )
    assert m["pairs"]["config"]["judge_losers"]  # the demo keeps only pairs whose loser the judge finds worse
    # 3. models, their held-out scores, the learning curve
    heldout = (out / "heldout.jsonl").read_bytes().splitlines(keepends=True)
    assert len(heldout) == HELDOUT
    check_models(out, res, heldout)
    check_curve(out, res)
    # the models record the `shapes` preset's sampling settings, which every sampling stage used but for --num-iter
    for which in ("pretrain", "dpo"):
        recorded = json.loads((out / which / "model" / "config.json").read_text())["sampling"]
        assert recorded == PRESETS["shapes"]["sampling"] and recorded["cfg_schedule"] == "constant"
    # 4. verdicts and report
    report = (out / "report.html").read_text()
    assert "=== targets" in text and f"=== pretraining budget: {STEPS} steps of 64 = {64 * STEPS} images" in text
    check_verdicts(res, text, report, sum(res["stages"].values()))
    check_report(out, res, state, report)
    # 5. a rerun finds every stage done and recomputes the same results
    again = demo.main(["--out", str(out), *TINY])
    assert capsys.readouterr().out.count("done earlier") == len(STAGES)
    assert again == res


@pytest.mark.slow
def test_ablation_arms_differ_in_diversity_only_and_report_the_spread_over_seeds(tmp_path: Path) -> None:
    """Both arms: the same number of captions and training images; each seed's model scored; mean and spread over
    the seeds recount from the per-seed scores; the low arm's captions are fewer distinct scenes, worded alike (both
    arms paraphrase every caption: the canonical GenEval prompt of the held-out set is a rare paraphrase in either)."""
    out = tmp_path / "ablation"
    res = demo.main(["--ablation", "--out", str(out), "--ablation-captions", "40", "--ablation-scenes", "3",
                     "--images", "96", "--seeds", "0", "1", "--heldout", "6", "--samples", "1", "--num-iter", "4",
                     "--workers", "0", "--nproc", "1"])  # fmt: skip
    assert res == json.loads((out / "ablation.json").read_text())
    assert res["budget"]["steps"] == 3 and res["captions"] == 40
    scenes = {}
    for arm in ("diverse", "low_diversity"):
        r = res[arm]
        assert r["data"]["captions"]["written"] == 40 and r["data"]["latents"]["written"] == 40
        assert sorted(r["seeds"]) == ["0", "1"]
        for seed in (0, 1):
            summary = json.loads((out / arm / f"pretrain-s{seed}" / "summary.json").read_text())
            assert (summary["step"], summary["stopped_by"]) == (3, "max_steps")
            scores = json.loads((out / arm / f"geneval-s{seed}" / "scores.json").read_text())["summary"]
            assert r["seeds"][str(seed)]["overall"] == scores["overall"]
        for key, spread in r["spread"].items():
            values = [r["seeds"][s].get(key, 0.0) for s in ("0", "1")]
            assert spread == pytest.approx({"mean": np.mean(values), "std": np.std(values)})
        table = pq.read_table(sorted((out / arm / "captions").glob("part-*.parquet")), columns=["caption", "metadata"])
        metadata = table.column("metadata").to_pylist()
        scenes[arm] = len(set(metadata))  # GenEval metadata: the scene of a caption
        prompts = [json.loads(m)["prompt"] for m in metadata]
        canonical = sum(p == c for p, c in zip(prompts, table.column("caption").to_pylist(), strict=True))
        assert canonical <= 0.05 * len(prompts)  # the grammar's own rate (~0.3 %); a paraphrase rate of 0.3 gives ~70 %
    # the seeds trained different models on the same data
    a, b = (hashlib.sha256((out / "diverse" / f"pretrain-s{s}" / "model" / "model.safetensors").read_bytes()).digest()
            for s in (0, 1))  # fmt: skip
    assert a != b
    assert scenes["low_diversity"] < scenes["diverse"]


@pytest.mark.parametrize(
    "args, message",
    [(["--images", "0"], "--images must be >= 1, got 0"), (["--dpo-steps", "-1"], "--dpo-steps must be >= 1"),
     (["--budget-minutes", "0"], "--budget-minutes must be > 0, got 0.0"),
     (["--ablation", "--ablation-scenes", "0"], "--ablation-scenes must be >= 1, got 0"),
     (["--temperature", "0"], "temperature must be a finite number > 0, got 0.0")],
)  # fmt: skip
def test_demo_refuses_an_empty_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message) -> None:
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "demo"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before any stage ran


def test_the_shapes_preset_trains_the_demos_default_budget(tmp_path: Path) -> None:
    """Training by hand with conf/shapes.yaml (the README's walk) gives the budget `make demo` trains by default."""
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/shapes.yaml").read_text())
    chain = demo.Demo(demo.parse_args(["--out", str(tmp_path / "demo")]))
    assert chain.a.images == demo.DEFAULT_IMAGES and conf["data"]["batch_size"] == demo.BATCH_PER_PROCESS
    assert conf["train"]["max_steps"] == chain.pretrain_steps()


def test_the_demo_samples_with_the_models_recorded_settings_unless_told(tmp_path: Path) -> None:
    """No sampling flag given: none is passed on (the model's recorded `sampling` applies); given ones are."""
    chain = demo.Demo(demo.parse_args(["--out", str(tmp_path / "a")]))
    assert chain.sampling_args() == ["--device", "cpu"]
    chain = demo.Demo(demo.parse_args(["--out", str(tmp_path / "b"), "--cfg", "2", "--cfg-schedule", "linear"]))
    assert chain.sampling_args() == ["--cfg", "2.0", "--cfg-schedule", "linear", "--device", "cpu"]
