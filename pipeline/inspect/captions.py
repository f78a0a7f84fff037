"""The build-captions part of `lightgen-data inspect`: the diversity report as plots, samples per cluster, and the
near-duplicate groups (what was kept, what was removed as its duplicate, and why)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.inspect.html import bar_chart, cells, esc, table, tag
from pipeline.inspect.read import (
    DEDUP_REASONS,
    RejectSample,
    StageDir,
    diversity,
    dup_groups,
    lookup_captions,
    parse_dup,
    read_sampled_rows,
    scan_column,
)

SETS = ("pool", "selected", "random_baseline")  # diversity.json's caption sets, in plot order
MEMBERS_PER_GROUP = 8


def captions_sections(stage: StageDir, rejects: RejectSample, limit: int, seed: int) -> str:
    """Diversity plots, a seeded sample per cluster and the near-duplicate groups of a caption folder."""
    return diversity_section(diversity(stage)) + cluster_section(stage, limit, seed) + dup_section(stage, rejects, seed)


def diversity_section(report: dict[str, Any]) -> str:
    """diversity.json as a cluster histogram, distinct-n bars and a table of every number."""
    sets = {name: report[name] for name in SETS if isinstance(report.get(name), dict)}
    if not sets:
        return tag("h2", "Diversity") + tag("p", "no diversity.json in this folder", class_="muted")
    k = max((len(s.get("cluster_histogram") or []) for s in sets.values()), default=0)
    hist = {n: s["cluster_histogram"] for n, s in sets.items() if len(s.get("cluster_histogram") or []) == k}
    plots = bar_chart(hist, [str(i) for i in range(k)], "captions per cluster", data_plot="clusters") if k else ""
    grams = [f"distinct_{n}" for n in (1, 2, 3)]
    distinct = {n: [float(s.get(g, 0.0)) for g in grams] for n, s in sets.items()}
    plots += bar_chart(distinct, ["distinct-1", "distinct-2", "distinct-3"], "distinct n-grams", data_plot="distinct")
    keys = [key for key in next(iter(sets.values())) if not isinstance(next(iter(sets.values()))[key], list)]
    rows = [cells([key, *(sets[n].get(key, "") for n in sets)]) for key in keys]
    return tag("h2", "Diversity") + tag("div", plots, class_="plots") + table(["metric", *sets], rows)


def cluster_section(stage: StageDir, limit: int, seed: int) -> str:
    """A seeded sample of kept captions per cluster (the cluster column of a bounded set of shards is read)."""
    index, scanned = scan_column(stage, "cluster", seed)
    clusters = index.column("cluster").to_numpy(zero_copy_only=False)
    labels, counts = np.unique(clusters, return_counts=True)
    t = read_sampled_rows(
        stage, pick_per_cluster(index, limit, seed), ["id", "caption", "source", "metadata", "cluster"]
    )
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for row in t.to_pylist():
        by_cluster.setdefault(row["cluster"], []).append(row)
    note = f"{scanned} captions in {len(labels)} clusters read"
    parts = [tag("h2", "Captions by cluster"), tag("p", note, class_="muted")]
    for c, n in zip(labels.tolist(), counts.tolist(), strict=True):
        rows = by_cluster.get(c, [])
        head = tag("h3", f"cluster {c}: {n} captions, {len(rows)} shown")
        items = tag("ul", "".join(caption_li(r) for r in rows))
        parts.append(tag("section", head + items, class_="cluster", data_cluster=c, data_count=n))
    return "".join(parts)


def pick_per_cluster(index: Any, limit: int, seed: int) -> dict[int, list[int]]:
    """{shard: sorted rows} of about `limit` captions, the same number from every cluster (seeded)."""
    clusters = index.column("cluster").to_numpy(zero_copy_only=False)
    shard, row = (index.column(c).to_numpy() for c in ("shard", "row"))
    labels = np.unique(clusters)
    per = max(1, -(-limit // max(1, len(labels))))
    rng = np.random.default_rng(seed)
    picks: dict[int, list[int]] = {}
    for c in labels.tolist():
        members = np.flatnonzero(clusters == c)
        for r in rng.choice(members, size=min(per, len(members)), replace=False).tolist():
            picks.setdefault(int(shard[r]), []).append(int(row[r]))
    return {s: sorted(rows) for s, rows in picks.items()}


def caption_li(row: dict[str, Any]) -> str:
    """One sampled caption as a list item; its id, source and metadata on hover."""
    meta = row.get("metadata") or ""
    title = f"id {row['id']}\nsource {row['source']}" + (f"\n{json.dumps(json.loads(meta), indent=1)}" if meta else "")
    return tag("li", esc(row["caption"]), class_="sample", data_id=row["id"], title=title)


def dup_section(stage: StageDir, rejects: RejectSample, seed: int) -> str:
    """Near-/exact-duplicate groups around sampled removals: the kept caption, each removal and its reason."""
    kept_ids: list[str] = []
    for reason in reversed(DEDUP_REASONS):  # near duplicates first: they are the interesting ones
        for row in rejects.examples.get(reason, []):
            dup = parse_dup(row["detail"])
            if dup and dup["kept"] not in kept_ids:
                kept_ids.append(dup["kept"])
    head = tag("h2", "Duplicate groups")
    if not kept_ids:
        return head + tag("p", "no exact or near duplicates were removed", class_="muted")
    groups = dup_groups(stage, kept_ids, MEMBERS_PER_GROUP)
    kept = lookup_captions(stage, kept_ids, seed)
    note = tag("p", f"{len(kept_ids)} groups around a random sample of the removed duplicates", class_="muted")
    return head + note + "".join(group_html(k, kept.get(k), groups[k]) for k in kept_ids)


def group_html(kept_id: str, kept: dict[str, Any] | None, group: dict[str, Any]) -> str:
    """One duplicate group: the kept caption (and what became of it), then the removed rows and why."""
    if kept is None:
        first = tag("span", "(not among the shards read)", class_="muted")
    else:
        fate = (
            f"kept, cluster {kept['cluster']}"
            if kept["status"] == "kept"
            else f"survived de-duplication, then {kept['status']}"
        )
        first = tag("span", esc(kept["caption"]), class_="kept") + tag("span", f" [{esc(fate)}]", class_="muted")
    items = []
    for row in group["members"]:
        dup = parse_dup(row["detail"]) or {"why": "", "text": row["detail"]}
        why = row["reason"] + (f" {dup['why']}" if dup["why"] else "")
        body = tag("span", esc(dup["text"]), class_="removed") + tag(
            "span", f" ({why}; {row['source']})", class_="muted"
        )
        items.append(tag("li", body, class_="dup", data_id=row["id"], data_reason=row["reason"]))
    more = group["size"] - len(group["members"])
    if more > 0:
        items.append(tag("li", f"... and {more} more", class_="muted"))
    head = tag("div", tag("b", "kept ") + esc(kept_id) + ": " + first)
    return tag("div", head + tag("ul", "".join(items)), class_="dupgroup", data_kept=kept_id, data_size=group["size"])
