"""`lightgen-data inspect`: one self-contained HTML page that shows a finished stage output.

The stage is found from the folder's manifest (`format`) among the registered stages (`pipeline.stages.registry`):
caption shards (build-captions), image shards (synthesize), training shards (encode-latents), DPO pair shards
(build-dpo-pairs, with its `judgements/`), the judgement shards alone, or a stage registered later. Every page has a
header (stage, code version, config digest, counts in = written + rejected, rejects by reason, sizes), the stage's
own samples and plots (`Stage.inspect_sections`), and the rejects by reason with examples.

Sampling is seeded (`seed`) and bounded (`limit` rows per section): only the shards and row groups holding the
sampled rows are read (see `pipeline/inspect/read.py`). Count elements carry `data-count` attributes and every
sampled row a `data-id`, so the page can be checked by a program as well as read.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

from pipeline.core import storage
from pipeline.inspect.html import cells, esc, page, table, tag
from pipeline.inspect.read import InspectError, RejectSample, StageDir, open_stage, sample_rejects
from pipeline.stages import registry

EXAMPLES_PER_REASON = 5
__all__ = ["InspectError", "default_output", "inspect_dataset"]


def default_output(directory: str | Path) -> Path:
    """`<DIR>-inspect.html` beside the folder (not inside it: a stage output folder may be another stage's input);
    for a URI, in the current folder."""
    if storage.is_uri(str(directory)):
        return Path(f"{posixpath.basename(str(directory).rstrip('/')) or 'output'}-inspect.html").resolve()
    d = Path(directory).resolve()
    return d.parent / f"{d.name}-inspect.html"


def inspect_dataset(
    directory: str | Path, out: str | Path | None = None, limit: int = 48, seed: int = 0, vae: str | None = None
) -> Path:
    """Write the inspection page of the stage output in `directory` to `out`; returns its path."""
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    stage = open_stage(directory, registry.formats())
    rejects = sample_rejects(stage, max(EXAMPLES_PER_REASON, limit // 4), seed)
    sections = registry.by_format(stage.manifest["format"]).inspect_sections(stage, rejects, limit, seed, vae)
    body = header(stage, rejects, limit, seed) + sections
    body += rejects_section(rejects)
    fmt = stage.manifest["format"]
    doc = page(f"inspect {stage.name} ({fmt})", body, data_format=fmt, data_stage=stage.manifest.get("stage"))
    path = Path(out) if out else default_output(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)
    return path


def header(stage: StageDir, rejects: RejectSample, limit: int, seed: int) -> str:
    """Stage, versions, counts (in = written + rejected), rejects by reason, sizes, sampling settings."""
    m = stage.manifest
    count = lambda key, value: tag("span", esc(value), data_field=key, data_count=value)
    counts = f"{count('inputs', m.get('inputs'))} in = {count('written', m.get('rows'))} written + "
    counts += f"{count('rejected', m.get('rejected'))} rejected"
    by_reason = ", ".join(
        f"{esc(r)} {tag('span', n, data_reason_count=r)}"
        for r, n in sorted(rejects.counts.items(), key=lambda x: -x[1])
    )
    size = sum(int(s.get("bytes", 0)) for s in m.get("shards", []))
    items = [
        ("stage", esc(m.get("stage", "?")) + f" ({esc(m['format'])}, schema {esc(m.get('schema_version'))})"),
        ("folder", esc(stage.where)),
        ("code version", esc(m.get("code_version", "?"))),
        ("config digest", tag("code", esc(m.get("config_digest", "?")))),
        ("counts", counts + consistency(stage, rejects)),
        ("rejects by reason", by_reason or "none"),
        ("size", f"{count('shards', len(stage.shards))} shards, {tag('span', human_bytes(size), data_bytes=size)}"),
        ("encoders / settings", esc(settings_line(m)) or "-"),
        ("sampled", f"up to {limit} rows per section, seed {seed}"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    config = tag("details", tag("summary", "resolved config") + tag("pre", esc(config_text(m))))
    return (
        tag("h1", f"{esc(m.get('stage', '?'))}: {esc(stage.name)}")
        + tag("dl", dl, class_="counts", id="counts")
        + config
    )


def consistency(stage: StageDir, rejects: RejectSample) -> str:
    """A warning when the manifest's counts do not add up or disagree with the rejects file."""
    m = stage.manifest
    problems = []
    if m.get("inputs") != (m.get("rows") or 0) + (m.get("rejected") or 0):
        problems.append("inputs != written + rejected")
    if sum(rejects.counts.values()) != m.get("rejected"):
        problems.append(f"rejects.parquet holds {sum(rejects.counts.values())} rows")
    return tag("b", esc(" (" + "; ".join(problems) + ")"), class_="removed") if problems else ""


def settings_line(m: dict) -> str:
    """The manifest's stage-specific scalar fields (teacher, encoders, judge, resolution...) on one line."""
    skip = {
        "format",
        "schema_version",
        "stage",
        "code_version",
        "config_digest",
        "n_shards",
        "complete",
        "rows",
        "rejected",
        "inputs",
        "rows_per_shard",
        "shards",
        "config",
        "sampling",
    }
    return ", ".join(f"{k} {v}" for k, v in m.items() if k not in skip and not isinstance(v, dict))


def config_text(m: dict) -> str:
    """The resolved config of the manifest as indented JSON."""
    return json.dumps(m.get("config", {}), indent=1, sort_keys=True)


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def rejects_section(rejects: RejectSample) -> str:
    """The rejects by reason, with random example rows (id, source, detail) of each."""
    if not rejects.counts:
        return tag("h2", "Rejects") + tag("p", "none", class_="muted")
    rows = []
    for reason, n in sorted(rejects.counts.items(), key=lambda x: -x[1]):
        rows.append(
            tag(
                "tr",
                tag("th", esc(reason)) + tag("th", n) + "<th></th>",
                class_="reason",
                data_reason=reason,
                data_count=n,
            )
        )
        for r in rejects.examples.get(reason, [])[:EXAMPLES_PER_REASON]:
            detail = r["detail"] if len(r["detail"]) <= 400 else r["detail"][:400] + "..."
            rows.append(cells([r["id"], r["source"], detail], class_="reject", data_reason=reason, data_id=r["id"]))
    return tag("h2", "Rejects by reason") + table(["id", "source", "detail"], rows)
