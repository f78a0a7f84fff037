"""Sampling, CFG, inpainting, the diffusion schedule and save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_text

from lightgen_model import (
    LightGen,
    from_pretrained,
    generate,
    inpaint,
    load_config,
    masked_generation,
    preset,
    save_pretrained,
)
from lightgen_model.diffusion import Schedule, cosine_betas, space_timesteps
from lightgen_model.sampling import pixel_mask_to_tokens, reveal_counts


def _gen(model: LightGen, seed: int, **kw) -> torch.Tensor:
    text, mask = make_text(3, lengths=[7, 2, 4])
    return generate(
        model.eval(), text, mask, num_iter=kw.pop("num_iter", 6), generator=torch.Generator().manual_seed(seed), **kw
    )


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "linear"), (2.0, "constant")])
def test_generation_is_deterministic_per_seed_and_finite(debug_model: LightGen, cfg: float, schedule: str) -> None:
    a = _gen(debug_model, 1, cfg=cfg, cfg_schedule=schedule)
    b = _gen(debug_model, 1, cfg=cfg, cfg_schedule=schedule)
    c = _gen(debug_model, 2, cfg=cfg, cfg_schedule=schedule)
    assert a.shape == (3, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_generation_at_non_square_resolution(debug_model: LightGen) -> None:
    out = _gen(debug_model, 0, resolution=(48, 32), cfg=2.0)
    assert out.shape == (3, 3, 48, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="30x32"):
        _gen(debug_model, 0, resolution=(30, 32))


def test_cfg_scale_one_equals_conditional_only(debug_model: LightGen) -> None:
    text, mask = make_text(2, lengths=[7, 3])
    tokens, gen = torch.zeros(2, 64, 48), torch.ones(2, 64, dtype=torch.bool)
    run = lambda batched, cfg: masked_generation(
        debug_model.eval(),
        tokens,
        gen,
        (8, 8),
        text,
        mask,
        num_iter=5,
        cfg=cfg,
        generator=torch.Generator().manual_seed(4),
        batch_uncond=batched,
    )
    assert torch.allclose(run(True, 1.0), run(False, 1.0), atol=1e-5)
    assert not torch.allclose(run(True, 3.0), run(False, 1.0), atol=1e-3)  # guidance does change the result


def test_guidance_moves_away_from_unconditional(debug_model: LightGen) -> None:
    head = debug_model.diffloss.eval()
    z_c, z_u = torch.randn(16, 64), torch.randn(16, 64)
    g = lambda: torch.Generator().manual_seed(0)
    cond = head.sample(z_c, None, 1.0, generator=g())
    uncond = head.sample(z_u, None, 1.0, generator=g())
    both = head.sample(z_c, z_u, 1.0, generator=g())
    assert torch.allclose(both, cond, atol=1e-5)
    per_row = head.sample(z_c, z_u, torch.tensor([1.0] * 8 + [3.0] * 8), generator=g())
    assert torch.allclose(per_row[:8], cond[:8], atol=1e-5) and not torch.allclose(per_row[8:], cond[8:])
    assert not torch.allclose(uncond, cond)


def test_reveal_schedule_reveals_everything_once() -> None:
    for n_tok, steps in ((64, 64), (256, 64), (10, 64), (64, 8), (1, 4)):
        n = torch.tensor([n_tok])
        remaining, revealed = n.clone(), []
        for k in range(steps):
            keep = reveal_counts(n, remaining, k, steps)
            revealed.append(int(remaining - keep))
            remaining = keep
        assert sum(revealed) == n_tok and remaining.item() == 0 and min(revealed) >= 0
        assert revealed[0] <= revealed[-1] or n_tok < steps  # cosine: few first, many last


def test_inpainting_keeps_known_tokens_bit_identical(debug_model: LightGen) -> None:
    torch.manual_seed(0)
    lat = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:7] = True  # a box
    masks[1, :, :3] = True  # a band: other samples have other region sizes
    masks[2, 7, 7] = True  # a single token
    text, tmask = make_text(3)
    out = inpaint(
        debug_model.eval(), lat, masks, text, tmask, num_iter=8, cfg=2.0, generator=torch.Generator().manual_seed(0)
    )
    keep = ~masks.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(lat)
    assert torch.equal(out[keep], lat[keep])
    assert not torch.isclose(out[~keep], lat[~keep]).any()  # everything masked was regenerated
    # samples do not leak into each other: changing sample 1's known tokens leaves samples 0 and 2 alone
    lat2 = lat.clone()
    lat2[1] += 1.0
    out2 = inpaint(
        debug_model, lat2, masks, text, tmask, num_iter=8, cfg=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(out2[0], out[0], atol=1e-5) and torch.allclose(out2[2], out[2], atol=1e-5)


def test_pixel_mask_to_tokens() -> None:
    m = torch.zeros(1, 32, 32)
    m[0, 4:9, 0:4] = 1  # rows 4..8 touch token rows 1 and 2
    tok = pixel_mask_to_tokens(m, 4)
    assert tok.shape == (1, 8, 8) and tok[0, 1:3, 0].all() and tok.sum() == 2
    with pytest.raises(ValueError, match="30x32"):
        pixel_mask_to_tokens(torch.zeros(1, 30, 32), 4)


def cumulative_stride(T: int, counts: list[int]) -> list[int]:
    """The reference's respacing rule (improved DDPM's space_timesteps), written out: [0, T) is cut into
    len(counts) sections (the first T % len(counts) one step longer); in a section of `size` steps the position
    advances by (size - 1) / (n - 1) per step as a running float sum and is rounded (1 for a one-step section)."""
    out, start = [], 0
    for i, n in enumerate(counts):
        size = T // len(counts) + (i < T % len(counts))
        pos, stride = 0.0, (size - 1) / (n - 1) if n > 1 else 1
        for _ in range(n):
            out.append(start + round(pos))
            pos += stride
        start += size
    return sorted(set(out))


def test_respacing_matches_the_reference_for_every_step_count() -> None:
    """Reference fidelity: every count 1..1000 picks the reference's timesteps (21 used to differ: 499, not 500)."""
    for n in range(1, 1001):
        want = cumulative_stride(1000, [n])
        assert space_timesteps(1000, n) == want, n
        assert space_timesteps(1000, str(n)) == want, n
    assert 499 in space_timesteps(1000, 21) and 500 not in space_timesteps(1000, 21)
    assert space_timesteps(1000, 1) == [0]
    for spec in ("10,15,20", "3,1,7,2", "1,1", "250,250,250,250"):
        want = cumulative_stride(1000, [int(c) for c in spec.split(",")])
        assert space_timesteps(1000, spec) == want, spec
    for n in range(1, 1001):  # "ddimN": the first integer stride giving exactly N steps, else an error
        stride = next((k for k in range(1, 1000) if len(range(0, 1000, k)) == n), None)
        if stride is None:
            with pytest.raises(ValueError, match=f"exactly {n} of 1000"):
                space_timesteps(1000, f"ddim{n}")
        else:
            assert space_timesteps(1000, f"ddim{n}") == list(range(0, 1000, stride)), n
    for bad in ("ddimx", "10,,2", "0", "600,600", "abc"):
        with pytest.raises(ValueError, match="head steps"):
            space_timesteps(1000, bad)
    tmap = Schedule.respaced(cosine_betas(1000), "ddim25").timestep_map
    assert tmap.tolist() == list(range(0, 1000, 40))


def test_head_step_specs_in_the_config_and_one_head_step(debug_model: LightGen, tmp_path) -> None:
    """A one-step head samples (it used to fail with an index error); specs survive save/load."""
    model = LightGen(debug_model.cfg.replace(num_sampling_steps=1))
    model.load_state_dict(debug_model.state_dict())
    assert model.diffloss.sample_schedule.timestep_map.tolist() == [0]
    out = _gen(model, 0, cfg=2.0, num_iter=3)
    assert torch.isfinite(out).all()
    save_pretrained(LightGen(debug_model.cfg.replace(num_sampling_steps="5,5")), tmp_path / "m")
    assert load_config(tmp_path / "m").num_sampling_steps == "5,5"
    assert from_pretrained(tmp_path / "m").diffloss.sample_schedule.num_steps == 10
    assert from_pretrained(tmp_path / "m", head_steps="ddim20").diffloss.sample_schedule.num_steps == 20
    with pytest.raises(ValueError, match="num_sampling_steps: head steps 'ddim37'"):
        preset("debug", num_sampling_steps="ddim37")


def reference_cfg_per_step(L: int, num_iter: int, cfg: float) -> list[float]:
    """The reference's linear schedule: its mask length for the next round is floor(L cos(pi/2 (k+1)/K)),
    clamped to [1, remaining - 1] at every step (the last too), and the scale is 1 + (cfg - 1)(L - mask_len)/L."""
    out, remaining = [], L
    for step in range(num_iter):
        mask_len = max(1, min(remaining - 1, math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))))
        out.append(1 + (cfg - 1) * (L - mask_len) / L)
        remaining = mask_len
    return out


@pytest.mark.parametrize("schedule", ["linear", "linear-reference", "constant"])
def test_cfg_schedules_per_step(debug_model: LightGen, monkeypatch, schedule: str) -> None:
    """'linear-reference' is the reference's linear schedule step for step, its last step 1 + (cfg-1)(L-1)/L;
    'linear' differs only there (it reaches cfg); 'constant' is cfg throughout (the reference's scripts)."""
    model, seen = debug_model.eval(), []
    real = model.diffloss.sample

    def record(z, z_u, scale, *args, **kw):
        seen.append(sorted(set(scale.tolist())))
        return real(z, z_u, scale, *args, **kw)

    monkeypatch.setattr(model.diffloss, "sample", record)
    _gen(model, 0, cfg=3.0, cfg_schedule=schedule, num_iter=8)  # 8x8 = 64 tokens, every step predicts some
    want = reference_cfg_per_step(64, 8, 3.0)
    if schedule == "linear":
        want[-1] = 3.0
    elif schedule == "constant":
        want = [3.0] * 8
    assert len(seen) == 8 and all(len(s) == 1 for s in seen)
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-6)
    if schedule == "linear-reference":
        assert seen[-1][0] == pytest.approx(1 + 2.0 * 63 / 64)


def test_schedule_respacing() -> None:
    betas = cosine_betas(1000)
    full, same = Schedule(betas), Schedule.respaced(betas, 1000)
    assert torch.allclose(full.sqrt_acp, same.sqrt_acp)
    sub = Schedule.respaced(betas, 100)
    tmap = sub.timestep_map
    assert sub.num_steps == 100 and tmap[0] == 0 and tmap[-1] == 999
    assert torch.allclose(sub.sqrt_acp, full.sqrt_acp[tmap], rtol=1e-5)  # same alpha-bar at the kept steps
    assert np.all(np.diff(tmap.numpy()) > 0)


def test_save_load_roundtrip_is_bit_exact_and_prefers_ema(debug_model: LightGen, tmp_path) -> None:
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in debug_model.state_dict().items()}
    save_pretrained(debug_model, tmp_path / "m")
    raw = from_pretrained(tmp_path / "m")
    for k, v in debug_model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v), k
    assert torch.equal(_gen(raw, 3, cfg=2.0), _gen(debug_model, 3, cfg=2.0))
    save_pretrained(debug_model, tmp_path / "e", ema_state=ema)
    loaded = from_pretrained(tmp_path / "e")
    assert torch.equal(loaded.z_proj.weight, ema["z_proj.weight"])
    assert torch.equal(from_pretrained(tmp_path / "e", use_ema=False).z_proj.weight, debug_model.z_proj.weight)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "e").iterdir())
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "missing")


def test_per_row_generators_reproduce_single_image_results(debug_model):
    """A batch with one generator per row gives each row the image it gets when generated alone."""
    from lightgen_model import generate

    model = debug_model.eval()
    text, mask = make_text(3, lengths=[7, 4, 5], seed=2)
    seeds = [11, 12, 13]
    batch = generate(
        model, text, mask, num_iter=4, cfg=2.0, generator=[torch.Generator().manual_seed(s) for s in seeds]
    )
    for i, s in enumerate(seeds):
        alone = generate(
            model, text[i : i + 1], mask[i : i + 1], num_iter=4, cfg=2.0, generator=torch.Generator().manual_seed(s)
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-4)
    other = generate(
        model, text, mask, num_iter=4, cfg=2.0, generator=[torch.Generator().manual_seed(s + 1) for s in seeds]
    )
    assert not torch.allclose(batch, other)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        generate(model, text, mask, num_iter=2, generator=[torch.Generator(), torch.Generator()])
