"""`lightgen convert-reference` on a synthetic checkpoint with the reference's layout at the `debug` size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import make_text, wake_head
from typer.testing import CliRunner

from lightgen.cli import app
from lightgen_model import LightGen, from_pretrained, generate, load_config, preset
from lightgen_model.diffusion import space_timesteps

runner = CliRunner()
# the reference's behaviour (DESIGN.md): no buffer tokens, padded text attended to, DINO's interpolation offset
REFERENCE = {"buffer_size": 0, "text_key_mask": False, "interpolate_offset": 0.1, "prediction": "eps"}


def _args(**over) -> argparse.Namespace:
    """The fields main_fluid.py's argparse gives, at the debug size (num_sampling_steps is a string there)."""
    base = dict(
        model="fluid_debug",
        img_size=32,
        vae_embed_dim=3,
        vae_stride=1,
        patch_size=4,
        max_length=32,
        mask_ratio_min=0.7,
        text_drop_prob=0.1,
        attn_dropout=0.0,
        proj_dropout=0.0,
        diffloss_d=2,
        diffloss_w=64,
        num_sampling_steps="20",
        diffusion_batch_mul=2,
        cfg=1.0,
        output_dir="./out",
    )
    return argparse.Namespace(**(base | over))


def _source() -> tuple[LightGen, dict[str, torch.Tensor]]:
    """A debug-size model in the reference's shape, and a different (EMA) state for it."""
    torch.manual_seed(0)
    model = wake_head(LightGen(preset("debug", **REFERENCE)))
    g = torch.Generator().manual_seed(1)
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    return model, ema


def _checkpoint(path: Path, state: dict, ema: dict | None, args: argparse.Namespace | None) -> Path:
    model = LightGen(preset("debug", **REFERENCE))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 3, 32, 32), torch.randn(2, 5, 384)).backward()
    opt.step()  # a real optimizer state, as the reference saves it
    ckpt = {"model": state, "optimizer": opt.state_dict(), "epoch": 7, "scaler": {"scale": 65536.0}, "args": args}
    if ema is not None:
        ckpt["model_ema"] = ema
    torch.save(ckpt, path)
    return path


def _convert(ckpt: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert-reference", "--checkpoint", str(ckpt), "--out", str(out), *extra])


def test_converted_model_equals_the_source(tmp_path: Path) -> None:
    src, ema = _source()
    ckpt = _checkpoint(tmp_path / "checkpoint-last.pth", src.state_dict(), ema, _args())
    res = _convert(ckpt, tmp_path / "out", "--heads", "4")
    assert res.exit_code == 0, res.output
    assert "from_pretrained loads model_ema" in res.output and "epoch 7" in res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "model_ema.safetensors",
    ]
    cfg = load_config(tmp_path / "out")
    skip = {"vae", "text_encoder", "extra", "sampling"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in skip} == {
        k: v for k, v in src.cfg.to_dict().items() if k not in skip
    }  # every inferred field: widths, depths, heads, token geometry, head, text dim, sampling steps, ...
    # the reference's generation scripts' settings are recorded as the model's sampling defaults
    assert cfg.sampling == {"steps": 64, "cfg": 4.0, "cfg_schedule": "constant", "temperature": 1.0}
    assert cfg.extra["epoch"] == 7 and cfg.extra["reference_args"]["model"] == "fluid_debug"
    # EMA preferred: identical outputs to the source model carrying the EMA weights
    src.load_state_dict(ema)
    src.eval()
    conv = from_pretrained(tmp_path / "out")  # eval mode
    text, mask = make_text(2, lengths=[7, 3])
    lat = torch.randn(2, 3, 32, 32)
    assert torch.equal(
        src(lat, text, mask, torch.Generator().manual_seed(0)), conv(lat, text, mask, torch.Generator().manual_seed(0))
    )
    for res_px in (32, 48):  # 48 px exercises the positional interpolation with the reference's offset
        a = generate(src, text, mask, resolution=res_px, num_iter=4, generator=torch.Generator().manual_seed(3))
        b = generate(conv, text, mask, resolution=res_px, num_iter=4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    raw = from_pretrained(tmp_path / "out", use_ema=False).state_dict()
    assert all(torch.equal(raw[k], v) for k, v in _source()[0].state_dict().items())


def test_heads_come_from_the_model_name_or_must_be_given(tmp_path: Path) -> None:
    src, _ = _source()
    ckpt = _checkpoint(tmp_path / "c.pth", src.state_dict(), None, _args())
    res = _convert(ckpt, tmp_path / "out")
    assert res.exit_code == 2 and "args.model='fluid_debug'" in res.output and "--heads" in res.output, res.output
    # with args.model = fluid_base (12 heads), 64 is not divisible: the error names the field
    ckpt = _checkpoint(tmp_path / "c2.pth", src.state_dict(), None, _args(model="fluid_base"))
    res = _convert(ckpt, tmp_path / "out")
    assert res.exit_code == 2 and "encoder.dim=64 is not divisible by encoder.heads=12" in res.output, res.output
    res = _convert(ckpt, tmp_path / "out", "--heads", "2")  # only raw weights: loads them
    assert res.exit_code == 0 and "from_pretrained loads model" in res.output, res.output
    assert load_config(tmp_path / "out").encoder.heads == 2
    assert not (tmp_path / "out" / "model_ema.safetensors").exists()


def test_token_geometry_without_args_needs_options(tmp_path: Path) -> None:
    src, _ = _source()
    ckpt = _checkpoint(tmp_path / "c.pth", {f"module.{k}": v for k, v in src.state_dict().items()}, None, None)
    res = _convert(ckpt, tmp_path / "out", "--heads", "4")
    assert res.exit_code == 2 and "z_proj takes 48-dim tokens, but latent_channels=16" in res.output, res.output
    res = _convert(
        ckpt, tmp_path / "out", "--heads", "4", "--latent-channels", "3", "--patch-size", "4", "--vae-stride", "1"
    )
    assert res.exit_code == 0, res.output  # DDP's "module." prefix is stripped
    assert load_config(tmp_path / "out").base_resolution == 32


def test_missing_and_extra_keys_are_named(tmp_path: Path) -> None:
    src, ema = _source()
    state = dict(src.state_dict())
    del state["cross_norm.weight"]
    state["diffusion_pos_embed_learned"] = torch.zeros(1, 64, 64)
    ckpt = _checkpoint(tmp_path / "c.pth", state, ema, _args())
    res = _convert(ckpt, tmp_path / "out", "--heads", "4")
    assert res.exit_code == 2, res.output
    assert "'model'" in res.output and "1 missing keys: cross_norm.weight" in res.output
    assert "1 unexpected keys: diffusion_pos_embed_learned" in res.output
    assert not (tmp_path / "out").exists()


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_unsafe_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    src, _ = _source()
    marker = tmp_path / "pwned"
    ckpt = _checkpoint(tmp_path / "c.pth", src.state_dict(), None, _args(hook=_Touch(marker)))
    res = _convert(ckpt, tmp_path / "out", "--heads", "4")
    assert res.exit_code == 2 and "refused by torch.load(weights_only=True)" in res.output, res.output
    assert not marker.exists()
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    res = _convert(tmp_path / "other.pth", tmp_path / "out")
    assert res.exit_code == 2 and "not a reference checkpoint" in res.output, res.output
    res = _convert(tmp_path / "missing.pth", tmp_path / "out")
    assert res.exit_code == 2 and "checkpoint does not exist" in res.output, res.output


def test_config_json_is_plain_json(tmp_path: Path) -> None:
    src, ema = _source()
    ckpt = _checkpoint(tmp_path / "c.pth", src.state_dict(), ema, _args())
    assert _convert(ckpt, tmp_path / "out", "--heads", "4").exit_code == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_key_mask"] is False and cfg["buffer_size"] == 0 and cfg["interpolate_offset"] == 0.1
    assert cfg["text_encoder"] == "google/flan-t5-xxl"


@pytest.mark.parametrize(
    ("spec", "option", "recorded", "timesteps"),
    [
        ("ddim25", None, "ddim25", list(range(0, 1000, 40))),
        ("20", "5,5", "5,5", [0, 125, 250, 374, 499, 500, 625, 750, 874, 999]),
        (None, None, 100, None),  # no args value: the reference's default "100"
    ],
)
def test_reference_head_step_specs_are_accepted(tmp_path: Path, spec, option, recorded, timesteps) -> None:
    """The reference's `num_sampling_steps` forms ("100", "ddimN", "a,b") are kept as given, or replaced by
    --head-steps, and the loaded head samples at the timesteps the reference's `space_timesteps` picks."""
    src, _ = _source()
    ckpt = _checkpoint(tmp_path / "c.pth", src.state_dict(), None, _args(num_sampling_steps=spec))
    res = _convert(ckpt, tmp_path / "out", "--heads", "4", *(["--head-steps", option] if option else []))
    assert res.exit_code == 0, res.output
    assert load_config(tmp_path / "out").num_sampling_steps == recorded
    tmap = from_pretrained(tmp_path / "out").diffloss.sample_schedule.timestep_map.tolist()
    assert tmap == (timesteps or space_timesteps(1000, 100))
    res = _convert(ckpt, tmp_path / "bad", "--heads", "4", "--head-steps", "ddim37")
    assert res.exit_code == 2 and "no integer stride gives exactly 37" in res.output, res.output


def test_converted_model_samples_with_the_reference_settings_by_default(tmp_path: Path) -> None:
    """`lightgen generate` and LightGenPipeline use the recorded constant cfg 4.0 unless told otherwise."""
    from lightgen.api import LightGenPipeline

    src, ema = _source()
    assert (
        _convert(
            _checkpoint(tmp_path / "c.pth", src.state_dict(), ema, _args()), tmp_path / "m", "--heads", "4"
        ).exit_code
        == 0
    )
    pipe = LightGenPipeline.from_pretrained(tmp_path / "m", vae="pixel", text_encoder="minilm", device="cpu")
    st = pipe.sampling_settings()
    assert (st.steps, st.cfg, st.cfg_schedule, st.temperature) == (64, 4.0, "constant", 1.0)
    assert pipe.sampling_settings(guidance_schedule="linear").cfg_schedule == "linear"
    base = [
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "a red circle",
        "--vae",
        "pixel",
        "--text-encoder",
        "minilm",
        "--device",
        "cpu",
        "--steps",
        "2",
    ]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "g" / "generation.json").read_text())["settings"]
    assert (settings["cfg"], settings["cfg_schedule"], settings["temperature"]) == (4.0, "constant", 1.0)
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "o"), "--cfg-schedule", "linear", "--cfg", "2"])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "o" / "generation.json").read_text())["settings"]
    assert (settings["cfg"], settings["cfg_schedule"]) == (2.0, "linear")
