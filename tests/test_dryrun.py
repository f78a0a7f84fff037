"""Dry runs at full size on the meta device: every real model's code path, FLOPs, memory, wrong pairings."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from train_utils import user_error
from typer.testing import CliRunner

from lightgen.fullsize import MODELS_DIR, lightgen_config, lightgen_model
from lightgen.meta import measure
from lightgen_model import preset
from pipeline.cli import app as data_app
from pipeline.core.dryrun import dry_pairs, dry_synthesize
from pipeline.stages.dpo_pairs.config import PairsConfig
from pipeline.stages.synthesize import SynthConfig
from training import pretrain
from training.config import load_config
from training.dryrun import dry_train, expected_mask_ratio
from training.pretrain import PretrainTrainer

ROOT = Path(__file__).resolve().parent.parent


def test_meter_counts_what_flop_counter_mode_counts():
    """The meter applies FlopCounterMode's registry itself (faster): both count the same on one training step."""
    with torch.device("meta"):
        model = lightgen_model(preset("debug"))
    lat = lambda: torch.empty(3, 3, 32, 32, device="meta")
    text = lambda: torch.empty(3, 7, 384, device="meta")
    step = lambda: model(lat(), text(), generator=torch.Generator().manual_seed(0)).backward()
    with FlopCounterMode(display=False) as fc:
        m, _ = measure(step)
    assert m.flops > 0 and m.flops == fc.get_total_flops()
    assert m.peak_bytes > 0


def test_shadow_values_are_known_inputs_only():
    """Counts of masks made on meta are read; a value computed from unknown data (an activation) is refused."""
    from lightgen.meta import MetaValueError

    def counts():
        mask = torch.rand(4, 10, device="meta") < 2.0  # all True, whatever the draw
        return int(mask.sum()), torch.tensor([3, 4], device="meta").tolist(), mask[mask].shape

    _, (n, listed, shape) = measure(counts)
    assert (n, listed, tuple(shape)) == (40, [3, 4], (40,))
    with pytest.raises(MetaValueError, match="meta tensor"):
        measure(lambda: float(torch.empty(3, device="meta").sum()))


def analytic_train_flops(cfg, L: int, m: int, Lt: int) -> float:
    """Matmul FLOPs of one image's forward + backward, from the architecture (mar.py, diffusion.py, layers.py).

    Backward is 2x forward for a matmul (input and weight gradients), 1x where the input needs no gradient (the
    first layers of tokens, text and timestep features), 2.5x for attention (five bmms, as torch counts it)."""
    D, W, C, nb, mul = cfg.encoder.dim, cfg.head_width, cfg.token_dim, cfg.buffer_size, cfg.diffusion_batch_mul
    mm = lambda rows, i, o: 2 * rows * i * o
    block = lambda n: 3 * (mm(n, D, 3 * D) + mm(n, D, D) + 2 * mm(n, D, 4 * D)) + 3.5 * 4 * n * n * D
    cross = lambda: 3 * (2 * mm(m, D, D) + mm(Lt, D, 2 * D) + 2 * mm(m, D, 4 * D)) + 3.5 * 4 * m * Lt * D
    v, R, T = L - m, mul * m, cfg.num_train_timesteps
    f = 2 * mm(L, C, D) + cfg.encoder.depth * block(nb + v) + 3 * mm(nb + v, D, D)  # z_proj, encoder, embed
    f += cfg.decoder.depth * block(nb + L)
    f += 2 * mm(Lt, cfg.text_dim, D) + 3 * mm(Lt, D, D) + cfg.text_aligner_depth * block(Lt)  # text aligner
    f += 3 * mm(m, D, D) + cfg.cross.depth * cross()  # last_embed, cross stack
    f += 3 * mm(m, D, W) + 2 * mm(T, 256, W) + 3 * mm(T, W, W)  # cond_embed, timestep table (all T steps)
    f += 2 * mm(R, C, W) + cfg.head_depth * 3 * (2 * mm(R, W, W) + mm(R, W, 3 * W))  # input_proj, res blocks
    f += 3 * (mm(R, W, 2 * W) + mm(R, W, 2 * C))  # final layer
    return f


def test_lightgen_train_flops_equal_the_analytic_count():
    """The 0.79 B model at 256 px: counted FLOPs per image within 2 % of the count from the architecture."""
    cfg = load_config(ROOT / "conf/lightgen_256.yaml", ["data.batch_size=2"])
    r = dry_train(PretrainTrainer, cfg, gpus=8)
    mcfg = preset("lightgen")
    assert r["parameters"] == 792_260_736
    L = 256
    m = max(1, math.ceil(L * expected_mask_ratio(mcfg)))
    want = analytic_train_flops(mcfg, L, m, mcfg.max_text_len)
    assert r["flops_fwd_bwd_per_item"] == pytest.approx(want, rel=0.02)
    assert r["seconds"] < 60


def test_trainer_dry_run_reports_memory_for_ddp_and_fsdp(capsys):
    """training/pretrain.py --dry-run at full size: one JSON report; FSDP2 divides the states by the GPU count."""
    report = pretrain.main(
        ["--config", str(ROOT / "conf/lightgen_256.yaml"), "data.batch_size=4", "--dry-run", "--gpus", "8"]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    P, act, mem = report["parameters"], report["peak_activation_bytes"], report["memory_per_gpu_bytes"]
    ema = 4  # conf/lightgen_256.yaml keeps an EMA
    assert mem["ddp"] == P * (4 + 4 + 8 + ema) + 4 * P + 2 * P + act
    assert mem["fsdp2"] < mem["ddp"] and act > 0
    assert report["flops_optimizer_per_item"] < 1e-3 * report["flops_fwd_bwd_per_item"]


def test_dpo_dry_run_counts_policy_and_reference(capsys):
    """training/dpo.py --dry-run: winner and loser through the policy (forward + backward) and the reference."""
    from training import dpo

    args = ["--config", str(ROOT / "conf/dpo_lightgen.yaml"), "model.init_from=lightgen", "data.batch_size=2"]
    r = dpo.main([*args, "train.grad_checkpointing=false", "--dry-run", "--resolution", "256"])
    with_ckpt = dpo.main([*args, "--dry-run", "--resolution", "256"])  # the policy's forward once more
    pre = dry_train(PretrainTrainer, load_config(ROOT / "conf/lightgen_256.yaml", ["data.batch_size=2"]))
    # two images per pair through forward + backward, two more through the reference's forward (a third of it)
    assert r["flops_fwd_bwd_per_item"] == pytest.approx(pre["flops_fwd_bwd_per_item"] * (2 + 2 / 3), rel=0.02)
    assert with_ckpt["flops_fwd_bwd_per_item"] == pytest.approx(pre["flops_fwd_bwd_per_item"] * 10 / 3, rel=0.02)
    user_error(capsys, lambda: dpo.main([*args[:2], "model.init_from=nowhere", "--dry-run"]), "nowhere")


def test_synthesize_dry_run_flux_dev_full_size():
    """The Flux-dev teacher (11.9 B) through FluxPipeline.__call__ on meta tensors: shapes and FLOPs per step."""
    cfg = SynthConfig(
        inputs=["x"], output="y", teacher="flux", model="FLUX.1-dev", batch_size=1, resolution=256, steps=3
    )
    r = dry_synthesize(cfg)
    items = r["items"]
    assert items["transformer"]["outputs"]["output"] == [1, (256 // 16) ** 2, 64]
    assert items["vae.decode"]["outputs"]["output"] == [1, 3, 256, 256]
    assert items["transformer"]["param_bytes"] == pytest.approx(2 * 11.9e9, rel=0.01)  # bf16
    assert r["flops_per_item"] == sum(v["flops"] for v in items.values())


def test_flux_schnell_is_flux_dev_without_guidance_embedding():
    """conf/models/FLUX.1-schnell builds the same 11.9 B transformer, without the guidance embedder."""
    from lightgen.fullsize import flux_pipeline

    dev, schnell = flux_pipeline("FLUX.1-dev").transformer, flux_pipeline("FLUX.1-schnell").transformer
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert not schnell.config.guidance_embeds and dev.config.guidance_embeds
    assert count(schnell) == pytest.approx(11.9e9, rel=0.01) and count(schnell) < count(dev)


def test_synthesize_dry_run_refuses_a_vae_with_other_channels(tmp_path, capsys):
    """A Flux pipeline directory whose VAE has 4 latent channels: one error line, before anything runs."""
    bad = tmp_path / "flux-bad"
    shutil.copytree(MODELS_DIR / "FLUX.1-dev", bad)
    cfg_file = bad / "vae" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"latent_channels": 4}))
    res = CliRunner().invoke(
        data_app,
        [
            "synthesize",
            "--input",
            "x",
            "--output",
            str(tmp_path / "out"),
            "--teacher",
            "flux",
            "--model",
            str(bad),
            "--dry-run",
        ],
    )
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "latent_channels 4" in lines[0], res.output


def test_encode_dry_run_cli_sd35_vae_and_flan_t5_xxl(tmp_path):
    """lightgen-data encode-latents --dry-run: the stage's own encoders at full size; nothing is written."""
    out = tmp_path / "out"
    res = CliRunner().invoke(
        data_app,
        [
            "encode-latents",
            "--input",
            "x",
            "--output",
            str(out),
            "--vae",
            "stable-diffusion-3.5-large",
            "--text-encoder",
            "flan-t5-xxl",
            "--resolution",
            "512",
            "--batch-size",
            "2",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.strip().splitlines()[-1])
    assert r["items"]["vae.encode (image + flip)"]["outputs"]["moments"] == [2, 32, 64, 64]
    assert r["items"]["text encoder"]["outputs"]["output"] == [2, 128, 4096]
    assert r["items"]["text encoder"]["param_bytes"] == pytest.approx(4.76e9 * 4, rel=0.01)  # float32 default
    assert not out.exists()


def test_pairs_dry_run_judge_sampler_and_encoders():
    """build-dpo-pairs: Qwen2.5-VL-7B judges, the 0.79 B model draws losers, both sides are encoded."""
    cfg = PairsConfig(
        inputs=["x"],
        output="y",
        model="lightgen",
        judge_model="Qwen2.5-VL-7B-Instruct",
        batch_size=1,
        resolution=256,
        steps=2,
        judge_max_pixels=224 * 224,
    )
    r = dry_pairs(cfg)
    items = r["items"]
    judge = items["judge (Qwen2.5-VL prefill)"]
    assert judge["param_bytes"] == pytest.approx(2 * 8.29e9, rel=0.01)
    assert judge["outputs"]["output"] == [1, 64 + 120, 152064]  # 224 px: 16x16 patches -> 64 tokens, + prompt
    assert items["lightgen.generate"]["outputs"]["output"] == [1, 16, 32, 32]
    assert items["vae.decode (losers)"]["outputs"]["output"] == [1, 3, 256, 256]


def test_pairs_dry_run_refuses_a_text_encoder_of_another_width(tmp_path, capsys):
    """CLIP-L (768-dim) as the text encoder of the 4096-dim model: one error line."""
    cfg = PairsConfig(
        inputs=["x"],
        output="y",
        model="lightgen",
        judge_backend="shapes",
        batch_size=1,
        text_encoder=str(MODELS_DIR / "FLUX.1-dev" / "text_encoder"),
    )
    with pytest.raises(ValueError, match="768-dim states; the model expects text_dim 4096") as e:
        dry_pairs(cfg)
    assert "\n" not in str(e.value)


def test_conf_models_lightgen_is_the_preset():
    """conf/models/lightgen/config.json is the `lightgen` preset."""
    assert lightgen_config("lightgen") == preset("lightgen")
