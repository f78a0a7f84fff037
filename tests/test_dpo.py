"""Diffusion-DPO: the loss against a hand computation, log 2 at the start, learning on toy pairs, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import PIXEL_LOGVAR, random_pair_shards, run_torchrun, user_error, write_pair_shards

from lightgen_model import LightGen, preset, save_pretrained
from training import dpo

ROOT = Path(__file__).resolve().parent.parent


def test_dpo_loss_matches_hand_computation():
    """Diffusion-DPO's convention (its train.py: scale_term = -0.5 * beta_dpo): loss = -log sigmoid(-beta/2 * diff),
    so the paper's beta 5000 means what it means there."""
    pw, pl = torch.tensor([0.30, 0.50, 0.20]), torch.tensor([0.40, 0.45, 0.20])
    rw, rl = torch.tensor([0.35, 0.40, 0.25]), torch.tensor([0.35, 0.50, 0.10])
    beta = 10.0
    loss, extra = dpo.dpo_loss(pw, pl, rw, rl, beta)
    expected, acc, margin = 0.0, 0, 0.0
    for a, b, c, d in zip(pw.tolist(), pl.tolist(), rw.tolist(), rl.tolist(), strict=True):
        diff = (a - c) - (b - d)
        expected += -math.log(1 / (1 + math.exp(0.5 * beta * diff))) / 3
        acc += diff < 0
        margin += -0.5 * beta * diff / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert extra["implicit_acc"].item() == pytest.approx(acc / 3)
    assert extra["reward_margin"].item() == pytest.approx(margin, rel=1e-5)
    same = dpo.dpo_loss(pw, pl, pw, pl, 5000.0)[0]
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)
    # beta = 2k here is the old -log sigmoid(-k * diff): the factor is exactly one half
    diff = (pw - rw) - (pl - rl)
    old = -torch.nn.functional.logsigmoid(-7.0 * diff).mean()
    assert dpo.dpo_loss(pw, pl, rw, rl, 14.0)[0].item() == pytest.approx(old.item(), rel=1e-6)


def test_shared_draws_give_equal_losses_for_equal_inputs(debug_model):
    """Winner and loser see the same mask, timesteps and noise: identical images give identical losses."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    text = torch.randn(2, 5, 384)
    t = dpo.DPOTrainer.__new__(dpo.DPOTrainer)
    mask, tt, noise = t._draws(debug_model, 2, (8, 8), x.device)
    out = debug_model.sample_losses(torch.cat([x, x]), torch.cat([text, text]), None, mask, tt, noise)
    assert torch.equal(out[:2], out[2:])
    assert out.shape == (4,) and (out > 0).all()


def toy_pairs(root: Path, n: int = 32) -> Path:
    """Winners: flat coloured squares on a light background; losers: noise. The text says which colour."""
    rng = np.random.default_rng(0)
    win = np.full((n, 3, 32, 32), 0.8, np.float32)
    colors = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    for i in range(n):
        win[i, :, 8:24, 8:24] = colors[i][:, None, None]
    lose = rng.uniform(-1, 1, (n, 3, 32, 32)).astype(np.float32)
    lv = np.full_like(win, PIXEL_LOGVAR)
    texts = [np.tile(np.concatenate([colors[i], np.zeros(381, np.float32)]), (4, 1)) for i in range(n)]
    return write_pair_shards(root, np.concatenate([win, lv], 1), np.concatenate([lose, lv], 1), texts, ["c"] * n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    save_pretrained(LightGen(preset("debug")), root / "init")
    return root, toy_pairs(root / "pairs")


def run_dpo(root: Path, out: str, *extra: str) -> list[dict]:
    dpo.main(
        [
            "--config",
            str(ROOT / "conf/dpo_shapes.yaml"),
            f"model.init_from={root / 'init'}",
            f"dpo.pairs=[{root / 'pairs'}]",
            f"train.out_dir={root / out}",
            "log.sample_count=0",
            "log.progress=false",
            "log.tensorboard=false",
            "data.batch_size=8",
            "train.budget_minutes=null",
            *extra,
        ]
    )
    return [json.loads(x) for x in (root / out / "metrics.jsonl").read_text().splitlines()]


def test_policy_equal_to_reference_gives_log2(setup):
    root, _ = setup
    rows = run_dpo(root, "start", "train.max_steps=1")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["implicit_acc"] == 0.0 and rows[0]["reward_margin"] == 0.0


def test_dpo_steps_raise_implicit_accuracy(setup):
    root, _ = setup
    rows = run_dpo(root, "learn", "train.max_steps=40", "optim.lr=1e-3", "optim.warmup_steps=0", "dpo.beta=100")
    late = np.mean([r["implicit_acc"] for r in rows[-15:]])
    assert late > 0.5, late
    assert np.mean([r["loss"] for r in rows[-15:]]) < math.log(2)
    assert np.mean([r["reward_margin"] for r in rows[-15:]]) > 0


def test_dpo_needs_a_starting_model(setup, capsys):
    root, _ = setup
    user_error(
        capsys,
        lambda: dpo.main(
            [
                "--config",
                str(ROOT / "conf/dpo_shapes.yaml"),
                f"dpo.pairs=[{root / 'pairs'}]",
                f"train.out_dir={root / 'x'}",
                "model.init_from=null",
            ]
        ),
        "DPO needs model.init_from",
    )


@pytest.mark.slow
def test_two_process_dpo(setup):
    root, _ = setup
    r = run_torchrun(
        ROOT / "training/dpo.py",
        "--config",
        str(ROOT / "conf/dpo_shapes.yaml"),
        f"model.init_from={root / 'init'}",
        f"dpo.pairs=[{root / 'pairs'}]",
        f"train.out_dir={root / 'ddp'}",
        "log.sample_count=0",
        "log.progress=false",
        "log.tensorboard=false",
        "data.batch_size=4",
        "train.max_steps=3",
        "train.budget_minutes=null",
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(x) for x in (root / "ddp/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_offloaded_bf16_reference(setup):
    root, _ = setup
    rows = run_dpo(
        root, "bf16ref", "train.max_steps=2", "dpo.reference_dtype=bfloat16", "dpo.reference_device=cpu", "dpo.beta=100"
    )
    # a bf16 copy of the policy: close to, not exactly, log 2 (at beta 5000 its rounding alone moves the loss a lot)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_reference_padded_model_dpo_starts_at_log2(tmp_path, capsys):
    """A text_key_mask=False (converted-reference) model: pairs' text is re-encoded and padded to max_text_len as
    the reference did (data.text_encoder), and the frozen reference equals the policy at the start."""
    from tiny_models import make_tiny_bert, save_bert_debug_model

    from lightgen_model.encoders import HFTextEncoder

    bert = make_tiny_bert(tmp_path / "bert")
    enc = HFTextEncoder(bert)
    captions = ["a red circle", "two blue squares", "a green cross above a star"] * 4
    pairs = random_pair_shards(tmp_path / "pairs", enc(captions), captions, text_encoder=enc.name)
    save_bert_debug_model(tmp_path / "init", enc.name, text_key_mask=False)
    dpo.main(
        [
            "--config",
            str(ROOT / "conf/dpo_shapes.yaml"),
            f"model.init_from={tmp_path / 'init'}",
            f"dpo.pairs=[{pairs}]",
            f"train.out_dir={tmp_path / 'run'}",
            f"data.text_encoder={bert}",
            "log.sample_count=0",
            "log.progress=false",
            "log.tensorboard=false",
            "data.batch_size=4",
            "train.max_steps=2",
            "train.budget_minutes=null",
        ]
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(rows) == 2
    assert f"text: padded to 16 tokens with {enc.name}'s own states" in capsys.readouterr().out
