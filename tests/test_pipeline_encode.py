"""`encode-latents` end to end: tiny VAE / tiny T5 / pixel / MiniLM, poisoned inputs, resume after a kill, Ray."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_models import make_tiny_t5, make_tiny_vae, write_tar
from typer.testing import CliRunner

from lightgen_model import encoders
from pipeline.cli import app
from pipeline.core import runtime
from pipeline.core.schema import IncompatibleShardsError, moments_array, text_arrays, training_shards
from pipeline.io.decode import center_crop_resize, decode_image
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "star",
    "left",
    "of",
    "right",
    "above",
    "below",
    "two",
    "three",
]


def png(seed: int, size=(48, 40), mode: str = "RGB", fmt: str = "PNG", value: int | None = None) -> bytes:
    """A random (or constant `value`) image of `size` (w, h), saved in `mode` / `fmt`."""
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), value, np.uint8) if value is not None else None
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if arr is None else arr
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


def caption(seed: int, n: int = 5) -> str:
    """A caption of `n` words the tiny tokenizers know."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def clean_tar(path: Path, n: int, start: int = 0) -> Path:
    """`n` good samples: png + json caption."""
    members = []
    for i in range(start, start + n):
        members += [(f"{i:05d}.png", png(i)), (f"{i:05d}.json", json.dumps({"caption": caption(i)}).encode())]
    return write_tar(path, members)


def read_rows(out: Path) -> pa.Table:
    """All shards of a run, in manifest order, read with plain pyarrow."""
    manifest = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["name"]) for s in manifest["shards"]])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {"vae": str(make_tiny_vae(root / "vae")), "t5": str(make_tiny_t5(root / "t5"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two clean tar shards of 4 + 3 samples."""
    root = tmp_path_factory.mktemp("inputs")
    clean_tar(root / "000.tar", 4)
    clean_tar(root / "001.tar", 3, start=4)
    return root


def config(out: Path, inputs: list, models: dict, **kw) -> EncodeConfig:
    """A small CPU config: pixel + tiny T5 unless overridden, in process, 32 px."""
    base = dict(vae="pixel", text_encoder=models["t5"], resolution=32, workers=0, shard_size=3, batch_size=2)
    return EncodeConfig(inputs=[str(p) for p in inputs], output=str(out), **{**base, **kw})


def test_tiny_vae_t5_roundtrip_flip_and_text(tmp_path, inputs, models):
    report = EncodeStage.run(config(tmp_path, [inputs], models, vae=models["vae"]))
    assert (report["inputs"], report["written"], report["rejected"], report["shards"]) == (7, 7, 0, 2)  # one per tar
    t = read_rows(tmp_path)
    assert t.column("id").to_pylist() == [
        f"{s}/{i:05d}" for s, r in (("000", range(4)), ("001", range(4, 7))) for i in r
    ]
    vae = encoders.build_image_tokenizer(models["vae"])
    t5 = encoders.build_text_encoder(models["t5"])
    crops = np.stack([center_crop_resize(decode_image(png(i)), 32) for i in range(7)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 32, 32)
    m, mf = moments_array(t), moments_array(t, "moments_flip")
    assert m.shape == (7, 32, 4, 4) and m.dtype == np.float16
    np.testing.assert_allclose(m, vae(x).numpy(), atol=2e-2, rtol=2e-3)
    # The flip moments are those of the flipped image (a random VAE is not flip-equivariant: not just m flipped).
    np.testing.assert_allclose(mf, vae(x.flip(-1)).numpy(), atol=2e-2, rtol=2e-3)
    assert np.abs(mf - m[..., ::-1]).max() > 0.05
    # Decoding the stored (normalised, 16-bit) mean gives the VAE's own reconstruction.
    with torch.no_grad():
        own = vae.vae(x).sample
    np.testing.assert_allclose(vae.decode(torch.from_numpy(m[:, :16].astype(np.float32))), own, atol=2e-2)
    # Text: unpadded, one row per token of each caption, as the encoder gives it for that caption alone.
    texts = text_arrays(t)
    for i, emb in enumerate(texts):
        alone = t5([caption(i)])[0]
        assert emb.shape == alone.shape == (len(caption(i).split()) + 1, 32)  # words + </s>
        np.testing.assert_allclose(emb, alone, atol=1e-2)
    assert set(t.column("vae").to_pylist()) == {vae.name} and set(t.column("text_encoder").to_pylist()) == {t5.name}
    manifest, paths = training_shards(tmp_path, vae=vae.name, text_encoder=t5.name)
    assert manifest["text_dim"] == 32 and manifest["moments_shape"] == [32, 4, 4] and len(paths) == 2
    with pytest.raises(IncompatibleShardsError, match="vae"):
        training_shards(tmp_path, vae="pixel", text_encoder=t5.name)


def test_pixel_minilm_folder_truncation(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    long = "a red circle " * 40
    for i, cap in enumerate(["two blue squares", long, "a star"]):
        (src / f"im{i}.png").write_bytes(png(i, size=(64, 40)))
        (src / f"im{i}.txt").write_text(cap)
    out = tmp_path / "out"
    report = EncodeStage.run(
        EncodeConfig([str(src)], str(out), text_encoder="minilm", resolution=32, max_text_len=8, workers=0)
    )
    assert report["written"] == 3
    t = pq.read_table(out / "part-00000.parquet")  # plain pyarrow, no helper
    crops = np.stack([center_crop_resize(decode_image(png(i, size=(64, 40))), 32) for i in range(3)])
    pixels = np.transpose(crops, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0
    m = np.stack([np.asarray(t["moments"][i].values).reshape(t["moments_shape"][i].as_py()) for i in range(3)])
    mf = moments_array(t, "moments_flip")
    np.testing.assert_array_equal(m[:, :3], pixels.astype(np.float16))
    np.testing.assert_array_equal(m[:, 3:], np.float16(encoders.PIXEL_LOGVAR))
    np.testing.assert_array_equal(mf, m[..., ::-1])  # pixels are flip-equivariant: exact
    lens = t.column("text_len").to_pylist()
    assert lens[1] == 8 and all(n <= 8 for n in lens)  # [CLS] two blue squares [SEP] = 5
    assert lens[0] == 5 and [e.shape for e in text_arrays(t)] == [(n, 384) for n in lens]
    assert t.column("caption").to_pylist() == ["two blue squares", long.strip(), "a star"]


def poisoned_inputs(root: Path) -> tuple[list[Path], dict[str, str], set[str]]:
    """A tar, a broken tar and a folder full of bad inputs -> (inputs, {id: reason} rejected, ids written)."""
    cap = lambda s: json.dumps({"caption": s}).encode()
    good_json = cap("a red circle")
    buf = png(1)
    members = [
        ("ok.png", png(0)),
        ("ok.json", good_json),
        ("cmyk.jpg", png(2, mode="CMYK", fmt="JPEG")),
        ("cmyk.json", good_json),
        ("pal.png", png(3, mode="P")),
        ("pal.txt", b"a blue square"),
        ("gray16.png", png(4, mode="I;16")),
        ("gray16.json", good_json),
        ("rgba.png", png(5, mode="RGBA")),
        ("rgba.json", good_json),
        ("empty.png", b""),
        ("empty.json", good_json),
        ("junk.png", b"this is not an image"),
        ("junk.json", good_json),
        ("trunc.png", buf[: len(buf) // 2]),
        ("trunc.json", good_json),
        ("bomb.png", png(6, size=(400, 300))),
        ("bomb.json", good_json),
        ("tiny.png", png(7, size=(8, 8))),
        ("tiny.json", good_json),
        ("nocap.png", png(8)),
        ("nocap2.png", png(9)),
        ("nocap2.json", b'{"url": "http://x"}'),
        ("blank.png", png(10)),
        ("blank.txt", b"  \n "),
        ("latin1.png", png(11)),
        ("latin1.txt", "café".encode("latin-1")),
        ("latin1j.png", png(12)),
        ("latin1j.json", b'{"caption": "caf\xe9"}'),
        ("badjson.png", png(13)),
        ("badjson.json", b"{caption: oops"),
        ("noimage.json", good_json),
        ("black.png", png(14, value=0)),
        ("black.json", good_json),  # the NaN tokenizer below poisons it
        ("poison.png", png(15)),
        ("poison.json", cap("a poison star")),  # and this caption's text embedding
    ]
    tar = write_tar(root / "in.tar", members)
    members = [("ok2.png", png(16)), ("ok2.json", cap("\ud800 a lone surrogate"))]
    surrogate = write_tar(root / "surrogate.tar", members)
    huge = root / "huge.tar"  # a header that declares 2^40 bytes for a caption of a few bytes
    with tarfile.open(huge, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("big.png")
        info.size = len(png(17))
        tf.addfile(info, io.BytesIO(png(17)))
    with open(huge, "r+b") as f:  # append a member whose header lies about its size, then a few bytes
        f.seek(-1024, 2)  # over the end-of-archive blocks
        info = tarfile.TarInfo("big.json")
        info.size = 1 << 40
        f.write(info.tobuf(format=tarfile.PAX_FORMAT) + good_json)
    broken = root / "broken.tar"
    broken.write_bytes(b"\x01 not a tar archive " * 40)
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(20))
    (folder / "b.png").write_bytes(png(21))
    (folder / "c.png").write_bytes(png(22))
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # header only
    (folder / "captions.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "from jsonl"}) + "\n")
    (folder / "b.txt").write_text("from sidecar")
    (folder / "d.txt").write_text("fine caption, broken image")
    rejected = {
        "in/empty": "empty_file",
        "in/junk": "undecodable",
        "in/trunc": "truncated",
        "in/bomb": "too_large",
        "in/tiny": "too_small",
        "in/nocap": "missing_caption",
        "in/nocap2": "missing_caption",
        "in/blank": "empty_caption",
        "in/latin1": "bad_caption_encoding",
        "in/latin1j": "bad_caption_encoding",
        "in/badjson": "bad_caption_json",
        "in/noimage": "missing_image",
        "in/black": "nonfinite_latent",
        "in/poison": "nonfinite_text",
        "broken/<unreadable>": "bad_tar",
        "folder/c.png": "missing_caption",
        "folder/d.png": "undecodable",
    }
    written = {"in/ok", "in/cmyk", "in/pal", "in/gray16", "in/rgba", "folder/a.png", "folder/b.png"}
    # tarfile stops listing at the lying header: the image loses its caption, the tar is reported as damaged.
    rejected.update(
        {"surrogate/ok2": "bad_caption_encoding", "huge/big": "missing_caption", "huge/<unreadable>": "bad_tar"}
    )
    return [tar, broken, folder, surrogate, huge], rejected, written


def poison_encoders(monkeypatch) -> None:
    """NaN moments for all-black images, inf text states for captions containing 'poison'."""
    build_tok, build_text = encoders.build_image_tokenizer, encoders.build_text_encoder

    def tokenizer(*args, **kw):
        tok = build_tok(*args, **kw)

        class Poisoned:
            name, latent_channels, stride = tok.name, tok.latent_channels, tok.stride

            def __call__(self, images):
                out = tok(images)
                out[images.flatten(1).amax(1) <= -1.0] = float("nan")
                return out

        return Poisoned()

    def text_encoder(*args, **kw):
        enc = build_text(*args, **kw)

        class Poisoned:
            name, dim, max_len = enc.name, enc.dim, enc.max_len

            def __call__(self, captions):
                out = enc(captions)
                return [np.full_like(o, np.inf) if "poison" in c else o for o, c in zip(out, captions, strict=True)]

        return Poisoned()

    monkeypatch.setattr(encoders, "build_image_tokenizer", tokenizer)
    monkeypatch.setattr(encoders, "build_text_encoder", text_encoder)


def test_poisoned_inputs_are_quarantined_and_counted(tmp_path, models, monkeypatch):
    srcs, rejected, written = poisoned_inputs(tmp_path)
    poison_encoders(monkeypatch)
    out = tmp_path / "out"
    report = EncodeStage.run(config(out, srcs, models, shard_size=7, batch_size=4, max_pixels=100_000))
    n_in = len(rejected) + len(written)
    assert (report["inputs"], report["written"], report["rejected"]) == (n_in, len(written), len(rejected))
    rej = pq.read_table(out / "rejects.parquet")
    assert dict(zip(rej.column("id").to_pylist(), rej.column("reason").to_pylist(), strict=True)) == rejected
    assert all(rej.column("detail").to_pylist()) and all(rej.column("source").to_pylist())
    t = read_rows(out)
    assert sorted(t.column("id").to_pylist()) == sorted(written)
    assert np.isfinite(moments_array(t).astype(np.float32)).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"] == n_in and sum(manifest["rows_per_shard"]) == len(written)
    assert report["rejected_by_reason"]["missing_caption"] == 4


def test_resume_redoes_only_changed_or_broken_shards(tmp_path, models):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        clean_tar(src / f"{k:03d}.tar", 2, start=2 * k)
    out = tmp_path / "out"
    cfg = config(out, [src], models)
    first = EncodeStage.run(cfg)
    reference = read_rows(out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / "part-00001.parquet").write_bytes((out / "part-00001.parquet").read_bytes()[:100])  # truncated
    data = bytearray((out / "part-00002.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed in the middle: same size, same footer
    (out / "part-00002.parquet").write_bytes(bytes(data))
    (out / "part-00003.parquet.tmp-999").write_bytes(b"half")  # a killed writer's leftover
    (out / "part-00009.parquet").write_bytes(b"stale")  # beyond the shard count: deleted
    again = EncodeStage.run(cfg)
    assert (again["shards_skipped"], again["shards_run"], again["inputs_this_run"]) == (2, 2, 4)
    assert read_rows(out).equals(reference) and again["written"] == first["written"] == 8
    redone = ("00001", "00002")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if not p.name.startswith(redone, 5)} == {
        k: v for k, v in stamp.items() if not k.startswith(redone, 5)
    }
    assert not list(out.glob("*.tmp-*")) and not (out / "part-00009.parquet").exists()
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        EncodeStage.run(config(out, [src], models, resolution=64))
    assert EncodeStage.run(config(out, [src], models, resolution=64, overwrite=True))["written"] == 8


KILLED_RUN = """
import sys, time
from pipeline.core import runner

write = runner._ShardOut.write
def slow_write(self, rows):  # slow enough for the parent to kill us between and inside shards
    write(self, rows)
    time.sleep(0.4)
runner._ShardOut.write = slow_write
from pipeline.stages.encode_latents import EncodeConfig, EncodeStage
EncodeStage.run(EncodeConfig([sys.argv[1]], sys.argv[2], text_encoder=sys.argv[3], resolution=32, workers=0,
                                batch_size=1, progress=False))
"""


@pytest.mark.slow
def test_resume_after_kill_no_duplicate_no_loss(tmp_path, models):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(7):
        clean_tar(src / f"{k:03d}.tar", 1, start=k)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(src), str(out), models["t5"]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while len(list(out.glob("part-*.done.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("part-*.done.json"))
    assert 3 <= len(finished) < 7
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    report = EncodeStage.run(config(out, [src], models, text_encoder=models["t5"], batch_size=1))
    assert report["shards_skipped"] == len(finished) and report["written"] == 7
    resumed = read_rows(out)
    clean = tmp_path / "clean"
    EncodeStage.run(config(clean, [src], models, batch_size=1))
    ids = resumed.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 7 and resumed.equals(read_rows(clean))
    assert not list(out.glob("*.tmp-*"))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's Ray tests (runs leave it up)."""
    import ray

    runtime.init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_one_and_two_ray_workers_give_the_same_rows(tmp_path, inputs, models, local_ray):
    runs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        report = EncodeStage.run(config(out, [inputs], models, vae=models["vae"], workers=workers, shard_size=2))
        assert report["written"] == 7
        runs[workers] = (
            read_rows(out),
            [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]],
        )
    assert runs[1][0].equals(runs[0][0]) and runs[2][0].equals(runs[0][0])
    assert runs[1][1] == runs[2][1] == runs[0][1]  # byte-identical shard files
    # No GPU here: the default asks for none, an explicit request fails up front instead of waiting forever.
    assert runtime.resolve_gpus_per_worker(None, 2) == 0.0
    with pytest.raises(ValueError, match="needs 2 GPUs, the Ray cluster has 0"):
        runtime.resolve_gpus_per_worker(1.0, 2)


runner = CliRunner()


def test_cli_encode_latents_and_errors(tmp_path, inputs, models):
    out = tmp_path / "out"
    args = ["encode-latents", "--input", str(inputs / "000.tar"), "--input", str(inputs / "001.tar"), "--output"]
    opts = ["--text-encoder", models["t5"], "--resolution", "32", "--workers", "0", "--shard-size", "5", "--quiet"]
    result = runner.invoke(app, [*args, str(out), *opts])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["written"] == 7
    assert [p.name for p in sorted(out.glob("part-*[0-9].parquet"))] == ["part-00000.parquet", "part-00001.parquet"]
    for bad, message in [
        (["--input", str(tmp_path / "missing.tar")], "does not exist: .*missing.tar"),
        (["--input", str(inputs), "--vae", "sd35"], "unknown --vae 'sd35'"),
        (["--input", str(inputs), "--text-encoder", "t5-xxl"], "unknown --text-encoder 't5-xxl'"),
        (["--input", str(tmp_path / "empty")], "no .tar shards or images"),
        (["--input", str(inputs), "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["--input", str(inputs), "--vae", models["vae"], "--resolution", "36"], "36 is not a multiple of .* 8"),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        result = runner.invoke(app, ["encode-latents", *bad, "--output", str(tmp_path / "o"), "--workers", "0"])
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert re.search(message, result.output), result.output
    help_text = runner.invoke(app, ["encode-latents", "--help"], terminal_width=200).output
    for option in [
        "--input",
        "--output",
        "--vae",
        "--text-encoder",
        "--resolution",
        "--max-text-len",
        "--batch-size",
        "--shard-size",
        "--workers",
        "--gpus-per-worker",
        "--device",
        "--dtype",
        "--ray-address",
        "--seed",
        "--overwrite",
        "--max-pixels",
    ]:
        assert option in help_text
    assert "[default: pixel]" in help_text and "[default: 128]" in help_text
