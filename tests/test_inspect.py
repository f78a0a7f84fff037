"""`lightgen-data inspect` on a reduced real chain (build-captions -> synthesize -> encode-latents ->
build-dpo-pairs, with rejects at every stage): each page's counts against its manifest, sampled ids that exist,
rejects by reason, decoded images equal to the teacher's, no external reference, seeded sampling that reads only
the shards it needs, clear errors, the demo's links, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import wake_head
from PIL import Image
from tiny_models import make_tiny_vae, png_bytes, write_tar
from typer.testing import CliRunner

from lightgen_model import LightGen, preset, save_pretrained
from pipeline.cli import app
from pipeline.core.schema import moments_array
from pipeline.inspect.read import sample_positions
from pipeline.stages.captions.build import CaptionsConfig, CaptionsStage, caption_id
from pipeline.stages.dpo_pairs.pairs import PairsConfig, PairsStage
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage
from pipeline.stages.synthesize import SynthConfig, SynthStage
from recipes.shapes import cli as demo_cli
from recipes.shapes.commands import tool
from recipes.shapes.demo import Demo
from recipes.shapes.report import INSPECT_PAGES, inspect_links
from recipes.shapes.steps import StepRunner
from shapesworld.render import ShapesTeacher
from shapesworld.world import enumerate_scenes

NEAR_A = "a big blue square on the left side of a green triangle"
NEAR_B = NEAR_A + " today"  # one word apart: a near duplicate of NEAR_A
XSS = '<script>alert("x")</script> & <b>a red circle</b>'  # captions are user data: shown escaped
STAGES = {
    "captions": "captions",
    "images": "images",
    "latents": "latents",
    "pairs": "pairs",
    "judgements": "pairs/judgements",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bad_inputs(root: Path) -> tuple[Path, Path]:
    """A tar encode-latents rejects (undecodable image, missing caption) and one for build-dpo-pairs: noise the judge
    rejects (kept=false), an undecodable image rejected before the judge."""
    scene = enumerate_scenes("colors")[0]
    caption = lambda meta=None: json.dumps({"caption": scene["prompt"], **({"metadata": meta} if meta else {})})
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = png_bytes(ShapesTeacher(32)(scene, 1))
    enc = write_tar(
        root / "bad-latents.tar",
        [("broken.png", b"not a png"), ("broken.json", caption().encode()), ("nocap.png", good), ("nocap.json", b"{}")],
    )
    dpo = write_tar(
        root / "bad-judge.tar",
        [
            ("noise.png", png_bytes(noise)),
            ("noise.json", caption(scene).encode()),
            ("broken.png", b"not a png"),
            ("broken.json", caption(scene).encode()),
        ],
    )
    return enc, dpo


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """The reduced chain's outputs under one folder: captions, images, latents, pairs (+ pairs/judgements)."""
    root = tmp_path_factory.mktemp("chain")
    extra = root / "extra.jsonl"
    lines = [NEAR_A, NEAR_B, XSS, XSS, "", "a small red circle"]
    extra.write_text("\n".join(json.dumps({"caption": c}) for c in lines) + "\n{not json\n")
    CaptionsStage.run(
        CaptionsConfig(
            [str(extra)],
            str(root / "captions"),
            n=24,
            shapes=60,
            shapes_diversity=0.3,
            embedder="hash",
            clusters=4,
            seed=1,
        )
    )
    SynthStage.run(
        SynthConfig(
            [str(root / "captions")],
            str(root / "images"),
            teacher="shapes",
            resolution=32,
            shard_size=8,
            workers=0,
            progress=False,
        )
    )
    enc_bad, dpo_bad = bad_inputs(root)
    EncodeStage.run(
        EncodeConfig(
            [str(root / "images"), str(enc_bad)], str(root / "latents"), resolution=32, workers=0, progress=False
        )
    )
    torch.manual_seed(0)
    ckpt = save_pretrained(wake_head(LightGen(preset("debug"))), root / "ckpt")
    PairsStage.run(
        PairsConfig(
            [str(root / "images"), str(dpo_bad)],
            str(root / "pairs"),
            model=str(ckpt),
            judge_backend="shapes",
            steps=2,
            workers=0,
            batch_size=8,
            progress=False,
        )
    )
    return root


# ------------------------------------------------------------------------------------------------ helpers


class Page(HTMLParser):
    """The elements of a page as (tag, attributes, text inside), parsed with the standard library."""

    VOID = {"img", "br", "meta", "input", "hr", "link", "source"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.open: list[int] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in self.VOID:
            self.open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.elements[self.open.pop()][0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for i in self.open:
            self.elements[i][2].append(data)

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[dict[str, str]]:
        """Attributes (+ "text") of the elements with this tag, class and attribute values (`data_x` = data-x)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            {**a, "text": "".join(t)}
            for name, a, t in self.elements
            if (tag is None or name == tag)
            and (cls is None or cls in a.get("class", "").split())
            and all(a.get(k) == v for k, v in want.items())
        ]

    def count(self, key: str) -> int:
        """The header count `key`: its data attribute, checked against the text shown."""
        (el,) = self.find("span", data_field=key)
        assert el["text"] == el["data-count"], el
        return int(el["data-count"])


def inspect(directory: Path, out: Path, *args: str) -> tuple[str, Page]:
    """Run the CLI; the page's text and parse."""
    res = CliRunner().invoke(app, ["inspect", str(directory), "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    text = out.read_text()
    return text, Page(text)


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def reject_rows(d: Path) -> list[dict]:
    return pq.read_table(d / "rejects.parquet").to_pylist()


def tar_samples(d: Path) -> dict[str, dict]:
    """{id: {"png": (H, W, 3) uint8, "json": dict}} of a synthesize folder, read with plain tarfile."""
    out: dict[str, dict] = {}
    for shard in manifest(d)["shards"]:
        with tarfile.open(d / shard["name"]) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                out.setdefault(key, {})[ext] = data
    return {
        json.loads(v["json"])["id"]: {"png": img_array(v["png"]), "json": json.loads(v["json"])} for v in out.values()
    }


def read_columns(d: Path, *columns: str) -> list[tuple]:
    """Rows of `columns` of every shard of a Parquet stage folder, as tuples."""
    tables = [pq.read_table(d / s["name"], columns=list(columns)) for s in manifest(d)["shards"]]
    return [tuple(r[c] for c in columns) for t in tables for r in t.to_pylist()]


def img_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def data_uri_image(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    return img_array(base64.b64decode(uri.split(",", 1)[1]))


def stage_ids(d: Path) -> set[str]:
    """Every id of a stage folder's shards, read with plain pyarrow / tarfile."""
    if manifest(d)["format"] == "lightgen-images":
        return set(tar_samples(d))
    return {i for (i,) in read_columns(d, "id")}


def assert_self_contained(text: str, page: Page) -> None:
    """No external reference: no <link>, no <script>, every src a data: URI, no remote href, no CSS url()."""
    assert not page.find("link") and not page.find("script") and "<script" not in text.lower()
    for tag, attrs, _ in page.elements:
        assert attrs.get("src", "data:").startswith("data:"), (tag, attrs.get("src", "")[:80])
        assert not attrs.get("href", "").startswith(("http:", "https:", "//")), attrs["href"]
    style = "".join("".join(t) for tag, _, t in page.elements if tag == "style")
    assert "url(" not in style and "@import" not in style


# -------------------------------------------------------------------------------------------------- pages


@pytest.mark.parametrize("stage", list(STAGES))
def test_page_counts_ids_and_rejects_match_the_output(chain, tmp_path, stage):
    d = chain / STAGES[stage]
    m = manifest(d)
    text, page = inspect(d, tmp_path / f"{stage}.html", "--limit", "30", "--seed", "3")
    (body,) = page.find("body")
    assert (body["data-format"], body["data-stage"]) == (m["format"], m["stage"])
    assert (page.count("inputs"), page.count("written"), page.count("rejected")) == (
        m["inputs"],
        m["rows"],
        m["rejected"],
    )
    assert page.count("inputs") == page.count("written") + page.count("rejected")
    assert page.count("shards") == len(m["shards"])
    assert int(page.find(data_bytes=str(sum(s["bytes"] for s in m["shards"])))[0]["data-bytes"]) > 0
    assert m["code_version"] in text and m["config_digest"] in text
    # Rejects by reason: the header's counts and the table's, each reason with real example rows.
    rejects = reject_rows(d)
    by_reason = Counter(r["reason"] for r in rejects)
    assert by_reason and sum(by_reason.values()) == m["rejected"]  # every stage of the chain rejected something
    assert {e["data-reason-count"]: int(e["text"]) for e in page.find("span") if "data-reason-count" in e} == by_reason
    assert {e["data-reason"]: int(e["data-count"]) for e in page.find("tr", "reason")} == by_reason
    for reason in by_reason:
        examples = page.find("tr", "reject", data_reason=reason)
        assert examples and {e["data-id"] for e in examples} <= {r["id"] for r in rejects if r["reason"] == reason}
    # Sampled rows exist, at most --limit of them per section.
    samples = page.find(cls="sample")
    judged = stage_ids(d / "judgements") if stage == "pairs" else set()  # the judged-and-rejected rows
    assert samples and {s["data-id"] for s in samples} <= stage_ids(d) | judged
    assert_self_contained(text, page)
    CHECKS[stage](d, text, page)


def check_captions(d: Path, text: str, page: Page) -> None:
    clusters = page.find("section", "cluster")
    hist = json.loads((d / "diversity.json").read_text())["selected"]["cluster_histogram"]
    assert {int(c["data-cluster"]): int(c["data-count"]) for c in clusters} == {i: n for i, n in enumerate(hist) if n}
    assert page.find("svg", data_plot="clusters") and page.find("svg", data_plot="distinct")
    # The near-duplicate group: NEAR_A was kept (or only later not selected), NEAR_B removed as its near duplicate.
    (group,) = page.find("div", "dupgroup", data_kept=caption_id(NEAR_A))
    assert group["data-size"] == "1"
    (dup,) = page.find("li", "dup", data_id=caption_id(NEAR_B))
    assert dup["data-reason"] == "near_dup" and NEAR_B in dup["text"]
    assert "jaccard 0.917" in text and "one word apart" in text
    exact = {r["id"] for r in reject_rows(d) if r["reason"] == "exact_dup"}
    assert {g["data-kept"] for g in page.find("div", "dupgroup")} >= exact  # every exact-duplicate group is shown
    # Captions are user data: the XSS caption (kept once, removed once) is shown, escaped.
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;a red circle&lt;/b&gt;" in text
    assert any(XSS in e["text"] for e in page.find("li", "dup"))


def check_images(d: Path, text: str, page: Page) -> None:
    samples = tar_samples(d)
    figures, imgs = page.find("figure", "sample"), page.find("img")
    assert len(figures) == len(imgs) == min(30, manifest(d)["rows"])
    for f, img in zip(figures, imgs, strict=True):  # each shown image is the teacher's PNG, its settings on hover
        meta = samples[f["data-id"]]["json"]
        assert meta["caption"] in f["title"] and f"seed {meta['seed']}" in f["title"] and "teacher shapes" in f["title"]
        np.testing.assert_array_equal(data_uri_image(img["src"]), samples[f["data-id"]]["png"])


def check_latents(d: Path, text: str, page: Page) -> None:
    images = tar_samples(d.parent / "images")
    figures, imgs = page.find("figure", "sample"), page.find("img")
    assert len(figures) == min(30, manifest(d)["rows"]) and len(imgs) == 2 * len(figures)
    assert page.find("svg", data_plot="text_len")
    lengths = dict(read_columns(d, "id", "text_len"))
    for f, img, flip in zip(figures, imgs[::2], imgs[1::2], strict=True):
        assert f"text_len {lengths[f['data-id']]}" in f["title"]
        # The pixel tokenizer's round trip is the teacher's image (the id ends with the tar key, the caption id).
        teacher = images[f["data-id"].rsplit("/", 1)[1]]["png"]
        np.testing.assert_array_equal(data_uri_image(img["src"]), teacher)
        np.testing.assert_array_equal(data_uri_image(flip["src"]), teacher[:, ::-1])


def check_pairs(d: Path, text: str, page: Page) -> None:
    images = tar_samples(d.parent / "images")
    rows = {i: (answer, seed) for i, answer, seed in read_columns(d, "id", "judge_answer", "loser_seed")}
    pairs = page.find("div", "pair")
    assert len(pairs) == min(30, manifest(d)["rows"])
    imgs = page.find("img")
    assert len(imgs) == 2 * len(pairs) + len(page.find("figure", "sample", data_kept="false"))
    for p, winner in zip(pairs, imgs[::2], strict=False):
        np.testing.assert_array_equal(data_uri_image(winner["src"]), images[p["data-id"].rsplit("/", 1)[1]]["png"])
        assert f"seed {rows[p['data-id']][1]}" in text
    answers = {e["text"] for e in page.find("pre", "answer")}
    assert {rows[p["data-id"]][0] for p in pairs} <= answers
    check_judged_rejected(d / "judgements", page)


def check_judged_rejected(judgements: Path, page: Page) -> None:
    judged = [r for s in manifest(judgements)["shards"] for r in pq.read_table(judgements / s["name"]).to_pylist()]
    rejected = {r["id"]: r for r in judged if not r["kept"]}
    assert rejected  # the noise image
    (count,) = page.find(id="judged-rejected")
    assert int(count["data-count"]) == len(rejected) and int(count["data-scanned"]) == len(judged)
    shown = [f for f in page.find("figure", "sample") if f.get("data-kept") == "false"]
    assert {f["data-id"] for f in shown} == set(rejected)
    for f in shown:
        assert rejected[f["data-id"]]["judge_answer"].splitlines()[0] in f["title"]


def check_judgements(d: Path, text: str, page: Page) -> None:
    kept = dict(read_columns(d, "id", "kept"))
    for f in page.find("figure", "sample"):
        assert f["data-kept"] == str(kept[f["data-id"]]).lower()
    check_judged_rejected(d, page)


CHECKS = {
    "captions": check_captions,
    "images": check_images,
    "latents": check_latents,
    "pairs": check_pairs,
    "judgements": check_judgements,
}


# ------------------------------------------------------------------------------------------ sampling, errors


def sample_ids(page: Page) -> list[str]:
    return [s["data-id"] for s in page.find(cls="sample")]


def test_sampling_is_seeded(chain, tmp_path):
    d = chain / "latents"
    text, page = inspect(d, tmp_path / "a.html", "--limit", "3", "--seed", "5")
    assert inspect(d, tmp_path / "b.html", "--limit", "3", "--seed", "5")[0] == text  # the same page, byte for byte
    assert len(sample_ids(page)) == 3
    seen = {
        tuple(sample_ids(inspect(d, tmp_path / f"s{s}.html", "--limit", "3", "--seed", str(s))[1])) for s in range(4)
    }
    assert len(seen) > 1  # other seeds, other rows


def test_reads_only_the_shards_holding_the_sample(chain, tmp_path):
    src = tmp_path / "images"
    shutil.copytree(chain / "images", src)
    m = manifest(src)
    picked = sample_positions(m["rows_per_shard"], 2, 7)  # the rows inspect --limit 2 --seed 7 shows
    assert 0 < len(picked) < len(m["shards"])
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for i, s in enumerate(m["shards"]):
        if i not in picked:  # unreadable: the page must not open these
            (src / s["name"]).write_bytes(garbage)
    _, page = inspect(src, tmp_path / "p.html", "--limit", "2", "--seed", "7")
    assert len(sample_ids(page)) == 2
    # A sampled shard is really read: garbage there is a clear error naming it.
    name = m["shards"][min(picked)]["name"]
    (src / name).write_bytes(garbage)
    res = CliRunner().invoke(
        app, ["inspect", str(src), "--out", str(tmp_path / "q.html"), "--limit", "2", "--seed", "7"]
    )
    assert res.exit_code == 2 and res.output.startswith("error: ") and name in res.output


def test_parquet_rows_are_read_from_their_row_groups_only(tmp_path, monkeypatch):
    from pipeline.inspect import read as inspect_read

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(100)]}), path, row_group_size=10)
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or original(self, i, **kw)
    )
    t = inspect_read.read_parquet_rows(path, [3, 7, 55, 99], ["id"])
    assert t.column("id").to_pylist() == ["r3", "r7", "r55", "r99"] and read == [0, 5, 9]


def broken_folders(chain: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Folders that are not finished stage outputs -> (folder, expected error)."""
    m = manifest(chain / "latents")
    cases = {
        "empty": ({}, "no manifest.json in"),
        "unfinished": ({**m, "complete": False}, "has not finished"),
        "format": ({**m, "format": "lightgen-foo"}, "format 'lightgen-foo', expected 'lightgen-captions' or"),
        "missing": (m, "shards listed in .* are missing"),
        "json": ("{not json", "is not valid JSON"),
    }
    out = {}
    for name, (content, error) in cases.items():
        d = root / name
        d.mkdir()
        if content:
            (d / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
        out[name] = (d, error)
    return out


def test_not_a_finished_stage_output_is_a_clear_error(chain, tmp_path):
    cases = [(d, [], error) for d, error in broken_folders(chain, tmp_path).values()]
    cases += [
        (chain / "latents", ["--limit", "0"], "--limit must be >= 1"),
        (chain / "latents", ["--vae", str(tmp_path / "no-vae")], "image tokenizer path does not exist"),
    ]
    for d, args, error in cases:
        res = CliRunner().invoke(app, ["inspect", str(d), "--out", str(tmp_path / "x.html"), *args])
        assert res.exit_code == 2 and res.output.startswith("error: "), (d, res.output)
        assert re.search(error, res.output), (error, res.output)
    assert not (tmp_path / "x.html").exists()


def test_default_output_is_beside_the_folder(chain, tmp_path):
    src = tmp_path / "caps"
    shutil.copytree(chain / "captions", src)
    res = CliRunner().invoke(app, ["inspect", str(src) + "/", "--limit", "2"])
    assert res.exit_code == 0 and res.output.strip() == str(tmp_path / "caps-inspect.html")
    assert (tmp_path / "caps-inspect.html").is_file() and not list(src.glob("*.html"))


def test_demo_inspects_each_stage_output_and_links_the_pages(chain, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    for folder in ("captions", "images", "latents", "pairs"):
        (out / folder).symlink_to(chain / folder)
    ran = []

    def sh(self, stage: str, cmd: list[str]) -> None:  # the demo's command lines, run in this process (fast)
        assert cmd[: len(tool("lightgen-data"))] == tool("lightgen-data") and stage == "inspect"
        ran.append(cmd)
        res = CliRunner().invoke(app, cmd[len(tool("lightgen-data")) :])
        assert res.exit_code == 0, res.output

    monkeypatch.setattr(StepRunner, "sh", sh)
    Demo(demo_cli.parse_args(["--out", str(out)])).inspect_pages()
    assert len(ran) == len(INSPECT_PAGES)
    links = Page(inspect_links(out)).find("a")
    assert [a["href"] for a in links] == [f"inspect/{n}.html" for n in INSPECT_PAGES]
    for a, folder in zip(links, INSPECT_PAGES.values(), strict=True):
        (body,) = Page((out / a["href"]).read_text()).find("body")
        assert body["data-format"] == manifest(out / folder)["format"]


def test_vae_latents_are_decoded_with_the_given_vae(chain, tmp_path):
    from lightgen_model.encoders import build_image_tokenizer

    vae = str(make_tiny_vae(tmp_path / "tiny-vae"))
    d = tmp_path / "latents"
    EncodeStage.run(EncodeConfig([str(chain / "images")], str(d), vae=vae, resolution=32, workers=0, progress=False))
    _, page = inspect(d, tmp_path / "plain.html", "--limit", "2")  # no --vae: rows without images, and a hint
    assert (
        len(page.find("figure", "sample")) == 2
        and not page.find("img")
        and "--vae DIR" in page.find("p", "hint")[0]["text"]
    )
    _, page = inspect(d, tmp_path / "vae.html", "--limit", "2", "--vae", vae)
    ids, imgs = sample_ids(page), page.find("img")
    t = pa.concat_tables(pq.read_table(d / s["name"]) for s in manifest(d)["shards"])
    moments = dict(zip(t.column("id").to_pylist(), moments_array(t), strict=True))  # id -> (2C, h, w)
    means = np.stack([moments[i][:16] for i in ids]).astype(np.float32)  # (B, C, h, w)
    decoded = build_image_tokenizer(vae).decode(torch.from_numpy(means))  # (B, 3, H, W)
    expected = ((decoded.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    for k in range(2):
        np.testing.assert_array_equal(data_uri_image(imgs[2 * k]["src"]), expected[k])
    other = make_tiny_vae(tmp_path / "other-vae")  # another name: refused, not decoded into nonsense
    res = CliRunner().invoke(app, ["inspect", str(d), "--out", str(tmp_path / "x.html"), "--vae", str(other)])
    assert res.exit_code == 2 and "these shards were made by" in res.output


# ---------------------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(page: Path, shot: Path, size: str = "1280,1600") -> list[str]:
    """Screenshot `page` in headless Chromium with DNS off; the URLs the page itself requested (Chromium's net log:
    URL requests started for the file:// page; the browser's own background requests carry another isolation key)."""
    netlog = shot.with_suffix(".netlog.json")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={shot.parent / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--log-net-log={netlog}",
        f"--screenshot={shot}",
        f"--window-size={size}",
        page.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=180, check=True)
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start and "file://" in e["params"].get("network_isolation_key", "")
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_pages_render_in_headless_chromium_without_network(chain, tmp_path):
    # The detector works: a page with remote references shows them as requests.
    control = tmp_path / "control.html"
    control.write_text(
        '<img src="http://example.invalid/a.png"><link rel="stylesheet" href="https://cdn.invalid/b.css">'
    )
    assert sorted(chromium(control, tmp_path / "control.png", "200,200")) == [
        "http://example.invalid/a.png",
        "https://cdn.invalid/b.css",
    ]
    for stage in ("captions", "pairs"):
        page, shot = tmp_path / f"{stage}.html", tmp_path / f"{stage}.png"
        inspect(chain / STAGES[stage], page, "--limit", "8")
        assert chromium(page, shot) == []  # rendered from the file alone
        pixels = img_array(shot.read_bytes())
        assert pixels.shape == (1600, 1280, 3)
        # Non-blank: text, plots and images drawn (many colours, a good share of non-white pixels).
        assert (pixels.min(axis=2) < 200).mean() > 0.02 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


# ---------------------------------------------------------------------------------------- without a browser
# What the Chromium test checks, for machines without one (CI): the page requests nothing beyond itself, every
# image decodes, and what a reader sees is there (counts, plots with marks, images, text).

FETCHED_ATTRS = ("src", "srcset", "poster", "data", "background", "action", "formaction")
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]*)|@import\s+['"]([^'"]+)""", re.IGNORECASE)


def page_requests(page: Page) -> list[str]:
    """The URLs a browser would request loading `page`: resource attributes, <link href>, a meta refresh, CSS
    url() and @import in <style> and style attributes; data: URIs and in-page #anchors are not requests."""
    found = []
    for tag, attrs, text in page.elements:
        for key in FETCHED_ATTRS:
            found += (
                [u.strip().split()[0] for u in attrs.get(key, "").split(",") if u.strip()]
                if key == "srcset"
                else [attrs[key]]
                if attrs.get(key)
                else []
            )
        if tag in ("link", "image", "use", "feimage"):  # a stylesheet or icon; SVG's image and use elements
            found += [attrs[k] for k in ("href", "xlink:href") if attrs.get(k)]
        if tag == "meta" and attrs.get("http-equiv", "").lower() == "refresh" and "url=" in attrs.get("content", ""):
            found.append(attrs["content"].split("url=", 1)[1])
        css = attrs.get("style", "") + ("".join(text) if tag == "style" else "")
        found += [a or b for a, b in CSS_URL.findall(css)]
    return [u for u in found if not u.startswith(("data:", "#"))]


def test_page_requests_finds_what_the_browser_would_fetch():
    """The detector works: the Chromium test's control page, and more ways to reference a file."""
    control = '<img src="http://example.invalid/a.png"><link rel="stylesheet" href="https://cdn.invalid/b.css">'
    assert sorted(page_requests(Page(control))) == ["http://example.invalid/a.png", "https://cdn.invalid/b.css"]
    more = (
        '<style>@import "x.css"; div { background: url(\'y.png\') }</style><p style="background:url(z.png)">'
        '<img srcset="s1.png 1x, s2.png 2x"><a href="#top">top</a><img src="data:image/png;base64,AA==">'
        '<meta http-equiv="refresh" content="0; url=http://r.invalid/"><svg><image href="i.png"/></svg>'
    )
    want = ["http://r.invalid/", "i.png", "s1.png", "s2.png", "x.css", "y.png", "z.png"]
    assert sorted(page_requests(Page(more))) == want


SVG = re.compile(r"<svg\b[^>]*>(.*?)</svg>", re.DOTALL)


@pytest.mark.parametrize("stage", ["captions", "pairs"])
def test_pages_render_without_a_browser(chain, tmp_path, stage):
    """The pages the Chromium test screenshots, checked by parsing: self-contained, in-page links that resolve,
    images that decode and are not blank, the header counts, plots with marks in them, and text."""
    text, page = inspect(chain / STAGES[stage], tmp_path / f"{stage}.html", "--limit", "8")
    assert page_requests(page) == []
    ids = {a["id"] for _, a, _ in page.elements if "id" in a}
    assert all(a["href"][1:] in ids for a in page.find("a") if a.get("href", "").startswith("#"))
    assert {s["data-field"] for s in page.find("span") if "data-field" in s} >= {"inputs", "written", "rejected"}
    assert all(page.count(s["data-field"]) >= 0 for s in page.find("span") if "data-count" in s)
    imgs = page.find("img")
    for img in imgs:  # each decodes whole (a truncated or corrupt data URI raises) and shows something
        arr = data_uri_image(img["src"])
        assert arr.size > 0 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 1
    plots = SVG.findall(text)
    assert len(plots) == len(page.find("svg")) and all(s.get("width") and s.get("height") for s in page.find("svg"))
    assert all(re.search(r"<(rect|line|path|circle|polyline)\b", body) for body in plots)  # bars or lines drawn
    if stage == "captions":
        assert page.find("svg", data_plot="clusters") and page.find("svg", data_plot="distinct")
        assert page.find("section", "cluster") and page.find("div", "dupgroup")
    else:
        assert len(imgs) >= 2 * len(page.find("div", "pair")) > 0  # winner and loser side by side
    words = " ".join(t for tag, _, ts in page.elements if tag == "body" for t in ts).split()
    assert len(words) > 50  # text to read, not an empty shell
