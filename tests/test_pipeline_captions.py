"""`build-captions`: sources, filters and de-duplication with exact counts, selection, the diversity report, CLI."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.caption_sources import plan_reads, read_captions, read_task
from pipeline.stages.captions import diversity as dv
from pipeline.stages.captions.build import CaptionsConfig, CaptionsStage, caption_id

NEAR_A = "a big blue square on the left side of a green triangle"
NEAR_B = NEAR_A + " today"  # 11 of 12 word bigrams shared: Jaccard 11/12
FAR = "a big blue square on the right side of a red circle"  # Jaccard 7/15 with NEAR_A: kept


def write_sources(root: Path) -> tuple[list[Path], dict[str, int]]:
    """One file of each kind with known problems -> (paths, expected removals by reason, before selection)."""
    jsonl = root / "a.jsonl"
    lines = [
        {"caption": "a red circle"},
        {"caption": "A  red\tcircle"},  # exact duplicate after normalisation
        {"caption": "a red circle!"},  # exact duplicate: punctuation and case do not count
        {"caption": "   "},  # empty
        {"text": "no caption field"},  # missing_field
        {"caption": 42},  # bad_record
        {"caption": NEAR_A},
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")  # + a bad_json line
    with open(root / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["caption", "other"], [NEAR_B, 1], [FAR, 2], ["x", 3], [" ".join(["word"] * 30), 4]])
    pq.write_table(pa.table({"caption": ["красный круг", "a blue circle", "a red square"]}), root / "c.parquet")
    with tarfile.open(root / "d.tar", "w") as tf:
        for key, cap in [("k0", "a red square"), ("k1", "two green crosses")]:  # k0: exact dup of c.parquet
            data = json.dumps({"caption": cap}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    expected = {"empty": 1, "missing_field": 1, "bad_record": 1, "bad_json": 1, "exact_dup": 3, "near_dup": 1}
    expected |= {"too_short": 1, "too_long": 1, "bad_charset": 1}
    return [jsonl, root / "b.csv", root / "c.parquet", root / "d.tar"], expected


def cfg(tmp_path: Path, inputs, **kw) -> CaptionsConfig:
    base = dict(embedder="hash", clusters=2, min_words=2, max_words=20, charset="latin", n=100)
    return CaptionsConfig([str(p) for p in inputs], str(tmp_path / "out"), **{**base, **kw})


def test_filters_and_duplicates_exact_counts(tmp_path):
    srcs, expected = write_sources(tmp_path)
    report = CaptionsStage.run(cfg(tmp_path, srcs))
    kept = ["a red circle", NEAR_A, FAR, "a blue circle", "a red square", "two green crosses"]
    assert report["removed_by_reason"] == expected
    assert (report["inputs"], report["kept"], report["removed"]) == (17, len(kept), 11)
    assert report["duplicates_removed"] == 4
    out = tmp_path / "out"
    t = pq.read_table(out / "part-00000.parquet")
    assert t.column("caption").to_pylist() == kept  # input order, normalised
    assert t.column("id").to_pylist() == [caption_id(c) for c in kept]
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(rej) == 11 and sum(r["reason"] == "exact_dup" for r in rej) == 3
    near = next(r for r in rej if r["reason"] == "near_dup")
    assert near["id"] == caption_id(NEAR_B) and near["detail"].startswith(f"~ {caption_id(NEAR_A)} (jaccard 0.917)")
    assert [r["source"] for r in rej if r["reason"] in ("bad_record", "bad_json")] == ["a.jsonl:6", "a.jsonl:8"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and (manifest["rows"], manifest["rejected"], manifest["inputs"]) == (6, 11, 17)
    assert manifest["config"]["shard_size"] == 100_000 and "progress" not in manifest["config"]  # no unused options
    # Selecting 2 of the 6 adds exactly 4 not_selected; counts still add up.
    again = CaptionsStage.run(cfg(tmp_path, srcs, n=2, overwrite=True))
    assert again["kept"] == 2 and again["removed_by_reason"] == {**expected, "not_selected": 4}
    assert again["inputs"] == again["kept"] + again["removed"] == 17
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        CaptionsStage.run(cfg(tmp_path, srcs, n=3))


def test_near_duplicate_rules_keep_first_and_details(tmp_path):
    """Word-bigram Jaccard >= --near-dup-threshold, or one word apart (inserted / deleted: >= --near-dup-edit-words
    words; changed: >= --near-dup-change-words); a caption goes only when a kept earlier caption is its near
    duplicate, never through a chain (connected components removed 0.13 % of distinct captions that way)."""
    variant = NEAR_A.replace("green", "red")  # bigrams: 9 / 13 shared with NEAR_A, one word apart
    chain = variant.replace("big", "small")  # one word from `variant`, two from NEAR_A (Jaccard 7 / 15)
    guitar, helicopter = "a photo of a golden guitar", "a photo of a golden helicopter"  # Jaccard 4 / 6
    short = "a photo of a golden"  # Jaccard 4 / 5 with both: it joined them into one component
    texts = [NEAR_A, NEAR_B, FAR, variant, chain, "a red circle", "a blue circle", guitar, helicopter, short]
    src = tmp_path / "near.jsonl"
    src.write_text("".join(json.dumps({"caption": t}) + "\n" for t in texts))

    def near(**kw) -> dict[str, str]:
        CaptionsStage.run(CaptionsConfig([str(src)], str(tmp_path / "o"), embedder="hash", overwrite=True, **kw))
        rej = pq.read_table(tmp_path / "o" / "rejects.parquet").to_pylist()
        return {r["detail"].split(": ", 1)[1]: r["detail"].split(": ", 1)[0] for r in rej if r["reason"] == "near_dup"}

    got = near()  # defaults: Jaccard 0.8; a word inserted / deleted at >= 8 words, changed at >= 12 words
    assert got == {
        NEAR_B: f"~ {caption_id(NEAR_A)} (jaccard 0.917) one word apart",
        variant: f"~ {caption_id(NEAR_A)} (jaccard 0.692) one word apart",  # 12 words: a change counts
        short: f"~ {caption_id(guitar)} (jaccard 0.800) one word apart",  # 5 words: by the Jaccard rule
    }  # `chain` and `helicopter` stay: no kept caption is their near duplicate
    assert set(near(near_dup_change_words=13)) == {NEAR_B, short}  # 3- and 6-word captions one word apart stay
    assert set(near(near_dup_edit_words=13, near_dup_change_words=13)) == {NEAR_B, short}  # the Jaccard rule alone
    jaccard_06 = near(near_dup_edit_words=0, near_dup_change_words=0, near_dup_threshold=0.6)
    assert set(jaccard_06) == {*got, helicopter}  # 4 / 6 >= 0.6
    assert near(near_dup=False) == {}


def test_bad_rows_become_rejects(tmp_path):
    """Unparseable, non-UTF-8 and field-less rows of every format are rejects with a reason, never fatal."""
    (tmp_path / "a.jsonl").write_bytes(b'{"caption": "a red circle"}\n\xff{"caption": "x"}\n{"caption": "ok"\n\n')
    (tmp_path / "b.csv").write_bytes(b"caption,other\nred square,1\n\xff\xfe blue,2\n")
    pq.write_table(
        pa.table({"caption": pa.array([b"green cross", b"\xff\xfe", None], pa.binary())}), tmp_path / "c.parquet"
    )
    report = CaptionsStage.run(cfg(tmp_path, [tmp_path / f for f in ("a.jsonl", "b.csv", "c.parquet")], min_words=1))
    assert report["removed_by_reason"] == {"bad_json": 1, "bad_utf8": 3, "missing_field": 1}
    assert (report["inputs"], report["kept"]) == (8, 3)
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [(r["source"], r["reason"]) for r in rej] == [
        ("a.jsonl:2", "bad_utf8"),
        ("a.jsonl:3", "bad_json"),
        ("b.csv:3", "bad_utf8"),
        ("c.parquet:1", "bad_utf8"),
        ("c.parquet:2", "missing_field"),
    ]


def test_jsonl_is_read_in_chunks_with_line_numbers(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text(
        "".join(
            json.dumps({"caption": f"caption number {i}"}) + "\n" + ("\n" if i % 7 == 0 else "") for i in range(500)
        )
    )
    tasks = plan_reads([src], "caption", chunk_bytes=1000)
    assert (
        len(tasks) > 10
        and tasks[0].start == 0
        and all(a.stop == b.start for a, b in zip(tasks, tasks[1:], strict=False))
    )
    records = [r for t in tasks for batch in read_task(t, "caption", batch_rows=7) for r in batch]
    assert [r.caption for r in records] == [f"caption number {i}" for i in range(500)]
    assert [r.ref for r in records] == [r.ref for r in read_captions([src])]
    assert records[8].ref == "big.jsonl:11"  # line numbers count the blank lines


def test_normalize_batch_equals_the_per_caption_functions():
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["é", "ß", "ﬁ", "\u200b", "\xa0", "Ω"] + [" "] * 20
    caps = [None, "", "  Hello,   World!!  ", "\x00\x1fA_b-C", "Straße"]
    caps += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts, keys, n_words = dv.normalize_batch(caps)
    for c, t, k, n in zip(caps[1:], texts[1:], keys[1:], n_words[1:], strict=True):
        assert (t, k, n) == (dv.normalize(c), " ".join(dv.words(dv.normalize(c))), len(dv.words(dv.normalize(c))))
    assert (texts[0], keys[0], n_words[0]) == ("", "", 0)


def test_diversity_numbers_on_a_hand_made_set():
    texts = ["a red circle", "a red square", "a blue circle"]
    assert dv.distinct_ngrams(texts, 1) == pytest.approx(5 / 9)
    assert dv.distinct_ngrams(texts, 2) == pytest.approx(5 / 6)
    assert dv.distinct_ngrams(texts, 3) == 1.0
    e = np.eye(3, dtype=np.float32)
    assert dv.mean_pairwise_distance(e) == pytest.approx(1.0)
    assert dv.mean_pairwise_distance(np.stack([e[0], e[0], e[1]])) == pytest.approx(2 / 3)
    assert dv.coverage_radius(e, e[:1]) == pytest.approx(2 / 3)
    assert dv.cluster_entropy(np.array([2, 2])) == pytest.approx(1.0) and dv.cluster_entropy(np.array([4, 0])) == 0
    labels = np.array([0, 0, 0, 0, 1, 2])
    assert sorted(labels[dv.select_clusters(labels, 3, seed=0)]) == [0, 1, 2]
    assert np.bincount(labels[dv.select_clusters(labels, 5, seed=1)]).tolist() == [3, 1, 1]
    x = dv.l2_normalize(np.array([[1, 0], [0.99, 0.1], [0.98, -0.1], [-1, 0]], np.float32))
    assert all(3 in dv.select_farthest(x, 2, seed=s) for s in range(5))  # the outlier is always taken


def test_report_on_a_hand_made_set(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"caption": c}) for c in ["a red circle", "a red square", "a blue circle"]))
    report = CaptionsStage.run(CaptionsConfig([str(src)], str(tmp_path / "o"), n=3, embedder="hash", clusters=2))
    sel = report["diversity"]["selected"]
    assert (sel["captions"], sel["distinct_1"], sel["distinct_2"], sel["distinct_3"]) == (3, 0.5556, 0.8333, 1.0)
    assert sum(sel["cluster_histogram"]) == 3 and sel["clusters_hit"] == 2
    x = dv.hash_embed(["a red circle", "a red square", "a blue circle"])
    assert sel["mean_pairwise_distance"] == round(dv.mean_pairwise_distance(x), 4)
    assert sel["coverage_radius"] == 0.0  # everything selected covers the pool exactly
    assert json.loads((tmp_path / "o" / "diversity.json").read_text()) == report["diversity"]


def test_shapes_source_and_selection_beats_random(tmp_path):
    report = CaptionsStage.run(
        CaptionsConfig([], str(tmp_path / "o"), n=60, shapes=600, embedder="hash", clusters=12, seed=3)
    )
    assert report["inputs"] == 600 and report["kept"] == 60
    assert report["inputs"] == report["kept"] + report["removed"]
    t = pq.read_table(tmp_path / "o" / "part-00000.parquet")
    metas = [json.loads(m) for m in t.column("metadata").to_pylist()]
    assert all(m["tag"] and m["include"] and "caption" not in m for m in metas)
    div = report["diversity"]
    assert div["selected"]["clusters_hit"] == 12 and div["selected"]["cluster_entropy"] > 0.99
    assert div["selected"]["cluster_entropy"] > div["random_baseline"]["cluster_entropy"]
    # Shapes records read back with their metadata (build-captions output is a valid input).
    back = read_captions([tmp_path / "o"])
    assert [r.caption for r in back] == t.column("caption").to_pylist() and all(r.metadata for r in back)


def test_farthest_and_random_selection_and_kmeans_on_a_sample(tmp_path, monkeypatch):
    """farthest: greedy k-center on the pool (on a sample of FARTHEST_POOL, the rest at random beyond it); random;
    k-means fitted on --kmeans-sample captions still labels every caption."""
    import pipeline.stages.captions.build as captions

    def run(**kw) -> dict:
        cfg = CaptionsConfig([], str(tmp_path / "o"), shapes=400, embedder="hash", clusters=6, overwrite=True, **kw)
        report = CaptionsStage.run(cfg)
        clusters = pq.read_table(tmp_path / "o" / "part-00000.parquet").column("cluster").to_pylist()
        assert report["inputs"] == report["kept"] + report["removed"] and all(0 <= c < 6 for c in clusters)
        return report

    pool = run(n=10_000)["kept"]
    far, rnd = run(n=30, select="farthest"), run(n=30, select="random")
    assert far["kept"] == rnd["kept"] == 30 and far["removed_by_reason"]["not_selected"] == pool - 30
    assert (
        far["diversity"]["selected"]["mean_pairwise_distance"] > rnd["diversity"]["selected"]["mean_pairwise_distance"]
    )
    monkeypatch.setattr(captions, "FARTHEST_POOL", 20)
    assert run(n=30, select="farthest")["kept"] == 30  # 20 farthest of a 20-sample + 10 at random
    sampled = run(n=50, kmeans_sample=40)
    assert sampled["kept"] == 50 and sum(sampled["diversity"]["pool"]["cluster_histogram"]) == pool


runner = CliRunner()


def test_cli_build_captions_and_errors(tmp_path):
    srcs, _ = write_sources(tmp_path)
    out = tmp_path / "cli"
    args = ["build-captions", "--output", str(out), "--embedder", "hash", "--clusters", "2", "--n", "4"]
    result = runner.invoke(app, [*args, "--input", str(srcs[0]), "--input", str(srcs[2])])
    assert result.exit_code == 0, result.output
    assert "distinct_2" in result.output and "not_selected" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["kept"] == 4
    (tmp_path / "blank.jsonl").write_text(json.dumps({"caption": " "}) + "\n")
    for bad, message in [
        (["--input", str(tmp_path / "missing.jsonl")], "does not exist: .*missing.jsonl"),
        (["--input", str(srcs[2]), "--field", "prompt"], "unknown --field 'prompt'"),
        (["--input", str(srcs[0]), "--field", "prompt"], "unknown --field 'prompt'"),
        (["--input", str(tmp_path / "blank.jsonl")], "no captions left after cleaning 1 inputs"),
        ([], "no captions: give --input"),
        (["--input", str(srcs[0]), "--select", "best"], "unknown --select 'best'"),
    ]:
        result = runner.invoke(app, ["build-captions", *bad, "--output", str(tmp_path / "o")])
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1, result.output
    help_text = runner.invoke(app, ["build-captions", "--help"], terminal_width=200).output
    for option in [
        "--input",
        "--output",
        "--n ",
        "--field",
        "--shapes",
        "--min-words",
        "--max-words",
        "--charset",
        "--near-dup-thresh",
        "--ngram",
        "--embedder",
        "--select",
        "--clusters",
        "--workers",
        "--seed",
    ]:
        assert option in help_text
    assert "[default: cluster]" in help_text and "[default: 0.8]" in help_text


def _upload(local: Path, uri: str) -> None:
    """Copy a local file to a URI."""
    from pipeline.core import storage

    fs, path = storage.resolve(uri)
    with fs.open_output_stream(path) as f:
        f.write(local.read_bytes())


def test_s3_output_and_inputs_equal_a_local_run(tmp_path, s3_bucket):
    """build-captions publishes through the runner's writer to any filesystem: to `s3://` (moto's S3 server) the
    caption shards are the same bytes (sha256 in the manifest) as on the local disk, and caption files read from
    `s3://` (JSONL, CSV, Parquet, tar; a caption-shard folder) give the same rows as read locally."""
    from pipeline.core import storage

    kw = dict(n=100, shapes=600, embedder="hash", clusters=4, shard_size=40)
    local = CaptionsStage.run(CaptionsConfig([], str(tmp_path / "local"), **kw))
    out = f"{s3_bucket}/captions"
    remote = CaptionsStage.run(CaptionsConfig([], out, **kw))
    manifest = lambda m: {k: v for k, v in m.items() if k not in ("config", "code_version")}
    m_local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    m_s3 = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert manifest(m_s3) == manifest(m_local) and m_s3["n_shards"] == 3 and m_s3["complete"]
    assert m_s3["config"]["output"] == out and remote["kept"] == local["kept"] == 100
    for name in ("rejects.parquet", "diversity.json", "part-00002.parquet"):
        assert storage.read_bytes(f"{out}/{name}") == (tmp_path / "local" / name).read_bytes()
    assert [r.caption for r in read_captions([out])] == [r.caption for r in read_captions([tmp_path / "local"])]
    assert not any(".build-captions-work" in n for n in storage.Storage(out).list())  # scratch stays local
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        CaptionsStage.run(CaptionsConfig([], out, **{**kw, "n": 90}))
    # Inputs on S3: the same rows but the `source` column (where each file lives), the same rejects.
    srcs, _ = write_sources(tmp_path)
    for p in srcs:
        _upload(p, f"{s3_bucket}/src/{p.name}")
    a = CaptionsStage.run(cfg(tmp_path / "s3", [f"{s3_bucket}/src"], n=4))  # -> tmp_path / "s3" / "out"
    b = CaptionsStage.run(cfg(tmp_path, srcs, n=4))
    rows = lambda o: pq.read_table(o / "part-00000.parquet").drop_columns(["source"]).to_pylist()
    assert rows(tmp_path / "s3" / "out") == rows(tmp_path / "out") and a["removed_by_reason"] == b["removed_by_reason"]
    rejects = lambda o: pq.read_table(o / "rejects.parquet").to_pylist()  # sources there are file:row
    assert rejects(tmp_path / "s3" / "out") == rejects(tmp_path / "out") and len(rejects(tmp_path / "out")) == 13
    sources = pq.read_table(tmp_path / "s3" / "out" / "part-00000.parquet").column("source").to_pylist()
    assert all(s.startswith(f"{s3_bucket}/src/") for s in sources)
