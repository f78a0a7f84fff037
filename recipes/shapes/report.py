"""<out>/report.html: targets, scores before and after DPO, sample grids, curves, data counts and stage timings,
built with the HTML helpers of `lightgen-data inspect` (pipeline/inspect/html.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inspect.html import cells, esc, img, line_chart, page, table, tag
from recipes.shapes.commands import HELDOUT_SEED
from recipes.shapes.results import CATEGORIES, read_jsonl

# pages of `lightgen-data inspect` (<out>/inspect/<name>.html) -> the stage output folder each shows
INSPECT_PAGES = {
    "captions": "captions",
    "images": "images",
    "latents": "latents",
    "pairs": "pairs",
    "judgements": "pairs/judgements",
}


def smooth(rows: list[dict[str, Any]], key: str, k: int = 25) -> list[tuple[float, float]]:
    """(step, running mean of the last k values of `key`) at about 200 points."""
    vals = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
    out = []
    for i in range(0, len(vals), max(1, len(vals) // 200)):
        window = [v for _, v in vals[max(0, i - k) : i + 1]]
        out.append((vals[i][0], float(np.mean(window))))
    return out


def sample_grid(folder: Path, category: str, n: int = 8) -> str:
    """An <img> row of the first sample of the first n prompts of a category (paths relative to the report)."""
    images = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
        if meta["tag"] != category:
            continue
        sample = d / "samples" / "0000.png"
        if sample.is_file():
            rel = os.path.relpath(sample, folder.parent.parent)
            style = "image-rendering:pixelated;margin:1px"
            images.append(img(rel, meta["prompt"], width=64, height=64, style=style))
        if len(images) == n:
            break
    return "".join(images)


def curves(o: Path) -> str:
    """Loss curves of both trainings, DPO's implicit accuracy, and the held-out score vs the training step."""
    pm, dm = read_jsonl(o / "pretrain" / "metrics.jsonl"), read_jsonl(o / "dpo" / "metrics.jsonl")
    svgs = [
        line_chart({"pretrain loss": smooth(pm, "loss")}, "pretraining loss (smoothed)", "step"),
        line_chart({"DPO loss": smooth(dm, "loss")}, "DPO loss (smoothed)", "step"),
        line_chart({"implicit acc": smooth(dm, "implicit_acc")}, "DPO implicit accuracy (smoothed)", "step"),
    ]
    learn = read_jsonl(o / "curve.jsonl")
    if learn:
        series = {k: [(r["step"], r[k]) for r in learn if k in r] for k in ("overall", "single_object", "colors")}
        svgs.append(line_chart(series, "held-out score vs training step", "step"))
    return tag("div", "".join(svgs), class_="plots")


def inspect_links(o: Path) -> str:
    """Links to the `lightgen-data inspect` pages that exist under <out>/inspect/."""
    pages = [n for n in INSPECT_PAGES if (o / "inspect" / f"{n}.html").is_file()]
    links = " · ".join(tag("a", esc(n), href=f"inspect/{n}.html") for n in pages)
    return tag("p", f"Look at the data (lightgen-data inspect): {links}") if pages else ""


def budget_text(b: dict[str, Any]) -> str:
    """'Pretraining budget 5157 steps = 330048 images; DPO 150 steps' (with a time limit when there was one)."""
    limit = "" if b["minutes"] is None else f" (at most {b['minutes']:g} min of training)"
    return f"Pretraining budget {b['steps']} steps = {b['images']} images{limit}; DPO {b['dpo_steps']} steps"


def score_rows(res: dict[str, Any]) -> list[str]:
    """Per category and overall: mean ± std over the sample seeds, after pretraining and after DPO."""
    pre, post = res["models"]["pretrain"]["per_seed"]["spread"], res["models"]["dpo"]["per_seed"]["spread"]
    rows = []
    for t in (*CATEGORIES, "overall"):
        if t in pre:
            a, b = pre[t], post[t]
            rows.append(cells([t, f"{a['mean']:.3f} ± {a['std']:.3f}", f"{b['mean']:.3f} ± {b['std']:.3f}"]))
    return rows


def target_rows(res: dict[str, Any]) -> list[str]:
    """PASS / FAIL (bold) per target, with its value."""
    rows = []
    for r in res["targets"]:
        verdict = "PASS" if r["pass"] else tag("b", "FAIL")
        rows.append(tag("tr", tag("td", verdict) + tag("td", esc(r["target"])) + tag("td", esc(r["value"]))))
    return rows


def sections(o: Path, res: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """The report's parts, top to bottom."""
    n_seeds = len(res["models"]["pretrain"]["per_seed"]["seeds"])
    intro = f"{budget_text(res['budget'])}. Held-out prompts (seed {HELDOUT_SEED}), {n_seeds} samples each; "
    both = ["", "after pretraining", "after DPO"]
    grids = [
        tag("tr", tag("td", t) + "".join(tag("td", sample_grid(o / "geneval" / w, t)) for w in ("pretrain", "dpo")))
        for t in CATEGORIES
    ]
    data = [cells([k, v["in"], v["written"], v["rejected"]]) for k, v in res["data"].items()]
    timings = [cells([k, f"{v['seconds']:.0f} s"]) for k, v in state.items()]
    return [
        tag("h1", f"LightGen on ShapesWorld — end to end on a {esc(res['device'])}"),
        tag("p", esc(intro + "scores are mean ± std over the sample seeds.")),
        tag("h2", "Targets") + table(["verdict", "target", "value"], target_rows(res)),
        tag("h2", "Scores per category") + table(["category", *both[1:]], score_rows(res)),
        tag("h2", "Samples (first sample of the first prompts per category)") + table(both, grids),
        tag("h2", "Curves") + curves(o),
        tag("h2", "Data") + table(["stage", "in", "written", "rejected"], data),
        inspect_links(o),
        tag("h2", "Stage timings") + table(["stage", "time"], timings),
    ]


def write_report(o: Path, res: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write <out>/report.html from the results and the step record; its path."""
    path = o / "report.html"
    path.write_text(page("LightGen ShapesWorld demo", "\n".join(sections(o, res, state))))
    return path
