"""The embedded default end to end, reduced to a tiny budget: every stage runs through its real CLI.

The scores of so short a training are whatever they are; what must hold is that every stage left complete,
mutually consistent output, and that the scores, verdicts and report are exactly what that output implies.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from lightgen_model.config import PRESETS
from recipes.shapes import cli, commands
from recipes.shapes.report import INSPECT_PAGES
from recipes.shapes.steps import StepRunner

POOL, CAPTIONS, HELDOUT, SAMPLES = 240, 120, 6, 2
STEPS, DPO_STEPS = 6, 3  # 6 steps of 2 x 32 images
TINY = [
    "--pool",
    str(POOL),
    "--captions",
    str(CAPTIONS),
    "--images",
    str(64 * STEPS),
    "--dpo-steps",
    str(DPO_STEPS),
    "--heldout",
    str(HELDOUT),
    "--samples",
    str(SAMPLES),
    "--pairs",
    "40",
    "--curve-prompts",
    "6",
    "--curve-points",
    "2",
    "--num-iter",
    "4",
    "--workers",
    "1",
    "--nproc",
    "2",
]
STAGES = (
    "captions",
    "synthesize",
    "encode",
    "pretrain",
    "curve",
    "heldout",
    "geneval_pretrain",
    "pairs",
    "dpo",
    "geneval_dpo",
)
MANIFESTS = {
    "captions": "build-captions",
    "images": "synthesize",
    "latents": "encode-latents",
    "pairs": "build-dpo-pairs",
    "pairs/judgements": "judge-images",
}


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
    for name, folder in INSPECT_PAGES.items():
        page = out / "inspect" / f"{name}.html"
        assert page.stat().st_size > 0 and f'href="inspect/{name}.html"' in report, folder


@pytest.mark.slow
def test_reduced_chain_produces_consistent_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    res = cli.main(["--out", str(out), *TINY])
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
    assert res["data"] == {
        k: {"in": m[k]["inputs"], "written": m[k]["rows"], "rejected": m[k]["rejected"]}
        for k in ("captions", "images", "latents", "pairs")
    }
    assert (m["captions"]["inputs"], m["captions"]["rows"]) == (POOL, CAPTIONS)
    assert m["images"]["inputs"] == m["captions"]["rows"] and m["latents"]["inputs"] == m["images"]["rows"]
    assert m["pairs"]["inputs"] == m["pairs/judgements"]["inputs"] == min(commands.SYNTH_SHARD, m["images"]["rows"])
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
    again = cli.main(["--out", str(out), *TINY])
    assert capsys.readouterr().out.count("done earlier") == len(STAGES)
    assert again == res


@pytest.mark.slow
def test_ablation_arms_differ_in_diversity_only_and_report_the_spread_over_seeds(tmp_path: Path) -> None:
    """Both arms: the same number of captions and training images; each seed's model scored; mean and spread over
    the seeds recount from the per-seed scores; the low arm's captions are fewer distinct scenes, worded alike (both
    arms paraphrase every caption: the canonical GenEval prompt of the held-out set is a rare paraphrase in either)."""
    out = tmp_path / "ablation"
    res = cli.main(
        [
            "--ablation",
            "--out",
            str(out),
            "--ablation-captions",
            "40",
            "--ablation-scenes",
            "3",
            "--images",
            "96",
            "--seeds",
            "0",
            "1",
            "--heldout",
            "6",
            "--samples",
            "1",
            "--num-iter",
            "4",
            "--workers",
            "0",
            "--nproc",
            "1",
        ]
    )
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
    a, b = (
        hashlib.sha256((out / "diverse" / f"pretrain-s{s}" / "model" / "model.safetensors").read_bytes()).digest()
        for s in (0, 1)
    )
    assert a != b
    assert scenes["low_diversity"] < scenes["diverse"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "0"], "--images must be >= 1, got 0"),
        (["--dpo-steps", "-1"], "--dpo-steps must be >= 1"),
        (["--budget-minutes", "0"], "--budget-minutes must be > 0, got 0.0"),
        (["--ablation", "--ablation-scenes", "0"], "--ablation-scenes must be >= 1, got 0"),
        (["--temperature", "0"], "temperature must be a finite number > 0, got 0.0"),
    ],
)
def test_demo_refuses_an_empty_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str], args, message) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "demo"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before any stage ran


def test_the_shapes_preset_trains_the_demos_default_budget(tmp_path: Path) -> None:
    """Training by hand with conf/shapes.yaml (the README's walk) gives the budget `make demo` trains by default."""
    conf = yaml.safe_load((Path(__file__).parents[1] / "conf/shapes.yaml").read_text())
    args = cli.parse_args(["--out", str(tmp_path / "demo")])
    assert args.images == commands.DEFAULT_IMAGES and conf["data"]["batch_size"] == commands.BATCH_PER_PROCESS
    assert conf["train"]["max_steps"] == commands.pretrain_steps(args)


def test_the_demo_samples_with_the_models_recorded_settings_unless_told(tmp_path: Path) -> None:
    """No sampling flag given: none is passed on (the model's recorded `sampling` applies); given ones are."""
    args = cli.parse_args(["--out", str(tmp_path / "a")])
    assert commands.sampling(args) == ["--device", "cpu"]
    args = cli.parse_args(["--out", str(tmp_path / "b"), "--cfg", "2", "--cfg-schedule", "linear"])
    assert commands.sampling(args) == ["--cfg", "2.0", "--cfg-schedule", "linear", "--device", "cpu"]


def fake_outputs(out: Path, arms: tuple[str, ...] = ()) -> None:
    """What the chain reads back between its commands, so that it runs with the commands recorded, not run:
    3 teacher shards, 2 kept checkpoints, scored GenEval folders, two models, stage manifests."""
    summary = {"overall": 0.5, "tasks": {"colors": {"accuracy": 0.5, "total": 2, "correct": 1}}}
    images = [{"filename": f"00000/samples/{k:04d}.png", "tag": "colors", "correct": k == 0} for k in range(2)]
    scores = json.dumps({"summary": summary, "images": images})
    files = {f"images/part-{i:05d}.tar": "" for i in range(3)}
    for step in (3, 6):
        files[f"pretrain/checkpoints/step-{step:06d}/state.json"] = json.dumps({"step": step, "elapsed_s": 60.0})
        files[f"geneval/curve/step-{step:06d}/scores.json"] = scores
    for which in ("pretrain", "dpo"):
        files |= {f"geneval/{which}/scores.json": scores, f"{which}/model/model.safetensors": which}
    for folder in ("captions", "images", "latents", "pairs", "pairs/judgements"):
        files[f"{folder}/manifest.json"] = json.dumps({"inputs": 2, "rows": 2, "rejected": 0})
    files |= {f"{arm}/geneval-s{s}/scores.json": scores for arm in arms for s in (0, 5)}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)


def planned(monkeypatch: pytest.MonkeyPatch, argv: str) -> list[tuple[str, list[str]]]:
    """The (log, argv) of every command the recipe runs for `argv`, in order, recorded instead of run."""
    ran: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(StepRunner, "sh", lambda self, log, cmd: ran.append((log, cmd)))
    cli.main(shlex.split(argv))
    return ran


def expect(log: str, line: str, out: Path) -> tuple[str, list[str]]:
    """(log, argv) of a command line written as text: `{ld}` / `{lg}` the CLIs, `{py}` / `{torchrun}` (2 processes)
    the launchers, `{root}` the repository, `{out}` the output folder."""
    fields = {
        "ld": " ".join(commands.tool("lightgen-data")),
        "lg": " ".join(commands.tool("lightgen")),
        "py": sys.executable,
        "torchrun": f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2",
        "root": commands.ROOT,
        "out": out,
    }
    return log, shlex.split(line.format(**fields))


def test_the_demo_runs_the_documented_command_lines_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain of docs/demo.md, written out by hand: a change of any line, seed or order changes the models."""
    out = tmp_path / "demo"
    fake_outputs(out)
    argv = (
        f"--out {out} --pool 240 --captions 120 --images 384 --dpo-steps 3 --heldout 6 --samples 2 --pairs 401 "
        "--curve-prompts 5 --curve-points 2 --seed 7 --workers 1 --nproc 2 --cfg 2.5"
    )
    sampling, tars = "--cfg 2.5 --device cpu", " ".join(f"--input {{out}}/images/part-0000{i}.tar" for i in range(3))
    curve = [
        line
        for step in ("step-000003", "step-000006")
        for line in (
            (
                "curve",
                f"{{lg}} geneval --model {{out}}/pretrain/checkpoints/{step} --metadata {{out}}/curve_prompts.jsonl "
                f"--out {{out}}/geneval/curve/{step} --samples 1 --seed 7 --batch-size 64 {sampling}",
            ),
            ("curve", f"{{lg}} shapes score {{out}}/geneval/curve/{step}"),
        )
    ]
    geneval = [
        line
        for which in ("pretrain", "dpo")
        for line in (
            (
                f"geneval_{which}",
                f"{{lg}} geneval --model {{out}}/{which}/model --metadata {{out}}/heldout.jsonl "
                f"--out {{out}}/geneval/{which} --samples 2 --seed 7 --batch-size 64 {sampling}",
            ),
            (f"geneval_{which}", f"{{lg}} shapes score {{out}}/geneval/{which}"),
        )
    ]
    inspect = [
        ("inspect", f"{{ld}} inspect {{out}}/{folder} --out {{out}}/inspect/{name}.html --seed 7")
        for name, folder in [(n, n) for n in ("captions", "images", "latents", "pairs")]
        + [("judgements", "pairs/judgements")]
    ]
    lines = [
        (
            "captions",
            "{ld} build-captions --shapes 240 --n 120 --embedder hash --seed 7 --output {out}/captions --workers 1",
        ),
        (
            "synthesize",
            "{ld} synthesize --input {out}/captions --output {out}/images --teacher shapes --resolution 32 "
            "--seed 7 --shard-size 200 --workers 1",
        ),
        (
            "encode",
            "{ld} encode-latents --input {out}/images --output {out}/latents --vae pixel --text-encoder minilm "
            "--resolution 32 --workers 1",
        ),
        (
            "pretrain",
            "{torchrun} {root}/training/pretrain.py --config {root}/conf/shapes.yaml data.shards=[{out}/latents] "
            "train.out_dir={out}/pretrain data.batch_size=32 train.max_steps=6 train.budget_minutes=null train.device=cpu "
            "train.seed=7 log.progress=false checkpoint.every_steps=3 checkpoint.every_minutes=null checkpoint.keep_last=100",
        ),
        ("curve", "{lg} shapes prompts --n 5 --seed 999002 --out {out}/curve_prompts.jsonl"),
        *curve,
        ("heldout", "{lg} shapes prompts --n 6 --seed 999001 --out {out}/heldout.jsonl"),
        *geneval[:2],
        (
            "pairs",
            f"{{ld}} build-dpo-pairs {tars} --output {{out}}/pairs --judge-backend shapes --model {{out}}/pretrain/model "
            f"--seed 8 --resolution 32 --batch-size 64 --judge-losers {sampling} --workers 1",
        ),
        (
            "dpo",
            "{torchrun} {root}/training/dpo.py --config {root}/conf/dpo_shapes.yaml model.init_from={out}/pretrain/model "
            "dpo.pairs=[{out}/pairs] train.out_dir={out}/dpo train.device=cpu train.max_steps=3 train.budget_minutes=null "
            "train.seed=7 log.progress=false",
        ),
        *geneval[2:],
        *inspect,
    ]
    expected = [expect(log, line, out) for log, line in lines]
    assert planned(monkeypatch, argv) == expected
    assert list(json.loads((out / "stages.json").read_text())) == list(STAGES)
    # a rerun finds every stage done: only the inspect pages are made again
    assert planned(monkeypatch, argv) == expected[-5:]


def test_the_ablation_runs_the_demos_command_lines_on_each_arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held-out prompts, then per arm the demo's data lines (its scenes added, the stage's own shard size) and per
    seed the demo's pretraining line (no curve checkpoints) and GenEval lines."""
    out = tmp_path / "ablation"
    arms = {
        "diverse": (80, "--shapes-diversity 1.0"),
        "low_diversity": (160, "--shapes-diversity 1.0 --shapes-scenes 3"),
    }
    fake_outputs(out, tuple(arms))
    argv = (
        f"--ablation --out {out} --ablation-captions 40 --ablation-scenes 3 --images 96 --seeds 0 5 --heldout 6 "
        "--samples 1 --seed 2 --workers 0 --nproc 1 --pretrain-set optim.lr=0.001"
    )
    lines = [("heldout", "{lg} shapes prompts --n 6 --seed 999001 --out {out}/heldout.jsonl")]
    for arm, (pool, extra) in arms.items():
        o = f"{{out}}/{arm}"
        lines += [
            (
                f"{arm}_captions",
                f"{{ld}} build-captions --shapes {pool} --n 40 --embedder hash --seed 2 --output {o}/captions {extra} --workers 0",
            ),
            (
                f"{arm}_synthesize",
                f"{{ld}} synthesize --input {o}/captions --output {o}/images --teacher shapes --resolution 32 --seed 2 --workers 0",
            ),
            (
                f"{arm}_encode",
                f"{{ld}} encode-latents --input {o}/images --output {o}/latents --vae pixel --text-encoder minilm --resolution 32 --workers 0",
            ),
        ]
        for seed in (0, 5):
            lines += [
                (
                    f"{arm}_pretrain",
                    f"{{py}} {{root}}/training/pretrain.py --config {{root}}/conf/shapes.yaml data.shards=[{o}/latents] "
                    f"train.out_dir={o}/pretrain-s{seed} data.batch_size=32 train.max_steps=3 train.budget_minutes=null "
                    f"train.device=cpu train.seed={seed} log.progress=false optim.lr=0.001",
                ),
                (
                    f"{arm}_geneval",
                    f"{{lg}} geneval --model {o}/pretrain-s{seed}/model --metadata {{out}}/heldout.jsonl "
                    f"--out {o}/geneval-s{seed} --samples 1 --seed 2 --batch-size 64 --device cpu",
                ),
                (f"{arm}_geneval", f"{{lg}} shapes score {o}/geneval-s{seed}"),
            ]
    ran = planned(monkeypatch, argv)
    assert ran == [expect(log, line, out) for log, line in lines]
    # the very lines the demo's builders give (one builder per line, shared by the demo and the ablation)
    args, o = cli.parse_args(shlex.split(argv)), out / "diverse"
    assert [cmd for _, cmd in ran[1:6]] == [
        commands.build_captions(args, o, 80, 40, ["--shapes-diversity", "1.0"]),
        commands.synthesize(args, o),
        commands.encode_latents(args, o),
        commands.pretrain(args, o, o / "pretrain-s0", 0),
        commands.geneval(args, o / "pretrain-s0" / "model", out / "heldout.jsonl", o / "geneval-s0", 1),
    ]
    steps = ("captions", "synthesize", "encode", "pretrain-s0", "geneval-s0", "pretrain-s5", "geneval-s5")
    stages = ["heldout", *(f"{arm}/{step}" for arm in arms for step in steps)]
    assert list(json.loads((out / "stages.json").read_text())) == stages
