"""`lightgen fid`: torchmetrics FID checked against a hand computation; Inception weights loaded safely."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn
from typer.testing import CliRunner, Result

from lightgen.cli import app
from lightgen.fid import compute_fid, list_images, load_inception

runner = CliRunner()


def _fid(tmp_path: Path, *options: str) -> Result:
    """`lightgen fid --real TMP/real --fake TMP/fake OPTIONS` through the CLI runner: its result."""
    return runner.invoke(app, ["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), *options])


class RandomFeatures(nn.Module):
    """A small random network: uint8 images of any size -> 12 features."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 12)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x.float() / 127.5 - 1)), 4)  # (B, 8, 4, 4)
        return self.fc(x.flatten(1))


def _write_images(folder: Path, n: int, seed: int, lo: int, hi: int, sizes=((24, 24),)) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        p = folder / f"sub{i % 2}" / f"{i:03d}.png"  # nested, like a GenEval folder
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(lo, hi, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _hand_fid(net: nn.Module, real: list[Path], fake: list[Path]) -> float:
    """FID from first principles: per-image features, Gaussian fits (numpy), matrix square root (scipy)."""

    def stats(paths):
        with torch.no_grad():
            feats = [
                net(torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)[None])
                for p in paths
            ]
        f = torch.cat(feats).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, s1), (m2, s2) = stats(real), stats(fake)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_the_hand_computation(tmp_path: Path) -> None:
    real = _write_images(tmp_path / "real", 20, 0, 0, 200)
    fake = _write_images(tmp_path / "fake", 23, 1, 60, 256, sizes=((24, 24), (24, 24), (32, 16)))  # mixed sizes
    net = RandomFeatures()
    assert sorted(list_images(tmp_path / "fake")) == sorted(fake)
    value = compute_fid(list_images(tmp_path / "real"), list_images(tmp_path / "fake"), net, batch_size=4)
    expect = _hand_fid(net, real, fake)
    assert expect > 0.1
    assert value == pytest.approx(expect, rel=1e-3)
    same = compute_fid(list_images(tmp_path / "real"), list_images(tmp_path / "real"), net, batch_size=7)
    assert abs(same) < 1e-3 * expect


def _random_inception_weights(path: Path) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception-v3 with random weights (the real file cannot be downloaded), saved as a state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", lambda *a, **k: {}), mock.patch.object(nn.Module, "load_state_dict"):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], "unused")
    state = net.state_dict()
    torch.save(state, path)
    return state


def test_fid_cli_with_local_inception_weights(tmp_path: Path) -> None:
    real = _write_images(tmp_path / "real", 6, 0, 0, 200)
    fake = _write_images(tmp_path / "fake", 5, 1, 60, 256)
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    state = _random_inception_weights(weights)
    net = load_inception(weights, feature=64)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # the file's weights, not a fresh init
    res = _fid(
        tmp_path,
        "--inception-weights",
        str(weights),
        "--feature",
        "64",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "fid.json"),
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "fid.json").read_text())
    assert out["real_images"] == 6 and out["fake_images"] == 5 and out["feature"] == 64
    assert out["fid"] == pytest.approx(_hand_fid(net, real, fake), rel=1e-3)
    assert re.search(r"FID \d+\.\d{4} \(6 real, 5 fake images\)", res.output)


def test_fid_without_weights_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTGEN_INCEPTION_WEIGHTS", raising=False)
    _write_images(tmp_path / "real", 3, 0, 0, 200)
    _write_images(tmp_path / "fake", 3, 1, 0, 200)
    res = _fid(tmp_path)
    assert res.exit_code == 2
    assert "cannot be downloaded here: pass --inception-weights PATH" in res.output, res.output


class _Touch:
    """A pickle payload: unpickling it would create a file (what a malicious weights file could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_weights_that_are_not_plain_tensors_are_refused_unexecuted(tmp_path: Path) -> None:
    _write_images(tmp_path / "real", 3, 0, 0, 200)
    _write_images(tmp_path / "fake", 3, 1, 0, 200)
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": _Touch(marker)}, bad)
    res = _fid(tmp_path, "--inception-weights", str(bad))
    assert res.exit_code == 2 and "refused by torch.load(weights_only=True)" in res.output, res.output
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    res = _fid(tmp_path, "--inception-weights", str(wrong))
    assert res.exit_code == 2 and "not Inception-v3 FID weights" in res.output, res.output
    assert "Conv2d_1a_3x3.conv.weight" in res.output  # names a missing key


@pytest.mark.parametrize(("n_fake", "message"), [(1, "FID needs at least 2 images, found 1"), (None, "does not exist")])
def test_fid_bad_folders(tmp_path: Path, n_fake: int | None, message: str) -> None:
    _write_images(tmp_path / "real", 3, 0, 0, 200)
    if n_fake:
        _write_images(tmp_path / "fake", n_fake, 1, 0, 200)
    res = _fid(tmp_path, "--inception-weights", str(tmp_path / "w.pth"))
    assert res.exit_code == 2 and message in res.output, res.output
