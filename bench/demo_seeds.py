"""What DPO does across pretraining seeds: the held-out scores of several demo runs, before and after DPO.

    for s in 0 1 2; do python -m recipes.shapes --seed $s --out runs/demo-s$s; done
    python bench/demo_seeds.py runs/demo-s0 runs/demo-s1 runs/demo-s2

Each run's `scores.json` holds its pretrained and DPO models' GenEval summaries (120 held-out prompts x 4 sample
seeds by default). With --geneval, each argument is instead BEFORE:AFTER, two `lightgen geneval` output folders
scored by `lightgen shapes score` (e.g. one model on validation prompts before and after a DPO variant, or a
baseline and a recipe lever on the same prompts); its rows are then labelled "before" / "after":

    python bench/demo_seeds.py --geneval runs/val/pre-s0:runs/val/jl100-s0 runs/val/pre-s1:runs/val/jl100-s1

Printed: per run and category the score after pretraining, after DPO and the change; then the mean and standard
deviation of each over the runs (the spread over pretraining seeds, with the sample seeds averaged inside each run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")


def accuracies(summary: dict) -> dict[str, float]:
    """{category: accuracy, "overall": x} of a GenEval summary."""
    return {t: v["accuracy"] for t, v in summary["tasks"].items()} | {"overall": summary["overall"]}


def scores(run: Path) -> dict[str, dict[str, float]]:
    """{"pretrain": {category: accuracy, "overall": x}, "dpo": {...}} of one demo run."""
    doc = json.loads((run / "scores.json").read_text())
    return {which: accuracies(doc["models"][which]["summary"]) for which in ("pretrain", "dpo")}


def geneval_pair(spec: str) -> tuple[str, dict[str, dict[str, float]]]:
    """(name, scores) of a BEFORE:AFTER pair of scored `lightgen geneval` folders."""
    before, _, after = spec.partition(":")
    out = {}
    for which, folder in (("pretrain", before), ("dpo", after)):
        path = Path(folder) / "scores.json"
        if not folder or not path.is_file():
            raise SystemExit(f"usage: --geneval BEFORE:AFTER, two scored geneval folders; no {path} in {spec!r}")
        out[which] = accuracies(json.loads(path.read_text())["summary"])
    return after, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="demo output folders (each with scores.json), or BEFORE:AFTER pairs")
    p.add_argument("--geneval", action="store_true", help="the arguments are BEFORE:AFTER geneval folder pairs")
    args = p.parse_args(argv)
    if args.geneval:
        rows = dict(geneval_pair(spec) for spec in args.runs)
    else:
        for run in map(Path, args.runs):
            if not (run / "scores.json").is_file():
                p.error(f"{run}: no scores.json (a demo run that has not finished?)")
        rows = {Path(run).name: scores(Path(run)) for run in args.runs}
    first, second = ("before", "after") if args.geneval else ("pretrain", "dpo")
    width = max(14, *(len(name) + 2 for name in rows))
    print(f"{'run':{width}}{'model':10}" + "".join(f"{c[:8]:>10}" for c in CATEGORIES))
    deltas: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    before: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    after: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for name, s in rows.items():
        for c in CATEGORIES:
            before[c].append(s["pretrain"].get(c, 0.0))
            after[c].append(s["dpo"].get(c, 0.0))
            deltas[c].append(after[c][-1] - before[c][-1])
        print(f"{name:{width}}{first:10}" + "".join(f"{s['pretrain'].get(c, 0.0):>10.3f}" for c in CATEGORIES))
        print(f"{'':{width}}{second:10}" + "".join(f"{s['dpo'].get(c, 0.0):>10.3f}" for c in CATEGORIES))
    n = len(rows)
    for label, values in ((first, before), (second, after), ("change", deltas)):
        mean = "".join(f"{statistics.mean(values[c]):>10.3f}" for c in CATEGORIES)
        std = "".join(f"{(statistics.stdev(values[c]) if n > 1 else 0.0):>10.3f}" for c in CATEGORIES)
        print(f"{'mean of ' + str(n):{width}}{label:10}{mean}\n{'std':{width}}{label:10}{std}")


if __name__ == "__main__":
    main()
