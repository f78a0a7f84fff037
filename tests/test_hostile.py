"""Hostile input to every entry point: each bad input is a rejected row or one `error: ...` line with exit code 2.

Damaged and foreign weight files, config.json with wrong types or absurd sizes, non-finite and out-of-range
command-line numbers, decompression bombs, deeply nested JSON, lying tar headers and undecodable captions are fed
to `lightgen`, `lightgen shapes`, `lightgen-data` and the library calls behind them, some as real subprocesses
(to see the exit code and stderr a user sees), the rest in process. Malformed inputs that are not written out by
hand come from a seeded random generator (hypothesis is not installed), so every run feeds the same ones.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from operator import attrgetter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from conftest import wake_head
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from tiny_models import make_tiny_bert, make_tiny_t5, write_tar
from typer.testing import CliRunner

import lightgen.errors
from lightgen.cli import app
from lightgen.errors import user_errors
from lightgen_model import LightGen, ModelConfig, preset, save_pretrained
from lightgen_model.config import MAX_PARAMETERS, STACK_FIELDS, STACKS, estimate_parameters
from pipeline import cli as data_cli

runner = CliRunner()
BIN = Path(sys.executable).parent
SEED = 20240611


# ---------------------------------------------------------------------------------------------------- helpers


def assert_user_error(output: str, exit_code: int, *needles: str) -> str:
    """Exit code 2, no traceback, and an `error: ` line (the last line) containing every needle; returns it."""
    assert exit_code == 2, output
    assert "Traceback" not in output and "Aborted" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), output
    assert sum(line.startswith("error: ") for line in lines) == 1, output
    for needle in needles:
        assert needle in lines[-1], output
    return lines[-1]


def assert_usage_error(output: str, exit_code: int, option: str) -> None:
    """typer's refusal of an option value: exit code 2, `Invalid value for '<option>'`, no traceback."""
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    assert f"Invalid value for '{option}'" in output, output


def invoke(*args: object):
    """`lightgen ARGS` in process."""
    return runner.invoke(app, [str(a) for a in args])


def script(name: str, *args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """A console script of the venv (`lightgen`, `lightgen-data`) or `python -m ...`, as a user runs it."""
    cmd = [sys.executable, *map(str, args)] if name == "python" else [str(BIN / name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that declares a `width` x `height` grayscale image (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def mutations(data: bytes, n: int, seed: int) -> list[bytes]:
    """`n` seeded malformed variants of `data`: truncations, byte flips, random bytes, spliced garbage."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind, buf = rng.choice(["truncate", "flip", "random", "splice"]), bytearray(data)
        if kind == "truncate":
            buf = buf[: rng.randrange(1, len(buf))]
        elif kind == "flip":
            for _ in range(rng.randint(1, 16)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == "random":
            buf = bytearray(rng.randbytes(rng.randrange(1, 512)))
        else:
            at = rng.randrange(len(buf))
            buf[at:at] = rng.randbytes(rng.randrange(1, 64))
        out.append(bytes(buf))
    return out


class Touch:
    """Unpickling this creates a file: a stand-in for code a hostile pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The debug model with a tiny BERT text encoder (loads in well under a second)."""
    root = tmp_path_factory.mktemp("hostile")
    bert = make_tiny_bert(root / "bert")
    torch.manual_seed(0)
    return save_pretrained(wake_head(LightGen(preset("debug", text_dim=32, text_encoder=str(bert)))), root / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of three small RGB images."""
    root = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.new("RGB", (24, 24), (40 * i, 10, 200)).save(root / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------- one wrapper

LIBRARY_ERRORS = [
    csv.Error("field larger than field limit (131072)"),
    RecursionError("maximum recursion depth exceeded while decoding a JSON array"),
    EOFError(),
    pickle.UnpicklingError("invalid load key, 'x'."),
    SafetensorError("Error while deserializing header: header too large"),
    pa.ArrowInvalid("Parquet magic bytes not found in footer"),
    Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit"),
    tarfile.ReadError("unexpected end of data"),
    json.JSONDecodeError("Expecting value", "{x", 1),
    ValueError("a message\nspread over\n\tlines"),
    FileNotFoundError("no such file: x"),
]


@pytest.mark.parametrize("error", LIBRARY_ERRORS, ids=lambda e: type(e).__name__)
def test_user_errors_reports_every_kind_of_bad_input_in_one_line(error: Exception) -> None:
    cli = typer.Typer()

    @cli.command()
    @user_errors()
    def fail() -> None:
        raise error

    res = runner.invoke(cli, [])
    line = assert_user_error(res.output, res.exit_code)
    assert "\n" not in line and len(line) > len("error: ")


def test_a_bug_keeps_its_traceback() -> None:
    cli = typer.Typer()

    @cli.command()
    @user_errors()
    def fail() -> None:
        raise TypeError("a bug")

    res = runner.invoke(cli, [])
    assert res.exit_code == 1 and isinstance(res.exception, TypeError)


def test_lightgen_data_uses_the_same_wrapper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One implementation: `lightgen-data`'s stage commands report what `user_errors` maps, e.g. a csv.Error."""
    assert data_cli.user_errors is lightgen.errors.user_errors

    def explode(cfg: object) -> None:
        raise csv.Error("field larger than field limit (131072)")

    monkeypatch.setattr("pipeline.stages.encode_latents.EncodeStage.run", explode)
    res = runner.invoke(data_cli.app, ["encode-latents", "--input", str(tmp_path), "--output", str(tmp_path)])
    assert_user_error(res.output, res.exit_code, "field larger than field limit")


# ---------------------------------------------------------------------------------------------------- weight files


def _checkpoint_bytes(payload: object, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _reference_like() -> dict:
    return {"model": {"z_proj.weight": torch.zeros(8, 48)}, "args": argparse.Namespace(model="fluid_debug"), "epoch": 3}


def _convert(ckpt: Path, tmp_path: Path):
    return invoke("convert-reference", "--checkpoint", ckpt, "--out", tmp_path / "out", "--heads", 4)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("empty.pth", lambda marker: b"", "empty file"),
        (
            "legacy.pth",
            lambda m: _checkpoint_bytes({"model": {}, "x": Touch(m)}, True),
            "not loaded: this checkpoint is a pickle",
        ),
        (
            "zip.pth",
            lambda m: _checkpoint_bytes({"model": {}, "x": Touch(m)}, False),
            "not loaded: this checkpoint is a pickle",
        ),
        (
            "raw5.pkl",
            lambda m: pickle.dumps({"model": {}, "x": Touch(m)}, protocol=5),
            "not loaded: this checkpoint is a pickle",
        ),
        ("raw2.pkl", lambda m: pickle.dumps({"model": {"a": 1}}, protocol=2), "not a readable torch checkpoint"),
        ("text.pth", lambda m: b"just some text\n", "checkpoint"),
        # bytes that make torch's legacy unpickler raise IndexError, struct.error and KeyError
        ("index.pth", lambda m: b"\x80", "not a readable torch checkpoint (IndexError"),
        ("struct.pth", lambda m: b"Xj", "not a readable torch checkpoint (error"),
        (
            "key.pth",
            lambda m: b"j\xaa#\x91\xc0\xf1\xff\x93\xdc7\xc2`\x1a\\\x03",
            "not a readable torch checkpoint (KeyError",
        ),
        ("trunc.safetensors", lambda m: b"\x10\x00\x00\x00\x00\x00\x00\x00{", "not a readable torch checkpoint"),
        ("huge.safetensors", lambda m: (1 << 60).to_bytes(8, "little") + b"{}", "not a readable torch checkpoint"),
        ("header.safetensors", lambda m: (8).to_bytes(8, "little") + b'{"a": 1}', "not a readable torch checkpoint"),
    ],
)
def test_convert_reference_refuses_damaged_or_foreign_files(tmp_path: Path, name: str, make, message: str) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(make(marker))
    res = _convert(tmp_path / name, tmp_path)
    assert_user_error(res.output, res.exit_code, str(tmp_path / name), message)
    assert not marker.exists() and not (tmp_path / "out").exists()


UNSAFE_ADVICE = (
    "weights_only=False",
    "weights_only` set to `False",
    "safe_globals",
    "allowlist",
    "can still be loaded",
    "if you trust",
)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_refused_pickle_says_what_it_is_and_how_to_convert_never_to_unpickle(
    tmp_path: Path, images: Path, legacy: bool
) -> None:
    """torch's refusal advises `weights_only=False` or allowlisting the global: never repeated to the user."""
    marker = tmp_path / "pwned"
    (tmp_path / "c.pth").write_bytes(_checkpoint_bytes({**_reference_like(), "x": Touch(marker)}, legacy))
    res = _convert(tmp_path / "c.pth", tmp_path)
    line = assert_user_error(
        res.output,
        res.exit_code,
        f"{tmp_path / 'c.pth'}: not loaded: this checkpoint is a pickle holding more than tensors",
        "GLOBAL io.open",
        "'model', 'model_ema' and 'args'",
    )
    assert not any(advice in line for advice in UNSAFE_ADVICE), line
    res = _fid(images, tmp_path / "c.pth")
    line = assert_user_error(
        res.output,
        res.exit_code,
        "not loaded: this weights file is a pickle",
        ".safetensors",
        "`lightgen convert-reference`",
    )
    assert not any(advice in line for advice in UNSAFE_ADVICE), line
    assert not marker.exists()
    for i, data in enumerate(mutations(_checkpoint_bytes(_reference_like(), legacy), 12, SEED + 7)):
        (tmp_path / f"{i}.pth").write_bytes(data)
        res = _convert(tmp_path / f"{i}.pth", tmp_path)
        assert not any(advice in res.output for advice in UNSAFE_ADVICE), res.output


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_reference_on_seeded_random_damage(tmp_path: Path, legacy: bool) -> None:
    """Damaged copies of a reference-like checkpoint (and of a hostile one): always one error line, never run."""
    marker = tmp_path / "pwned"
    clean = _checkpoint_bytes(_reference_like(), legacy)
    hostile = _checkpoint_bytes({**_reference_like(), "hook": Touch(marker)}, legacy)
    for i, data in enumerate(mutations(clean, 12, SEED + legacy) + mutations(hostile, 12, SEED + 2 + legacy)):
        (tmp_path / f"{i}.pth").write_bytes(data)
        res = _convert(tmp_path / f"{i}.pth", tmp_path)
        assert_user_error(res.output, res.exit_code)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": {"z_proj.weight": torch.zeros(48)}}, "'z_proj.weight' has shape (48,), expected 2 dimensions"),
        ({"model": {1: torch.zeros(2)}}, "not a state dict of tensors"),
        ({"model": {"z_proj.weight": torch.zeros(8, 48)}, "args": [1, 2]}, "'args' is not an argparse Namespace"),
        (
            {"model": {"z_proj.weight": torch.zeros(8, 48)}, "args": argparse.Namespace(vae_embed_dim=[3])},
            "args.vae_embed_dim=[3] is not an integer",
        ),
        ([1, 2, 3], "not a reference checkpoint"),
    ],
)
def test_convert_reference_refuses_odd_contents(tmp_path: Path, payload: object, message: str) -> None:
    torch.save(payload, tmp_path / "c.pth")
    res = _convert(tmp_path / "c.pth", tmp_path)
    assert_user_error(res.output, res.exit_code, message)


def _fid(images: Path, weights: Path):
    return invoke("fid", "--real", images, "--fake", images, "--inception-weights", weights, "--device", "cpu")


def test_fid_refuses_damaged_weights(tmp_path: Path, images: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(7)}, str(good))
    data = good.read_bytes()
    marker = tmp_path / "pwned"
    cases = {
        "trunc.safetensors": data[: len(data) // 2],
        "random.safetensors": random.Random(SEED).randbytes(300),
        "header.safetensors": (12).to_bytes(8, "little") + b'{"a": [1,2]}',
        "huge.safetensors": (1 << 60).to_bytes(8, "little") + b"{}",
        "empty.pth": b"",
        "legacy.pth": _checkpoint_bytes({"w": torch.zeros(1), "x": Touch(marker)}, True),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        res = _fid(images, tmp_path / name)
        assert_user_error(res.output, res.exit_code, str(tmp_path / name))
    for i, content in enumerate(mutations(data[:200], 8, SEED)):  # damage inside the header
        (tmp_path / f"m{i}.safetensors").write_bytes(content + data[200:])
        res = _fid(images, tmp_path / f"m{i}.safetensors")
        assert_user_error(res.output, res.exit_code)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- config.json


def with_keys(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` (a config dict) with ``changes``, a dotted key ('encoder.depth') set inside its stack
    (unless a change has made the stack itself something other than an object)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        *parents, name = key.split(".")
        node = out
        for p in parents:
            node = node[p] if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[name] = value
    return out


BAD_CONFIGS = [
    ({"encoder.depth": "16"}, "'encoder.depth' must be an integer, got '16'"),
    ({"decoder.depth": 2.0}, "'decoder.depth' must be an integer, got 2.0"),
    ({"cross.depth": True}, "'cross.depth' must be an integer, got True"),
    ({"encoder.heads": 0}, "'encoder.heads' must be an integer in [1, 65536], got 0"),
    ({"patch_size": 0}, "'patch_size' must be an integer in [1, 65536], got 0"),
    ({"decoder.depth": -1}, "'decoder.depth' must be an integer in [0, 1024], got -1"),
    ({"encoder.depth": 2000}, "'encoder.depth' must be an integer in [0, 1024], got 2000"),
    ({"cross.dim": 10**9}, "'cross.dim' must be an integer in [1, 65536], got 1000000000"),
    ({"cross": [64, 1, 4]}, "'cross' must be an object with keys dim, depth, heads, got [64, 1, 4]"),
    ({"decoder.head": 4}, "unknown ModelConfig keys: ['decoder.head']"),
    ({"encoder_depth": 2}, "config keys 'encoder_depth' and 'encoder.depth' both give the encoder stack's depth"),
    ({"mlp_ratio": float("nan")}, "'mlp_ratio' must be a finite number, got nan"),
    ({"mlp_ratio": "4"}, "'mlp_ratio' must be a finite number"),
    ({"text_key_mask": 1}, "'text_key_mask' must be true or false"),
    ({"vae": None}, "'vae' must be a string"),
    ({"sampling": {"cfg": "x"}}, "cfg (guidance_scale) must be a finite number"),
    ({"sampling": {"temperature": float("inf")}}, "temperature must be a finite number"),
    ({"base_resolution": 65536, "vae_stride": 1, "patch_size": 1}, "above the limit of 1e+11"),
]


@pytest.mark.parametrize(("override", "message"), BAD_CONFIGS, ids=lambda x: str(x)[:40])
def test_bad_config_json_is_one_error_naming_key_and_value(tmp_path: Path, override: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(with_keys(preset("debug").to_dict(), override)))
    res = invoke("model-info", "--model", tmp_path)
    assert_user_error(res.output, res.exit_code, str(tmp_path / "config.json"), message)


def test_bad_flat_stack_key_of_an_earlier_config_json_is_named(tmp_path: Path) -> None:
    """config.json of earlier versions has flat stack keys (encoder_depth); a bad one is named as the stack's key."""
    cfg = {k: v for k, v in preset("debug").to_dict().items() if k != "encoder"}
    cfg |= {"encoder_dim": 64, "encoder_depth": "16", "encoder_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = invoke("model-info", "--model", tmp_path)
    assert_user_error(res.output, res.exit_code, str(tmp_path / "config.json"), "'encoder.depth' must be an integer")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{", "not a JSON config"),
        (b"[1]", "must be a JSON object"),
        (b"\xff\xfe", "not a JSON config"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
        (b'{"encoder_dimm": 3}', "unknown ModelConfig keys"),
    ],
)
def test_unreadable_config_json(tmp_path: Path, text: bytes, message: str) -> None:
    (tmp_path / "config.json").write_bytes(text)
    res = invoke("model-info", "--model", tmp_path)
    assert_user_error(res.output, res.exit_code, message)


def test_absurd_sizes_are_refused_before_anything_is_built() -> None:
    """A depth or width of 10^9 would allocate until the machine runs out of memory: the config refuses it."""
    base = preset("debug").to_dict()
    for override in ({"encoder.depth": 10**9}, {"head_width": 10**9}, {"mlp_ratio": 1e308}, {"text_dim": 2**40}):
        with pytest.raises(ValueError, match=next(iter(override))):
            ModelConfig.from_dict(with_keys(base, override))


HOSTILE_VALUES = [
    "16",
    "",
    2.5,
    16.0,
    True,
    False,
    None,
    [],
    {},
    [16],
    {"a": 1},
    -1,
    0,
    10**9,
    2**70,
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    "x" * 10_000,
    "ddim0",
    "ddim99999",
    "1,0",
    "-5",
]


def test_config_property_every_hostile_field_is_a_value_error_or_a_sane_config() -> None:
    """Seeded random configs with 1-3 hostile fields: ModelConfig either raises ValueError or is sane (typed,
    within bounds); never another exception."""
    rng = random.Random(SEED)
    base = preset("debug").to_dict()
    fields = sorted(base) + [f"{s}.{k}" for s in STACKS for k in STACK_FIELDS]
    accepted = 0
    for _ in range(400):
        override = {k: rng.choice(HOSTILE_VALUES) for k in rng.sample(fields, rng.randint(1, 3))}
        try:
            cfg = ModelConfig.from_dict(with_keys(base, override))
        except ValueError:
            continue
        accepted += 1
        assert estimate_parameters(cfg) <= MAX_PARAMETERS, override
        numbers = [attrgetter(f)(cfg) for f in ("encoder.depth", "cross.dim", "head_width", "patch_size", "mlp_ratio")]
        assert all(not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in numbers), override
        assert all(isinstance(getattr(cfg, f), str) for f in ("vae", "text_encoder", "prediction")), override
    assert accepted > 0  # some hostile-looking values are fine (e.g. a long vae name)


def test_damaged_or_mismatched_weights_are_one_error(model_dir: Path, tmp_path: Path) -> None:
    for name, change in [("trunc", "weights"), ("mismatch", "config")]:
        d = tmp_path / name
        shutil.copytree(model_dir, d)
        if change == "weights":
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(cfg | {"head_depth": 3}))
        res = invoke("generate", "--model", d, "--prompt", "a", "--out", tmp_path / "o", "--device", "cpu")
        line = assert_user_error(res.output, res.exit_code, str(d / "model.safetensors"))
        assert ("not a readable safetensors file" if change == "weights" else "do not fit config.json") in line
        assert not (tmp_path / "o").exists()


def test_weights_that_do_not_fit_are_a_short_line_and_all_keys_with_verbose(model_dir: Path, tmp_path: Path) -> None:
    """One readable line: the count and the first three keys of each kind; `--verbose` lists every key first."""
    d = tmp_path / "deeper"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"head_depth": 3}))  # 8 more keys than the file has
    args = ["generate", "--model", d, "--prompt", "a", "--out", tmp_path / "o", "--device", "cpu"]
    res = invoke(*args)
    line = assert_user_error(
        res.output,
        res.exit_code,
        f"{d / 'model.safetensors'}: weights do not fit config.json: "
        "8 missing keys (diffloss.net.res_blocks.2.in_ln.weight, ",
        "and 5 more)",
        "--verbose lists them all",
    )
    assert len(line) < 300 and "res_blocks.2.mlp.2.bias" not in line, line
    res = invoke(*args, "--verbose")
    line = assert_user_error(res.output, res.exit_code, "8 missing keys", "(all 8 listed above)")
    listed = [x for x in res.output.splitlines() if x.startswith("missing key: ")]
    assert len(listed) == 8 and "missing key: diffloss.net.res_blocks.2.adaLN_modulation.1.bias" in listed
    from lightgen_model.hub import WeightsMismatchError, from_pretrained

    with pytest.raises(WeightsMismatchError) as e:  # the Python API: the same line, every key on the error
        from_pretrained(d)
    assert len(e.value.missing) == 8 and not e.value.unexpected and "and 5 more" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_trainer_weights_that_do_not_fit_name_counts_and_keys(model_dir: Path) -> None:
    """The trainer's resume / init_from check says the same: counts and first keys (was torch's first line only)."""
    from lightgen_model.hub import load_config
    from training.checkpoint import load_weights

    model = LightGen(load_config(model_dir))
    state = model.state_dict()
    state = {k: v for k, v in state.items() if "res_blocks.0" not in k} | {"extra.weight": torch.zeros(1)}
    state["z_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"^src: its weights do not fit its config: \d+ missing keys \(") as e:
        load_weights(model, state, "src")
    assert "1 unexpected key (extra.weight), 1 key of another shape (z_proj.weight: (3, 3) vs (" in str(e.value)


# ---------------------------------------------------------------------------------------------------- command-line numbers

BAD_GENERATE_OPTIONS = [
    (["--cfg", "inf"], "--cfg"),
    (["--cfg", "nan"], "--cfg"),
    (["--cfg", "-1"], "--cfg"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "1e999"], "--temperature"),
    (["--resolution", "0"], "--resolution"),
    (["--resolution", "-32"], "--resolution"),
    (["--resolution", "99999"], "--resolution"),
    (["--height", "0"], "--height"),
    (["--width", "0"], "--width"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1.5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--images-per-prompt", "0"], "--images-per-prompt"),
]


@pytest.mark.parametrize(
    ("args", "option"), BAD_GENERATE_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else x
)
def test_generate_refuses_bad_numbers_before_writing(
    model_dir: Path, tmp_path: Path, args: list[str], option: str
) -> None:
    res = invoke("generate", *args, "--model", model_dir, "--prompt", "a", "--out", tmp_path / "o", "--device", "cpu")
    assert_usage_error(res.output, res.exit_code, option)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "0"], "temperature must be a finite number > 0"),
        (["--resolution", "30"], "not a positive multiple of 4"),
        (["--head-steps", "ddim0"], "num_sampling_steps"),
    ],
)
def test_generate_refuses_bad_settings_with_one_error(
    model_dir: Path, tmp_path: Path, args: list, message: str
) -> None:
    res = invoke("generate", "--model", model_dir, "--prompt", "a", "--out", tmp_path / "o", "--device", "cpu", *args)
    assert_user_error(res.output, res.exit_code, message)
    assert not (tmp_path / "o").exists()


def test_api_refuses_non_finite_settings_and_zero_sizes(model_dir: Path) -> None:
    """The library checks too (the command line's checks are a first line, not the only one)."""
    from lightgen.api import LightGenPipeline

    pipe = LightGenPipeline.from_pretrained(model_dir, device="cpu")
    for kwargs in ({"guidance_scale": math.inf}, {"temperature": math.nan}, {"guidance_scale": "4"}):
        with pytest.raises(ValueError, match="finite number"):
            pipe("a", num_inference_steps=2, **kwargs)
    for size in ((0, None, None), (None, 0, None), (None, None, 0), (-32, 32, None)):
        with pytest.raises(ValueError, match="not a positive multiple"):
            pipe.image_size(*size)


def _float_options() -> list[tuple[list[str], str]]:
    """(command path, option) of every float option of `lightgen` and `lightgen shapes`."""
    import typer.main

    found = []

    def walk(group, path: list[str]) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, [*path, name])
                continue
            for p in command.params:
                if getattr(getattr(p, "type_descriptor", None), "annotation", None) is float:
                    found.append(([*path, name], p.opts[0]))

    walk(typer.main.get_command(app), [])
    return found


def test_every_float_option_refuses_inf_and_nan() -> None:
    """A float option declared without `lightgen.options.number` would let inf through."""
    options = _float_options()
    assert {o for _, o in options} >= {"--cfg", "--temperature", "--diversity"}
    for path, option in options:
        for value in ("inf", "-inf", "nan", "1e999"):
            res = invoke(*path, option, value)
            assert_usage_error(res.output, res.exit_code, option)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["geneval", "--samples", "0"], "--samples"),
        (["geneval", "--limit", "0"], "--limit"),
        (["geneval", "--resolution", "0"], "--resolution"),
        (["fid", "--batch-size", "0"], "--batch-size"),
        (["convert-reference", "--heads", "0"], "--heads"),
        (["convert-reference", "--patch-size", "-2"], "--patch-size"),
        (["shapes", "prompts", "--n", "0"], "--n"),
        (["shapes", "prompts", "--seed", "-1"], "--seed"),
        (["shapes", "prompts", "--diversity", "2"], "--diversity"),
        (["shapes", "render", "--samples", "0"], "--samples"),
    ],
)
def test_other_commands_refuse_out_of_range_numbers(args: list[str], option: str) -> None:
    res = invoke(*args)
    assert_usage_error(res.output, res.exit_code, option)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not"),
        (b'{"prompt": "a"}\n\xff\n', "utf-8"),
        (b'{"prompt": 5}\n', "no non-empty string field 'prompt'"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "geneval"])
def test_malformed_prompt_files_are_one_error(model_dir: Path, tmp_path: Path, command: str, text: bytes, message: str):
    (tmp_path / "p.jsonl").write_bytes(text)
    source = ["--prompts", tmp_path / "p.jsonl"] if command == "generate" else ["--metadata", tmp_path / "p.jsonl"]
    res = invoke(command, "--model", model_dir, *source, "--out", tmp_path / "o", "--device", "cpu")
    assert_user_error(res.output, res.exit_code, str(tmp_path / "p.jsonl"), message)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("which", ["image", "mask"])
@pytest.mark.parametrize(("size", "message"), [(20_000, "decompression bomb"), (9_000, "over the limit")])
def test_inpaint_refuses_decompression_bombs(
    model_dir: Path, tmp_path: Path, which: str, size: int, message: str
) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    (tmp_path / f"{which}.png").write_bytes(png_header(size, size))
    res = invoke(
        "inpaint",
        "--model",
        model_dir,
        "--image",
        tmp_path / "image.png",
        "--mask",
        tmp_path / "mask.png",
        "--prompt",
        "a",
        "--out",
        tmp_path / "out.png",
        "--device",
        "cpu",
    )
    assert_user_error(res.output, res.exit_code, str(tmp_path / f"{which}.png"), message)
    assert not (tmp_path / "out.png").exists()


def test_fid_images_refuse_bombs_and_damage(tmp_path: Path) -> None:
    from lightgen.fid import load_image
    from lightgen.images import read_image

    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))
    (tmp_path / "big.png").write_bytes(png_header(9_000, 9_000))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    for i, data in enumerate([b"", b"\x89PNG\r\n\x1a\n", *mutations(buf.getvalue(), 10, SEED)]):
        (tmp_path / f"m{i}.png").write_bytes(data)
    for p in sorted(tmp_path.glob("*.png")):
        try:
            load_image(p)  # a flipped byte in pixel data may still decode
        except ValueError as e:
            assert str(p) in str(e)
    for name, message in (("bomb.png", "decompression bomb"), ("big.png", "over the limit"), ("m0.png", "cannot read")):
        with pytest.raises(ValueError, match=message):
            load_image(tmp_path / name)
    (tmp_path / "warn.png").write_bytes(png_header(10_000, 10_000))  # PIL only warns at this size
    with pytest.raises(ValueError, match="decompression bomb"):
        read_image(tmp_path / "warn.png", max_pixels=10**9)


# ---------------------------------------------------------------------------------------------------- ShapesWorld

SHAPES_METADATA = [
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b'{"tag": "single_object", "include": [{"class": "circle", "count": "1"}]}\n', "count '1' is not an integer"),
    (b'{"tag": [], "include": [{"class": "circle", "count": 1}]}\n', "unknown tag []"),
    (b'{"tag": "counting", "include": [{"class": "circle", "count": 1e308}]}\n', "is not an integer in [1, 5]"),
    (b"\xff\xfe\n", "utf-8"),
]


@pytest.mark.parametrize(("text", "message"), SHAPES_METADATA, ids=lambda x: repr(x)[:30])
def test_shapes_render_refuses_malformed_metadata(tmp_path: Path, text: bytes, message: str) -> None:
    (tmp_path / "meta.jsonl").write_bytes(text)
    res = invoke("shapes", "render", "--metadata", tmp_path / "meta.jsonl", "--out", tmp_path / "out")
    assert_user_error(res.output, res.exit_code, message)
    assert not (tmp_path / "out").exists()


def test_shapes_render_refuses_a_non_list_exclude(tmp_path: Path) -> None:
    line = b'{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "exclude": 5}\n'
    (tmp_path / "meta.jsonl").write_bytes(line)
    res = invoke("shapes", "render", "--metadata", tmp_path / "meta.jsonl", "--out", tmp_path / "out")
    assert_user_error(res.output, res.exit_code, "exclude")


def test_shapes_score_refuses_a_bomb(tmp_path: Path) -> None:
    folder = tmp_path / "00000"
    (folder / "samples").mkdir(parents=True)
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    (folder / "samples" / "0000.png").write_bytes(png_header(20_000, 20_000))
    res = invoke("shapes", "score", tmp_path)
    assert_user_error(res.output, res.exit_code, "decompression bomb")


# ---------------------------------------------------------------------------------------------------- console scripts


def test_console_scripts_give_one_error_line_and_exit_2(model_dir: Path, tmp_path: Path) -> None:
    """The real entry points, as a user runs them: exit code 2, one `error:` line last on stderr, no traceback."""
    (tmp_path / "empty.pth").write_bytes(b"")
    res = script("lightgen", "convert-reference", "--checkpoint", tmp_path / "empty.pth", "--out", tmp_path / "o")
    assert_user_error(res.stderr, res.returncode, "empty file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(with_keys(preset("debug").to_dict(), {"encoder.depth": "16"})))
    res = script("python", "-m", "lightgen", "model-info", "--model", bad)
    assert_user_error(res.stderr, res.returncode, "'encoder.depth' must be an integer, got '16'")
    res = script("lightgen", "generate", "--model", model_dir, "--prompt", "a", "--out", tmp_path / "g", "--cfg", "inf")
    assert_usage_error(res.stderr, res.returncode, "--cfg")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    res = script("lightgen-data", "inspect", tmp_path / "nested")
    assert_user_error(res.stderr, res.returncode, "nested too deeply")


# ---------------------------------------------------------------------------------------------------- lightgen-data


def _hostile_tars(root: Path) -> list[Path]:
    """A tar whose caption JSON holds a lone UTF-16 surrogate, and one whose member header declares 2^40 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, "PNG")
    image = buf.getvalue()
    surrogate = write_tar(root / "surrogate.tar", [("s.png", image), ("s.json", b'{"caption": "\\ud800"}')])
    huge = root / "huge.tar"
    with tarfile.open(huge, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("big.png")
        info.size = len(image)
        tf.addfile(info, io.BytesIO(image))
    with open(huge, "r+b") as f:  # over the end-of-archive blocks: a member whose header lies about its size
        f.seek(-1024, 2)
        info = tarfile.TarInfo("big.json")
        info.size = 1 << 40
        f.write(info.tobuf(format=tarfile.PAX_FORMAT) + b'{"caption": "a red square"}')
    return [surrogate, huge]


def test_encode_latents_rejects_surrogates_and_lying_tar_headers(tmp_path: Path) -> None:
    t5 = make_tiny_t5(tmp_path / "t5")
    srcs = _hostile_tars(tmp_path)
    out = tmp_path / "out"
    res = script(
        "lightgen-data",
        "encode-latents",
        "--input",
        srcs[0],
        "--input",
        srcs[1],
        "--output",
        out,
        "--vae",
        "pixel",
        "--text-encoder",
        t5,
        "--resolution",
        32,
        "--workers",
        0,
        "--quiet",
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr and "MemoryError" not in res.stderr, res.stderr
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["surrogate/s"] == "bad_caption_encoding", reasons
    assert reasons["huge/<unreadable>"] == "bad_tar" and reasons["huge/big"] == "missing_caption", reasons


def _build_captions(src: Path, out: Path) -> subprocess.CompletedProcess:
    return script(
        "lightgen-data",
        "build-captions",
        "--input",
        src,
        "--output",
        out,
        "--n",
        10,
        "--embedder",
        "hash",
        "--workers",
        0,
        "--select",
        "random",
    )


def _kept_and_rejected(out: Path) -> tuple[set[str], int]:
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {c for s in manifest["shards"] for c in pq.read_table(out / s["name"]).column("caption").to_pylist()}
    return kept, pq.read_table(out / "rejects.parquet").num_rows


def test_build_captions_rejects_deeply_nested_json(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"caption": "a red cube"}), "[" * 100_000 + "]" * 100_000, json.dumps({"caption": "two cats"})]
    src.write_text("\n".join(lines) + "\n")
    res = _build_captions(src, tmp_path / "out")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    kept, rejected = _kept_and_rejected(tmp_path / "out")
    assert kept == {"a red cube", "two cats"} and rejected >= 1


def test_build_captions_rejects_an_oversized_csv_field(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(f'caption\na red cube\n"{"x" * (csv.field_size_limit() + 10)}"\ntwo cats\n')
    res = _build_captions(src, tmp_path / "out")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    kept, rejected = _kept_and_rejected(tmp_path / "out")
    assert kept == {"a red cube", "two cats"} and rejected >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lightgen", "generate", "--model", "m", "--prompt", "a", "--out", "o", "--resolution", "0"], "--resolution"),
        (["lightgen", "generate", "--model", "m", "--prompt", "a", "--out", "o", "--cfg", "inf"], "--cfg"),
        (["lightgen-data", "encode-latents", "--output", "o"], "Missing option '--input'"),
        (["lightgen-data", "synthesize", "--input", "i", "--output", "o", "--workers", "x"], "--workers"),
    ],
)
def test_console_scripts_report_usage_errors_in_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    exe = Path(sys.executable).with_name(argv[0])
    res = subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


# ---------------------------------------------------------------------------------------------------- invalid text

# what a shell's $'a red \xff circle' becomes in Python's argv (surrogateescape), and a JSON "\ud800" escape
BAD_TEXTS = [
    ("a red \udcff circle", "byte 0xff at character 6 is not UTF-8"),
    ("a red \ud800 circle", "lone surrogate U+D800 at character 6"),
]


def _inpaint_inputs(tmp_path: Path) -> list[object]:
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "image.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    return ["--image", tmp_path / "image.png", "--mask", tmp_path / "mask.png"]


def test_console_script_refuses_an_undecodable_prompt_argument(model_dir: Path, tmp_path: Path) -> None:
    """`lightgen generate --prompt $'a red \\xff circle'` as a shell runs it: argv bytes that are not UTF-8."""
    argv = [
        BIN / "lightgen",
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "fine",
        "--prompt",
        b"a red \xff circle",
        "--out",
        tmp_path / "o",
        "--device",
        "cpu",
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert_user_error(res.stderr, res.returncode, r"--prompt 2 'a red \udcff circle' is not valid text", "0xff")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("text", "message"), BAD_TEXTS, ids=["argv-byte", "json-surrogate"])
@pytest.mark.parametrize("command", ["generate --prompt", "generate --prompts", "inpaint", "geneval"])
def test_commands_refuse_prompts_that_are_not_valid_text(
    model_dir: Path, tmp_path: Path, command: str, text: str, message: str
) -> None:
    """One error line naming the prompt (its repr) and where it is (argument number, or file and line); nothing
    is written: a prompt file with a bad line is refused as a whole, before any image, not skipped."""
    out = tmp_path / ("o.png" if command == "inpaint" else "o")
    lines = [json.dumps({"prompt": "a blue square"}), json.dumps({"prompt": text})]  # ASCII JSON: "\udcff" escapes
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    source = {
        "generate --prompt": ["--prompt", "a blue square", "--prompt", text],
        "generate --prompts": ["--prompts", tmp_path / "p.jsonl"],
        "inpaint": [*_inpaint_inputs(tmp_path), "--prompt", text],
        "geneval": ["--metadata", tmp_path / "p.jsonl"],
    }[command]
    res = invoke(command.split()[0], "--model", model_dir, *source, "--out", out, "--device", "cpu", "--steps", 2)
    where = {"generate --prompt": "--prompt 2", "inpaint": "--prompt 1"}.get(command, f"{tmp_path / 'p.jsonl'}:2:")
    line = assert_user_error(res.output, res.exit_code, where, repr(text), "is not valid text", message)
    assert "TypeError" not in line and not out.exists()


@pytest.mark.parametrize(("text", "message"), BAD_TEXTS, ids=["argv-byte", "json-surrogate"])
def test_python_api_refuses_prompts_that_are_not_valid_text(model_dir: Path, text: str, message: str) -> None:
    """`LightGenPipeline` (call, inpaint, encode_prompt), `run_generate` and `pad_text`: a ValueError naming the
    prompt and its position, never the tokenizer's TypeError."""
    from lightgen.api import LightGenPipeline
    from lightgen.generate import run_generate
    from lightgen_model import pad_text

    pipe = LightGenPipeline.from_pretrained(model_dir, device="cpu")
    image, mask = Image.new("RGB", (32, 32)), Image.new("L", (32, 32), 255)
    calls = {
        "prompt 1": lambda: pipe(["a blue square", text], num_inference_steps=2),
        "prompt 0": lambda: pipe.inpaint(image, mask, text, num_inference_steps=2),
        "prompt 2": lambda: pipe.encode_prompt(["a", "b", text]),
        "caption 1": lambda: pad_text(captions=["a", text], cfg=pipe.model.cfg, encoder=pipe.text_encoder),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="is not valid text") as e:
            call()
        assert str(e.value).startswith(f"{where} {text!r} is not valid text: {message}"), str(e.value)
    with pytest.raises(ValueError, match=f"prompt 0 {re.escape(repr(text))}"):
        run_generate(pipe, [text], "/nonexistent/never-written", progress=False)
