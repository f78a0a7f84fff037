"""The trainer: resume exactness, DDP / FSDP2 on two gloo processes, finetune init, refusals, damaged
checkpoints, non-finite steps, data order."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import BERT_CAPTIONS, make_tiny_bert, save_bert_debug_model
from train_utils import (
    PIXEL_LOGVAR,
    bind_text_padding,
    random_shards,
    run_torchrun,
    user_error,
    write_latent_shards,
)

from lightgen_model import preset
from training import checkpoint as ckpt_io
from training import pretrain
from training.config import load_config
from training.data import ShardSet, latent_batch

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--config", str(ROOT / "conf/debug.yaml"), "log.sample_count=0"]


def train(out: Path, shards: Path, *extra: str) -> dict:
    return pretrain.main([*BASE, f"data.shards=[{shards}]", f"train.out_dir={out}", *extra])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors")) | {
        "ema." + k: v for k, v in load_file(str(ckpt / "model_ema.safetensors")).items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return random_shards(tmp_path_factory.mktemp("data") / "shards", n=48, rows_per_shard=16)


def test_resume_is_bit_exact(tmp_path, shards):
    train(tmp_path / "straight", shards, "train.max_steps=14", "checkpoint.every_steps=100")
    train(tmp_path / "split", shards, "train.max_steps=9", "checkpoint.every_steps=100")  # stops at 9
    assert [d.name for d in ckpt_io.checkpoint_dirs(tmp_path / "split/checkpoints")] == ["step-00000009"]
    summary = train(tmp_path / "split", shards, "train.max_steps=14", "checkpoint.every_steps=100")
    assert summary["step"] == 14
    assert_same(
        weights(tmp_path / "straight/checkpoints/step-00000014"), weights(tmp_path / "split/checkpoints/step-00000014")
    )
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")  # the loss curve, step by step
    a = load_file(str(tmp_path / "straight/checkpoints/step-00000014/optimizer.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-00000014/optimizer.safetensors"))
    assert_same(a, b)
    # crossing an epoch boundary (3 batches of 16 rows per epoch... 6 steps of 8) is part of the comparison
    state = json.loads((tmp_path / "split/checkpoints/step-00000014/state.json").read_text())
    assert state["loader"] == {"epoch": 2, "index": 2}


# the keys of state.json as every version so far wrote them: the counters at the top level, the loader's position
OLD_LAYOUT = {
    "step",
    "elapsed_s",
    "nonfinite",
    "loader",
    "schedule_total",
    "kind",
    "config",
    "optimizer",
    "files",
    "checksum",
}


def test_a_checkpoint_in_the_old_layout_resumes_bit_exact(tmp_path, shards):
    """state.json keeps the layout of the trainer before `TrainState` and the loader owned their state_dict; one
    written field by field in that layout resumes to the uninterrupted run's weights and loss curve."""
    train(tmp_path / "straight", shards, "train.max_steps=10", "checkpoint.every_steps=5")
    run = tmp_path / "old"
    shutil.copytree(tmp_path / "straight", run)
    shutil.rmtree(run / "checkpoints/step-00000010")
    shutil.rmtree(run / "model")
    c5 = run / "checkpoints/step-00000005"
    doc = json.loads((c5 / "state.json").read_text())
    assert set(doc) == OLD_LAYOUT
    old = {
        "step": 5,
        "elapsed_s": 1.25,
        "nonfinite": 0,
        "loader": {"epoch": 0, "index": 5},
        "schedule_total": 10,
        "kind": "pretrain",
        "config": doc["config"],
        "optimizer": doc["optimizer"],
        "files": doc["files"],
    }
    (c5 / "state.json").write_text(json.dumps(old | {ckpt_io.CHECKSUM: ckpt_io.state_checksum(old)}))
    assert ckpt_io.verify(c5) is None
    assert train(run, shards, "train.max_steps=10", "checkpoint.every_steps=5")["step"] == 10
    c10 = "checkpoints/step-00000010"
    assert_same(weights(tmp_path / "straight" / c10), weights(run / c10))
    assert losses(tmp_path / "straight") == losses(run)


class SlowClock:
    """`time` for the trainer's module whose clock advances `step` seconds at every reading: a machine so busy that
    every step takes minutes."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1e9, step

    def time(self) -> float:
        self.now += self.step
        return self.now


def test_the_budget_is_work_the_same_model_however_slow_the_machine(tmp_path, shards, monkeypatch):
    """A budget in steps: the schedule is fixed before the first step, so a run on a (simulated) very slow machine
    gives the same weights, loss curve and learning rates as one on a fast machine."""
    extra = ["train.max_steps=12", "optim.schedule=cosine", "optim.warmup_steps=3", "checkpoint.every_steps=100"]
    train(tmp_path / "fast", shards, *extra)
    from training import trainer

    monkeypatch.setattr(trainer, "time", SlowClock(90.0))
    summary = train(tmp_path / "slow", shards, *extra)
    assert summary["step"] == 12 and summary["stopped_by"] == "max_steps" and summary["elapsed_s"] > 12 * 60
    assert_same(
        weights(tmp_path / "fast/checkpoints/step-00000012"), weights(tmp_path / "slow/checkpoints/step-00000012")
    )
    rows = lambda run: [(r["loss"], r["lr"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())]
    assert rows("fast") == rows("slow")


def test_a_time_budget_anneals_by_its_end_on_a_slow_machine(tmp_path, shards, monkeypatch):
    """With train.budget_minutes the cosine follows the elapsed share of the budget: a machine slower than planned
    trains fewer steps, and its last steps still run at the floor of the schedule."""
    from training import trainer

    monkeypatch.setattr(trainer, "time", SlowClock(30.0))  # a step reads the clock twice: 30 s of training per step
    summary = train(
        tmp_path / "timed",
        shards,
        "train.max_steps=1000",
        "train.budget_minutes=4",
        "optim.lr=1e-3",
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "optim.min_lr_ratio=0.1",
        "checkpoint.every_steps=1000",
    )
    assert summary["stopped_by"] == "budget" and summary["step"] == 8  # 240 s / 30 s
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "timed/metrics.jsonl").read_text().splitlines()]
    shares = [30 * k / 240 for k in range(8)]  # elapsed share of the budget before each step
    expect = [5e-4, 1e-3] + [1e-4 + 9e-4 * 0.5 * (1 + np.cos(np.pi * f)) for f in shares[2:]]
    assert lrs == pytest.approx(expect)
    assert lrs[-1] < 0.15e-3  # annealed: the last step ran near the floor although max_steps was far away


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_resume_matches(tmp_path, shards):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "training/pretrain.py"),
        *BASE,
        f"data.shards=[{shards}]",
        f"train.out_dir={out}",
        "train.max_steps=100000",
        "checkpoint.every_steps=0",
        "log.every=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "stopped by signal" in text
    (ckpt,) = ckpt_io.checkpoint_dirs(out / "checkpoints")
    k = int(ckpt.name.split("-")[1])
    assert k >= 5 and ckpt_io.verify(ckpt) is None
    assert not (out / "model").exists()  # an interrupted run does not export a final model
    train(out, shards, f"train.max_steps={k + 3}")
    train(tmp_path / "straight", shards, f"train.max_steps={k + 3}")
    final = f"checkpoints/step-{k + 3:08d}"
    assert_same(weights(out / final), weights(tmp_path / "straight" / final))
    assert losses(out) == losses(tmp_path / "straight")


def torchrun(out: Path, shards: Path, *extra: str) -> str:
    script = ROOT / "training/pretrain.py"
    args = [*BASE, f"data.shards=[{shards}]", f"train.out_dir={out}", "data.batch_size=4", *extra]
    r = run_torchrun(script, *args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_two_process_ddp_resume_and_fsdp_agree(tmp_path, shards):
    out = torchrun(tmp_path / "ddp", shards, "train.max_steps=6")
    assert "2 process(es)" in out and "global batch 8" in out
    torchrun(tmp_path / "ddp_split", shards, "train.max_steps=3")
    torchrun(tmp_path / "ddp_split", shards, "train.max_steps=6")
    ref = weights(tmp_path / "ddp/checkpoints/step-00000006")
    assert_same(ref, weights(tmp_path / "ddp_split/checkpoints/step-00000006"))
    torchrun(tmp_path / "fsdp", shards, "train.max_steps=6", "train.parallel=fsdp")
    fsdp = weights(tmp_path / "fsdp/checkpoints/step-00000006")
    assert ref.keys() == fsdp.keys()
    for k in ref:
        torch.testing.assert_close(fsdp[k], ref[k], rtol=0, atol=1e-6)
    mid = weights(tmp_path / "ddp_split/checkpoints/step-00000003")
    assert any(not torch.equal(mid[k], ref[k]) for k in ref)  # the resumed half really trained


def test_rank_plans_are_disjoint_and_cover(tmp_path):
    d = random_shards(tmp_path / "s", n=64, rows_per_shard=8)  # 8 shards
    s = ShardSet([d])
    for world in (1, 2, 3):
        plans = [s.epoch_batches(0, r, world, 4, seed=1, window=2) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # every rank runs the same number of steps
        seen = np.concatenate([np.concatenate(p) for p in plans])
        keys = {(int(a), int(b)) for a, b in seen}
        assert len(keys) == len(seen)  # no row twice in an epoch
        if world == 1:
            assert len(keys) == 64
    few = ShardSet([random_shards(tmp_path / "few", n=10, rows_per_shard=10)])  # 1 shard, 2 ranks: row-strided
    a, b = (few.epoch_batches(0, r, 2, 2, seed=0, window=4) for r in range(2))
    assert not {tuple(x) for x in np.concatenate(a)} & {tuple(x) for x in np.concatenate(b)}
    e0, e1 = (np.concatenate(s.epoch_batches(e, 0, 1, 4, seed=1, window=2)) for e in (0, 1))
    assert not np.array_equal(e0, e1)  # reshuffled every epoch


def test_flip_and_posterior_sampling(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)
    logvar = np.full_like(mean, np.log(0.25))  # std 0.5
    d = write_latent_shards(
        tmp_path / "s",
        np.concatenate([mean, logvar], 1),
        [np.ones((3, 4), np.float32)] * 8,
        ["c"] * 8,
        moments_flip=np.concatenate([-mean, logvar], 1),
    )
    s = ShardSet([d])
    refs = np.array([[0, i] for i in range(8)])
    g = torch.Generator().manual_seed(0)
    b = latent_batch(s, refs, g, flip=False)
    assert not b["flipped"].any()
    resid = (b["latents"] - torch.from_numpy(mean).half().float()).std().item()
    assert 0.4 < resid < 0.6  # a draw from the posterior, not its mean
    flips = np.concatenate(
        [latent_batch(s, refs, torch.Generator().manual_seed(i), flip=True)["flipped"] for i in range(20)]
    )
    assert 0.35 < flips.mean() < 0.65
    assert b["text"].shape == (8, 3, 4) and b["text_mask"].all()


def test_finetune_initialises_from_a_256_checkpoint_at_a_new_resolution(tmp_path, shards):
    train(tmp_path / "base", shards, "train.max_steps=3")
    big = random_shards(tmp_path / "big", n=16, res=64, rows_per_shard=8)
    out = tmp_path / "ft"
    train(out, big, f"model.init_from={tmp_path / 'base/model'}", "optim.lr_scale=0.1", "train.max_steps=0")
    assert_same(weights(tmp_path / "base/model"), weights(out / "model"))  # 0 steps: exactly the loaded weights
    train(
        out,
        big,
        "train.max_steps=2",
        "checkpoint.resume=never",
        f"model.init_from={tmp_path / 'base/model'}",
        "optim.lr_scale=0.1",
        "optim.warmup_steps=0",
        f"train.out_dir={tmp_path / 'ft2'}",
    )
    rows = [json.loads(x) for x in (tmp_path / "ft2/metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 1e-4])  # 0.1 x the base lr
    assert all(np.isfinite(r["loss"]) for r in rows)
    cfg = json.loads((tmp_path / "ft2/model/config.json").read_text())
    assert cfg["base_resolution"] == 32  # positional tables stay at the base grid and are interpolated to 16x16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vae": "sd35-vae"}, "vae 'sd35-vae' != expected 'pixel'"),
        ({"text_encoder": "t5"}, "text encoder 't5' != expected 'minilm'"),
        ({"schema_version": 99}, "schema version 99"),
        ({"complete": False}, "has not finished"),
        ({"dim": 512}, "512-dim text states"),
    ],
)
def test_mismatched_shards_are_refused(tmp_path, kwargs, message, capsys):
    d = random_shards(tmp_path / "bad", n=8, **kwargs)
    user_error(capsys, lambda: train(tmp_path / "out", d, "train.max_steps=1"), message.replace("(", r"\("))


def test_multi_resolution_needs_consent(tmp_path, capsys):
    a = random_shards(tmp_path / "a", n=16, res=32)
    b = random_shards(tmp_path / "b", n=16, res=64)
    args = [*BASE, f"data.shards=[{a},{b}]", f"train.out_dir={tmp_path / 'o'}", "train.max_steps=4"]
    user_error(capsys, lambda: pretrain.main(args), "several resolutions")
    assert pretrain.main([*args, "data.allow_multi_resolution=true"])["step"] == 4


def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path, shards, capsys):
    out = tmp_path / "run"
    train(out, shards, "train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=3")
    c4, c8 = ckpt_io.checkpoint_dirs(out / "checkpoints")
    with open(c8 / "model.safetensors", "r+b") as f:  # a torn write: half the file
        f.truncate(f.seek(0, 2) // 2)
    (out / "checkpoints" / ".tmp-step-00000012-1").mkdir()  # a partial directory of a crashed save
    assert ckpt_io.verify(c8) is not None and ckpt_io.verify(c4) is None
    train(out, shards, "train.max_steps=8")
    text = capsys.readouterr().out
    assert "skipping damaged checkpoint" in text and "resuming from" in text and "step-00000004" in text
    train(tmp_path / "straight", shards, "train.max_steps=8", "checkpoint.every_steps=4")
    assert_same(weights(out / "checkpoints/step-00000008"), weights(tmp_path / "straight/checkpoints/step-00000008"))
    # flipping one byte is caught by the CRC
    raw = bytearray((c4 / "optimizer.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (c4 / "optimizer.safetensors").write_bytes(bytes(raw))
    assert "CRC" in ckpt_io.verify(c4)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, shards, monkeypatch, capsys):
    real = pretrain.PretrainTrainer.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += 1
        loss, extra = real(self, model, batch)
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), extra

    monkeypatch.setattr(pretrain.PretrainTrainer, "loss", sometimes_nan)
    monkeypatch.setattr(pretrain.Trainer, "_flops_per_image", lambda *a: None)
    s = train(tmp_path / "a", shards, "train.max_steps=6")
    assert s["step"] == 6 and s["nonfinite"] == 2
    rows = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    w = weights(tmp_path / "a/checkpoints/step-00000006")
    assert all(torch.isfinite(v).all() for v in w.values())  # a skipped step never touches the weights

    monkeypatch.setattr(pretrain.PretrainTrainer, "loss", lambda self, m, b: (real(self, m, b)[0] * float("inf"), {}))
    user_error(
        capsys,
        lambda: train(tmp_path / "b", shards, "train.max_steps=10", "train.max_nonfinite=3"),
        "3 consecutive steps with a non-finite loss",
    )


def test_config_errors_name_the_bad_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bacth_size'\]"):
        load_config(ROOT / "conf/debug.yaml", ["data.bacth_size=3"])
    with pytest.raises(ValueError, match="train.parallel"):
        load_config(None, ["train.parallel=zero3"])
    with pytest.raises(ValueError, match=r"train.budget_minutes must be > 0 \(or null\), got 0"):
        load_config(None, ["train.budget_minutes=0"])
    cfg = load_config(ROOT / "conf/debug.yaml", ["model.overrides.encoder.depth=3", "optim.betas=[0.9,0.99]"])
    assert cfg.model.overrides == {"encoder": {"depth": 3}} and cfg.optim.betas == [0.9, 0.99]
    flat = load_config(ROOT / "conf/debug.yaml", ["model.overrides.encoder_depth=3"])  # the flat key of before
    assert preset("debug", **cfg.model.overrides) == preset("debug", **flat.model.overrides)
    for p in sorted((ROOT / "conf").glob("*.yaml")):
        load_config(p)  # every shipped preset parses and validates


def test_grids_and_held_out_scores_sample_with_the_models_settings_unless_told():
    model = preset("shapes")
    cfg = load_config(ROOT / "conf/shapes_learn.yaml")
    for section in (cfg.log, cfg.eval):  # nothing set: the model's recorded settings, all four
        assert model.sampling_defaults().replace(**section.sampling()) == model.sampling_defaults()
    told = load_config(None, ["eval.cfg=1.5", "eval.cfg_schedule=linear", "log.sample_temperature=0.3"])
    assert model.sampling_defaults().replace(**told.eval.sampling()) == model.sampling_defaults().replace(
        cfg=1.5, cfg_schedule="linear"
    )
    assert model.sampling_defaults().replace(**told.log.sampling()).temperature == 0.3
    with pytest.raises(ValueError, match=r"eval: cfg schedule .* got 'cosine'"):
        load_config(None, ["eval.cfg_schedule=cosine"])
    with pytest.raises(ValueError, match=r"log: temperature must be a finite number > 0, got 0"):
        load_config(None, ["log.sample_temperature=0"])


@pytest.mark.slow
def test_loss_falls_on_a_tiny_shapesworld_set(tmp_path):
    from lightgen_model.encoders import build_text_encoder
    from shapesworld import ShapesTeacher, generate_prompts

    recs = generate_prompts(64, seed=3)
    imgs = ShapesTeacher(32).batch(recs, list(range(64)))
    mean = imgs.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    moments = np.concatenate([mean, np.full_like(mean, PIXEL_LOGVAR)], 1)
    texts = build_text_encoder("minilm")([r["caption"] for r in recs])
    d = write_latent_shards(tmp_path / "sw", moments, texts, [r["caption"] for r in recs], rows_per_shard=32)
    train(
        tmp_path / "run",
        d,
        "model.preset=shapes",
        "train.max_steps=120",
        "data.batch_size=16",
        "data.flip=false",
        "checkpoint.every_steps=0",
        "optim.warmup_steps=10",
    )
    curve = losses(tmp_path / "run")
    first, last = np.mean(curve[:10]), np.mean(curve[-20:])
    assert last < 0.6 * first, (first, last)


def test_sample_grid_and_tensorboard(tmp_path, shards):
    from PIL import Image

    out = tmp_path / "run"
    train(out, shards, "train.max_steps=2", "log.sample_count=5", "log.sample_steps=2", "log.tensorboard=true")
    grid = Image.open(out / "samples/step-00000002.png")
    assert grid.size == (5 * 34, 34)  # five 32-px samples with a 2-px gutter, one row
    captions = json.loads((out / "samples/step-00000002.json").read_text())["captions"]
    assert captions == [f"caption {i}" for i in range(5)]  # the fixed prompts: the first captions of the data
    assert list((out / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------- reference fidelity

CAPTIONS = BERT_CAPTIONS


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory):
    """Shards whose text a tiny BERT encoded, and two debug models naming that encoder: one reference-shaped
    (text_key_mask=False, attends to padding), one key-masked."""
    from lightgen_model.encoders import HFTextEncoder

    root = tmp_path_factory.mktemp("bert")
    bert = make_tiny_bert(root / "bert")
    enc = HFTextEncoder(bert)
    rng = np.random.default_rng(0)
    mean = rng.uniform(-1, 1, (len(CAPTIONS), 3, 32, 32)).astype(np.float32)
    moments = np.concatenate([mean, np.full_like(mean, PIXEL_LOGVAR)], 1)
    d = write_latent_shards(root / "shards", moments, enc(CAPTIONS), CAPTIONS, text_encoder=enc.name)
    models = {k: save_bert_debug_model(root / f"model-{k}", enc.name, text_key_mask=k) for k in (False, True)}
    return bert, d, models


def _bound_trainer(model: Path, shards: Path, bert: Path):
    """A pretraining trainer for `model` with its text padding bound as `_run` binds it."""
    cfg = load_config(
        ROOT / "conf/debug.yaml", [f"model.init_from={model}", f"data.shards=[{shards}]", f"data.text_encoder={bert}"]
    )
    trainer = pretrain.PretrainTrainer(cfg)
    return trainer, bind_text_padding(trainer)


@pytest.mark.parametrize("key_mask", [False, True])
def test_training_pads_text_as_generation_does(bert_shards, key_mask):
    """The same caption gives the same padded text in a training batch and in LightGenPipeline.encode_prompt;
    for a text_key_mask=False model that is the reference's: max_text_len tokens, the encoder's own padding states."""
    from lightgen.api import LightGenPipeline
    from lightgen_model import pad_text

    bert, d, models = bert_shards
    trainer, shard_set = _bound_trainer(models[key_mask], d, bert)
    refs = np.array(shard_set.first_rows(len(CAPTIONS)))
    batch = trainer.collate()(shard_set, refs, torch.Generator().manual_seed(0))
    pipe = LightGenPipeline.from_pretrained(models[key_mask], vae="pixel", text_encoder=str(bert), device="cpu")
    text, mask = pipe.encode_prompt(batch["captions"])
    assert batch["captions"] == CAPTIONS
    assert torch.equal(batch["text"], text) and torch.equal(batch["text_mask"], mask)
    lengths = [2 + len(c.split()) for c in CAPTIONS]  # [CLS] words [SEP]
    assert mask.sum(1).tolist() == lengths
    zero, _ = pad_text([shard_set.decoded(0).text_row(i) for i in range(len(CAPTIONS))])  # the old trainer's
    if key_mask:
        assert text.shape[1] == max(lengths) and torch.equal(text, zero)
    else:
        assert text.shape[1] == 16  # max_text_len
        pads = text[0, lengths[0] :]
        assert pads.abs().min() > 0 and not torch.allclose(pads[0], pads[1])  # the encoder's states, not zeros
        torch.testing.assert_close(
            text[:, : zero.shape[1]][mask[:, : zero.shape[1]]], zero[zero.abs().sum(-1) > 0], atol=5e-3, rtol=0
        )  # real tokens: the shards' fp16 states


def test_reference_padded_model_trains_and_checks_its_encoder(tmp_path, bert_shards, capsys):
    bert, d, models = bert_shards
    summary = train(
        tmp_path / "run",
        d,
        f"model.init_from={models[False]}",
        f"data.text_encoder={bert}",
        "train.max_steps=2",
        "optim.weight_decay_groups=reference",
    )
    assert summary["step"] == 2 and all(np.isfinite(losses(tmp_path / "run")))
    user_error(
        capsys,
        lambda: train(
            tmp_path / "x", d, f"model.init_from={models[False]}", "data.text_encoder=minilm", "train.max_steps=1"
        ),
        "is not the one the shards were encoded with",
    )
    user_error(
        capsys,
        lambda: train(tmp_path / "y", d, f"model.init_from={models[False]}", "train.max_steps=1"),
        "set data.text_encoder=DIR",
    )


def test_weight_decay_groups_default_and_reference():
    """'reference' is the reference's add_weight_decay (no decay on 1-D, biases, the head only: the 3-D tables,
    mask token and null text are decayed); 'default' also spares those."""
    from lightgen_model import LightGen, preset
    from training.config import OptimSection
    from training.optim import build_optimizer, param_groups

    model = LightGen(preset("debug", buffer_size=0))
    name = {id(p): n for n, p in model.named_parameters()}
    names = lambda group: {name[id(p)] for p in group["params"]}  # noqa: E731
    ref_decay, ref_none = param_groups(model, 0.02, "reference")
    spared = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias") or "diffloss" in n}
    assert names(ref_none) == spared and ref_decay["weight_decay"] == 0.02 and ref_none["weight_decay"] == 0.0
    tables = {
        "encoder_pos_embed_learned",
        "decoder_pos_embed_learned",
        "last_pos_embed_learned",
        "mask_token",
        "fake_latent",
    }
    decay, none = param_groups(model, 0.02)
    assert tables <= names(ref_decay) and tables <= names(none)
    assert names(decay) == names(ref_decay) - tables
    opt = build_optimizer(model, OptimSection(weight_decay_groups="reference"), 1e-3, torch.device("cpu"))
    assert [len(g["params"]) for g in opt.param_groups] == [len(ref_decay["params"]), len(ref_none["params"])]
    with pytest.raises(ValueError, match="optim.weight_decay_groups"):
        load_config(None, ["optim.weight_decay_groups=timm"])


# ---------------------------------------------------------------------------- held-out evaluation


def test_heldout_score_lands_in_metrics_and_equals_scoring_by_hand(tmp_path, shards):
    """eval.every=2 over 5 steps: scores at steps 2, 4 and the last; each equals sampling that step's checkpoint
    (its EMA weights) through LightGenPipeline with the same settings and seeds and scoring the images by hand, and
    the saved samples are those images."""
    from PIL import Image

    from lightgen.api import LightGenPipeline
    from shapesworld import generate_prompts
    from shapesworld.score import score_image, summarize
    from training.evaluate import save_grid

    out = tmp_path / "run"
    train(
        out,
        shards,
        "train.max_steps=5",
        "checkpoint.every_steps=2",
        "eval.every=2",
        "eval.prompts=7",
        "eval.seeds=[3,4]",
        "eval.steps=3",
        "eval.batch_size=4",
        "eval.cfg=2.0",
        "eval.temperature=0.7",
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [2, 4, 5]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # the score joins its step's row
    records = generate_prompts(7, seed=999_001)  # the demo's held-out scenes
    for step in (4, 5):
        pipe = LightGenPipeline.from_pretrained(out / f"checkpoints/step-{step:08d}", device="cpu")  # EMA weights
        results, first = [], None
        for seed in (3, 4):
            images = pipe(
                [r["prompt"] for r in records],
                num_inference_steps=3,
                guidance_scale=2.0,
                temperature=0.7,
                batch_size=4,
                generator=torch.Generator().manual_seed(seed),
            ).images
            arr = np.stack([np.asarray(im) for im in images])
            first = arr if first is None else first
            results += [
                {"metadata": r, "tag": r["tag"], "correct": score_image(a, r).correct}
                for r, a in zip(records, arr, strict=True)
            ]
        summary = summarize(results)
        expected = {"overall": summary["overall"]} | {t: v["accuracy"] for t, v in summary["tasks"].items()}
        got = next(r["eval"] for r in rows if r["step"] == step)
        assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-4) and got["images"] == 14
        save_grid(first, tmp_path / "hand.png")
        hand, saved = (np.asarray(Image.open(p)) for p in (tmp_path / "hand.png", out / f"eval/step-{step:08d}.png"))
        assert np.array_equal(hand, saved)


def test_heldout_score_is_the_scorers_summary(tmp_path):
    """Against a decoder that returns the teacher's render for every other prompt and a blank canvas for the rest,
    the score is GenEval's summary of score_image: accuracy per category, overall their mean."""
    from contextlib import nullcontext

    from PIL import Image

    from lightgen_model import LightGen, preset
    from shapesworld import ShapesTeacher
    from shapesworld.score import score_image
    from training.config import EvalSection
    from training.evaluate import HeldOutScore, heldout_prompts

    cfg = EvalSection(every=1, prompts=12, seeds=[0, 1], steps=1, batch_size=5)
    records = heldout_prompts(cfg)
    renders = ShapesTeacher(32).batch(records, list(range(12)))

    class EveryOtherRender:
        def __init__(self) -> None:
            self.k = 0

        def decode(self, lat: torch.Tensor) -> torch.Tensor:
            out = torch.ones(len(lat), 3, 32, 32)  # white: nothing to detect
            for i in range(len(lat)):
                j, self.k = self.k % 12, self.k + 1
                if j % 2 == 0:
                    out[i] = torch.from_numpy(renders[j]).permute(2, 0, 1).float() / 127.5 - 1
            return out

    mcfg = preset("debug")
    torch.manual_seed(0)
    got = HeldOutScore(cfg, mcfg, 32, EveryOtherRender(), tmp_path, "cpu")(LightGen(mcfg).eval(), 7, nullcontext)
    correct = [j % 2 == 0 and score_image(renders[j], r).correct for j, r in enumerate(records)]
    tags = list(dict.fromkeys(r["tag"] for r in records))
    per = {t: np.mean([c for c, r in zip(correct, records, strict=True) if r["tag"] == t]) for t in tags}
    assert got["images"] == 24
    assert {t: got[t] for t in tags} == pytest.approx(per, abs=1e-4)
    assert got["overall"] == pytest.approx(np.mean(list(per.values())), abs=1e-4) and 0 < got["overall"] < 1
    assert Image.open(tmp_path / "eval/step-00000007.png").size == (8 * 34, 2 * 34)  # the first seed's 12 samples


def test_metrics_log_rows_reports_and_mfu(tmp_path, monkeypatch, capsys):
    """Every step's row lands in metrics.jsonl; every log.every steps a report gives the window's mean loss over its
    good steps, images/s and MFU = images/s x FLOPs per image / (peak x processes); scores get their own line."""
    from types import SimpleNamespace

    from training import metrics
    from training.dist import DistInfo

    clock = [10.0]
    monkeypatch.setattr(metrics, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(metrics, "peak_flops", lambda device: 1e9)
    quiet = ["log.every=2", "log.tensorboard=false", "log.progress=false", f"train.out_dir={tmp_path}"]
    cfg = load_config(None, [*quiet, "train.max_steps=4", "data.batch_size=4"])  # global batch 4 x 2 processes
    log = metrics.MetricsLog(cfg, DistInfo(world=2), "pretrain", 0, flops_per_image=5e8)
    row = {"lr": 1e-3, "grad_norm": 0.5, "acc": 0.25}
    log.record({"step": 1, "loss": 1.0, "skipped": False} | row, nonfinite=0)
    clock[0] += 2.0
    log.record({"step": 2, "loss": float("nan"), "skipped": True, "eval": {"overall": 0.5}} | row, nonfinite=1)
    log.close()
    text = capsys.readouterr().out
    assert "eval step 2: overall 0.5" in text
    report = next(x for x in text.splitlines() if x.startswith("step 2/4"))
    # 16 images in 2 s = 8 img/s; 8 x 5e8 / (1e9 x 2) = 200 %; the skipped step's NaN is not in the mean
    assert (
        report
        == "step 2/4 | loss 1.0000 | lr 1.00e-03 | gnorm 0.500 | 8.0 img/s | MFU 200.0% | acc 0.25 | non-finite steps 1"
        " | ETA 2s"  # 2 steps left at 1 s a step
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["eval"] == {"overall": 0.5} and rows[0]["acc"] == 0.25
    cfg = load_config(None, [*quiet, "train.max_steps=100", "data.batch_size=8", "train.budget_minutes=1"])
    timed = metrics.MetricsLog(cfg, DistInfo(), "pretrain", 0, None)
    timed.record({"step": 1, "loss": 1.0, "skipped": False} | row, 0, elapsed_s=10.0)
    clock[0] += 1.0
    timed.record({"step": 2, "loss": 1.0, "skipped": False} | row, 0, elapsed_s=15.0)
    timed.close()  # 98 steps left at 0.5 s would be 49 s, but the time budget leaves 45 s
    assert capsys.readouterr().out.splitlines()[-1].endswith("| ETA 45s")


def test_save_pretrained_is_atomic_and_drops_a_stale_ema(tmp_path, monkeypatch):
    """The trainer exports through lightgen_model.save_pretrained: a new directory appears complete or not at all,
    and saving over one without EMA weights removes the old EMA file (from_pretrained would load it otherwise)."""
    from lightgen_model import LightGen, from_pretrained, hub, preset, save_pretrained

    torch.manual_seed(0)
    model = LightGen(preset("debug"))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    real = hub._save_state

    def crash_on_ema(state, path):
        if path.name == hub.EMA_NAME:
            raise OSError("disk full")
        real(state, path)

    monkeypatch.setattr(hub, "_save_state", crash_on_ema)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "m", ema)
    assert not (tmp_path / "m").exists()  # the weights were written, but only under a temporary name
    monkeypatch.setattr(hub, "_save_state", real)
    d = save_pretrained(model, tmp_path / "m", ema)
    assert sorted(p.name for p in d.iterdir()) == sorted([hub.CONFIG_NAME, hub.WEIGHTS_NAME, hub.EMA_NAME])
    assert_same(from_pretrained(d).state_dict(), ema)
    save_pretrained(model, d)  # over the existing directory, without EMA weights
    assert not (d / hub.EMA_NAME).exists()
    assert_same(from_pretrained(d).state_dict(), model.state_dict())
