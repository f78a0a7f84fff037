"""The demo's results: scores per sample seed, data counts, the budget as run, and the verdict on each target."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from recipes.shapes.commands import BATCH_PER_PROCESS, Options, pretrain_steps

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# the demo's targets at the default budget (held-out ShapesWorld, after pretraining)
TARGETS = {"single_object": 0.80, "colors": 0.60, "overall": 0.50}
SAMPLING_STAGES = ("curve", "geneval_pretrain", "pairs", "geneval_dpo")  # what evaluation and DPO losers cost
SAMPLING_SHARE = 0.20  # target: at most this share of the demo's stage time
STAGE_SECONDS = 1800  # target: the whole demo within 30 minutes on 2 idle cores


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; none when it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def per_seed(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores per sample index (sample k of every prompt used seed k): per category and overall, with spread."""
    by_k: dict[int, dict[str, list[bool]]] = {}
    for r in images:
        k = int(Path(r["filename"]).stem)
        by_k.setdefault(k, {}).setdefault(r["tag"], []).append(bool(r["correct"]))
    rows = {}
    for k, tags in sorted(by_k.items()):
        acc = {t: float(np.mean(v)) for t, v in tags.items()}
        rows[k] = acc | {"overall": float(np.mean(list(acc.values())))}
    keys = sorted({key for r in rows.values() for key in r})
    spread = {key: mean_std([r[key] for r in rows.values() if key in r]) for key in keys}
    return {"seeds": rows, "spread": spread}


def data_counts(o: Path) -> dict[str, Any]:
    """Rows in, written and rejected by each pipeline stage, from its manifest."""
    out = {}
    for name in ("captions", "images", "latents", "pairs"):
        p = o / name / "manifest.json"
        if p.is_file():
            m = json.loads(p.read_text())
            out[name] = {"in": m.get("inputs"), "written": m.get("rows"), "rejected": m.get("rejected")}
    return out


def budget(a: Options) -> dict[str, Any]:
    """The pretraining and DPO budgets as run."""
    steps = pretrain_steps(a)
    images = steps * BATCH_PER_PROCESS * max(1, a.nproc)
    return {"steps": steps, "images": images, "minutes": a.budget_minutes, "dpo_steps": a.dpo_steps}


def model_scores(o: Path, which: str) -> dict[str, Any]:
    """A model's held-out GenEval summary, its scores per sample seed, and its weights' sha256."""
    doc = json.loads((o / "geneval" / which / "scores.json").read_text())
    # the weights' sha256: two runs of the same command on any machine, idle or busy, give the same model
    weights = hashlib.sha256((o / which / "model" / "model.safetensors").read_bytes()).hexdigest()
    return {"summary": doc["summary"], "per_seed": per_seed(doc["images"]), "sha256": weights}


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS / FAIL per target: the pretrained model's scores, what DPO changes, the share of time spent sampling."""
    pre = res["models"]["pretrain"]["summary"]
    rows = []
    for key, goal in TARGETS.items():
        v = pre["overall"] if key == "overall" else pre["tasks"].get(key, {}).get("accuracy", 0.0)
        rows.append({"target": f"pretrain {key} >= {goal}", "value": round(v, 3), "pass": v >= goal})
    sp_pre, sp_post = res["models"]["pretrain"]["per_seed"]["spread"], res["models"]["dpo"]["per_seed"]["spread"]
    d_over = sp_post["overall"]["mean"] - sp_pre["overall"]["mean"]
    d_pos = sp_post.get("position", {"mean": 0})["mean"] - sp_pre.get("position", {"mean": 0})["mean"]
    n_seeds = len(res["models"]["dpo"]["per_seed"]["seeds"])
    rows.append(
        {"target": f"DPO: overall does not fall ({n_seeds} seeds)", "value": round(d_over, 3), "pass": d_over >= 0}
    )
    rows.append({"target": f"DPO: position improves ({n_seeds} seeds)", "value": round(d_pos, 3), "pass": d_pos > 0})
    share = sampling_share(res["stages"])
    target = f"sampling <= {SAMPLING_SHARE:.0%} of the demo's time"
    rows.append({"target": target, "value": round(share, 3), "pass": share <= SAMPLING_SHARE})
    return rows


def sampling_share(stages: dict[str, float]) -> float:
    """The share of the stage time spent sampling: score curve, both GenEval runs, DPO pairs (losers)."""
    total = sum(stages.values())
    return sum(stages.get(k, 0.0) for k in SAMPLING_STAGES) / total if total else 0.0


def print_verdicts(res: dict[str, Any]) -> None:
    print("\n=== targets")
    for r in res["targets"]:
        print(f"{'PASS' if r['pass'] else 'FAIL'}  {r['target']}: {r['value']}")
    t = sum(res["stages"].values())
    print(
        f"total stage time {t / 60:.1f} min (target <= 30 on 2 idle cores; highest load average "
        f"{res['load_average']}): {'PASS' if t <= STAGE_SECONDS else 'FAIL'}"
    )
