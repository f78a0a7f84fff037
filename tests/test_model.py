"""The network: shapes, parameter counts, masking of padded text, the reference's block structure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cross_states, make_text, wake_head

from lightgen_model import LightGen, ModelConfig, Stack, count_parameters, from_pretrained, preset, save_pretrained
from lightgen_model.config import PRESETS, STACKS
from lightgen_model.layers import CrossBlock


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 32), (16, 16)])
def test_loss_is_finite_scalar_at_any_grid(debug_model: LightGen, size: tuple[int, int]) -> None:
    lat = torch.randn(3, 3, *size)
    text, mask = make_text(3, lengths=[7, 2, 5])
    loss = debug_model(lat, text, mask)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in debug_model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _draws(model: LightGen, B: int, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shared mask (B, 64), timesteps (mul, B, m) and noise (mul, B, m, C) for the debug model's 8x8 grid."""
    g = torch.Generator().manual_seed(seed)
    mask = model.random_mask(B, 64, torch.device("cpu"), g)
    m, mul = int(mask[0].sum()), model.cfg.diffusion_batch_mul
    t = torch.randint(0, model.diffloss.train_schedule.num_steps, (mul, B, m), generator=g)
    return mask, t, torch.randn(mul, B, m, model.cfg.token_dim, generator=g)


def test_forward_reduction_sets_the_shape_and_draws_only_the_randomness(debug_model: LightGen) -> None:
    """`reduction` alone decides scalar vs (B,); `draws` replaces the random mask, timesteps and noise."""
    lat, (text, mask) = torch.randn(3, 3, 32, 32), make_text(3, lengths=[7, 2, 5])
    m = debug_model.train()
    gen = lambda: torch.Generator().manual_seed(4)
    mean, per = m(lat, text, mask, generator=gen()), m(lat, text, mask, generator=gen(), reduction="none")
    assert mean.shape == () and per.shape == (3,)
    assert torch.allclose(per.mean(), mean, rtol=1e-6)  # every row has the same masked count
    draws = _draws(m, 3)
    given = m(lat, text, mask, draws=draws, reduction="none", vlb=False)
    assert given.shape == (3,) and torch.equal(given, m.sample_losses(lat, text, mask, *draws))
    assert torch.allclose(m(lat, text, mask, draws=draws, vlb=False), given.mean(), rtol=1e-6)
    assert torch.equal(given, m.eval()(lat, text, mask, draws=draws, reduction="none", vlb=False))  # no dropout
    assert not torch.equal(given, m(lat, text, mask, draws=draws, reduction="none"))  # the VLB term counts
    twice = m(
        torch.cat([lat, lat]),
        torch.cat([text, text]),
        torch.cat([mask, mask]),
        reduction="none",
        vlb=False,
        draws=tuple(torch.cat([x, x], dim=0 if i == 0 else 1) for i, x in enumerate(_draws(m, 3))),
    )
    assert torch.equal(twice[:3], twice[3:]) and torch.equal(twice[:3], given)  # rows are independent
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        m(lat, text, mask, reduction="sum")


def test_caption_dropout_only_in_training_without_draws() -> None:
    """text_drop_prob = 1: training swaps every caption for the null text, so the text stops mattering;
    in eval mode or under given draws the caption is always used."""
    torch.manual_seed(0)
    m = wake_head(LightGen(preset("debug", text_drop_prob=1.0)))
    lat, (a, mask), (b, _) = torch.randn(2, 3, 32, 32), make_text(2, seed=1), make_text(2, seed=2)
    loss = lambda text, **kw: m(lat, text, mask, generator=torch.Generator().manual_seed(3), **kw)
    m.train()
    assert torch.equal(loss(a), loss(b))
    draws = _draws(m, 2)
    assert not torch.equal(loss(a, draws=draws), loss(b, draws=draws))
    m.eval()
    assert not torch.equal(loss(a), loss(b))


def test_bf16_forward_keeps_dtype(debug_model: LightGen) -> None:
    m = debug_model.to(torch.bfloat16)
    lat = torch.randn(2, 3, 32, 48, dtype=torch.bfloat16)
    text, mask = make_text(2)
    loss = m(lat, text.bfloat16(), mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the head computes its loss in fp32
    tokens = m.patchify(lat)
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (2, 8 * 12, 48)


def test_patchify_roundtrip_non_square(debug_model: LightGen) -> None:
    lat = torch.randn(2, 3, 32, 48)
    tokens = debug_model.patchify(lat)
    assert tokens.shape == (2, 96, 48)
    assert torch.equal(debug_model.unpatchify(tokens, (8, 12)), lat)
    # token (r, c) holds the pixels of rows 4r..4r+3 and columns 4c..4c+3
    assert torch.equal(tokens[1, 1 * 12 + 2].reshape(3, 4, 4), lat[1, :, 4:8, 8:12])


def test_lightgen_preset_parameter_count() -> None:
    with torch.device("meta"):
        m = LightGen(preset("lightgen"))
    counts = count_parameters(m)
    assert 0.70e9 <= counts["total"] <= 0.82e9
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["diffusion_head"] > 0.09e9  # 8 blocks of width 1536
    with torch.device("meta"):
        assert count_parameters(LightGen(preset("debug")))["total"] < 2e6


def test_padded_text_has_no_effect(debug_model: LightGen) -> None:
    tokens, tmask = torch.randn(2, 64, 48), torch.rand(2, 64) < 0.6
    text, mask = make_text(2, lengths=[3, 7])
    text2 = text.clone()
    text2[0, 3:] = 100 * torch.randn(4, 384)  # only padding changes
    ref = LightGen(debug_model.cfg.replace(text_key_mask=False))  # the reference: no key mask
    ref.load_state_dict(debug_model.state_dict())
    for m, same in ((debug_model, True), (ref, False)):
        m.eval()
        z1, z2 = (cross_states(m, tokens, tmask, t, mask, (8, 8)) for t in (text, text2))
        assert torch.equal(z1[1], z2[1])  # the unpadded sample is untouched either way
        assert torch.equal(z1[0], z2[0]) is same  # the reference is sensitive: proves the test can fail
    m = debug_model.train()
    losses = [
        m(
            torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
            t,
            mask,
            generator=torch.Generator().manual_seed(5),
        )
        for t in (text, text2)
    ]
    assert torch.equal(losses[0], losses[1])


def test_cross_block_residual_starts_from_normalised_query() -> None:
    torch.manual_seed(0)
    blk = CrossBlock(32, 4).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    q = blk.normq(x)
    expect = q + blk.attn(q, blk.normkv(ctx))
    expect = expect + blk.mlp(blk.norm2(expect))
    assert torch.allclose(blk(x, ctx), expect, atol=1e-6)


def test_loss_only_on_masked_tokens_and_cond_projected_once(debug_model: LightGen) -> None:
    seen: dict[str, int] = {}
    head = debug_model.diffloss
    h1 = head.net.cond_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("cond", i[0].shape[0]))
    h2 = head.net.input_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("input", i[0].shape[0]))
    g = torch.Generator().manual_seed(3)
    debug_model(torch.randn(2, 3, 32, 32), *make_text(2), generator=g)
    h1.remove()
    h2.remove()
    g = torch.Generator().manual_seed(3)
    ratio = debug_model.sample_mask_ratio(g)
    n_mask = math.ceil(64 * ratio)
    assert seen["cond"] == 2 * n_mask  # one condition projection per masked token
    assert seen["input"] == 2 * n_mask * debug_model.cfg.diffusion_batch_mul  # noised `mul` times


def test_mask_ratio_distribution() -> None:
    m = LightGen(preset("debug", mask_ratio_min=0.7))
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([m.sample_mask_ratio(g) for _ in range(4000)])
    assert r.min() >= 0.7 and r.max() <= 1.0
    # mean of a normal(1, 0.25) truncated to [0.7, 1]: 1 - 0.25 * (phi(0) - phi(-1.2)) / (0.5 - Phi(-1.2))
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
    Phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
    expect = 1 - 0.25 * (phi(0) - phi(-1.2)) / (0.5 - Phi(-1.2))
    assert abs(r.mean().item() - expect) < 0.005


def test_positional_interpolation_keeps_axes_for_non_square_grids(debug_model: LightGen) -> None:
    h0, w0 = debug_model.cfg.base_grid
    rows = torch.arange(h0).float()[:, None].expand(h0, w0)
    cols = torch.arange(w0).float()[None, :].expand(h0, w0)
    table = torch.zeros(1, h0 * w0, 64)
    table[0, :, 0], table[0, :, 1] = rows.reshape(-1), cols.reshape(-1)
    out = debug_model.pos_embed(table, (4, 16)).reshape(4, 16, 64)
    # channel 0 encodes the row: constant along each row, increasing down; channel 1 the column
    assert torch.allclose(out[..., 0], out[..., :1, 0].expand(4, 16), atol=1e-5)
    assert torch.allclose(out[..., 1], out[:1, :, 1].expand(4, 16), atol=1e-5)
    assert (out[1:, 0, 0] > out[:-1, 0, 0]).all() and (out[0, 1:, 1] > out[0, :-1, 1]).all()
    assert torch.equal(debug_model.pos_embed(table, (h0, w0)), table)


def test_zero_visible_tokens_skip_the_encoder() -> None:
    torch.manual_seed(0)
    m = LightGen(preset("debug", buffer_size=0)).eval()
    calls = []
    m.encoder_blocks[0].register_forward_hook(lambda mod, i, o: calls.append(i[0].shape))
    tokens = torch.randn(2, 64, 48)
    out = m.encode_decode(tokens, torch.ones(2, 64, dtype=torch.bool), (8, 8))
    assert calls == [] and torch.isfinite(out).all()
    # with the tokens masked, their values cannot matter
    assert torch.equal(out, m.encode_decode(tokens * 5, torch.ones(2, 64, dtype=torch.bool), (8, 8)))
    m.encode_decode(tokens, torch.rand(2, 64) < 0.5, (8, 8))
    assert len(calls) == 1


def test_uneven_visible_counts_equal_per_sample_results(debug_model: LightGen) -> None:
    """Padding the encoder for rows with fewer visible tokens gives each row its own unpadded result."""
    m = debug_model.eval()
    tokens = torch.randn(2, 64, 48)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.3], [0.8]])
    both = m.encode_decode(tokens, mask, (8, 8))
    for b in range(2):
        alone = m.encode_decode(tokens[b : b + 1], mask[b : b + 1], (8, 8))
        assert torch.allclose(both[b], alone[0], atol=1e-5)


def test_config_rejects_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown ModelConfig keys: \\['encoder_dimm'\\]"):
        ModelConfig.from_dict({"encoder_dimm": 3})
    with pytest.raises(ValueError, match="prediction"):
        preset("debug", prediction="x0")
    with pytest.raises(ValueError, match="not divisible"):
        preset("debug", encoder_heads=3)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="33x32"):
        preset("debug").grid_for(33, 32)


def test_config_json_has_an_object_per_stack_and_reads_the_flat_keys_of_earlier_versions(tmp_path) -> None:
    cfg = preset("shapes")
    d = cfg.to_dict()
    assert d["encoder"] == d["decoder"] == d["cross"] == {"dim": 128, "depth": 2, "heads": 4}
    assert "encoder_dim" not in d
    flat = {k: v for k, v in d.items() if k not in STACKS} | {f"{s}_{k}": v for s in STACKS for k, v in d[s].items()}
    assert ModelConfig.from_dict(flat) == cfg
    m = LightGen(cfg)
    save_pretrained(m, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(flat))  # as an earlier version wrote it
    loaded = from_pretrained(tmp_path)
    assert loaded.cfg == cfg and all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a stack's fields change one by one, named either way; the other stacks keep theirs
    deeper = cfg.replace(encoder_depth=3)
    assert deeper == cfg.replace(encoder={"depth": 3}) == cfg.replace(encoder=Stack(128, 3, 4))
    assert deeper.encoder == Stack(128, 3, 4) and deeper.decoder == deeper.cross == Stack(128, 2, 4)
    assert preset("shapes", cross={"heads": 8}).cross == preset("shapes", cross_heads=8).cross == Stack(128, 2, 8)
    with pytest.raises(ValueError, match="config keys 'cross_heads' and 'cross.heads' both give the cross stack's"):
        ModelConfig.from_dict(d | {"cross_heads": 8})
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys: \['encoder.width'\]"):
        cfg.replace(encoder={"width": 3})
    with pytest.raises(ValueError, match="config key 'decoder' must be an object with keys dim, depth, heads, got 3"):
        cfg.replace(decoder=3)
    with pytest.raises(ValueError, match=r"config key 'cross.depth' must be an integer in \[0, 1024\], got -1"):
        ModelConfig(cross=Stack(64, -1, 4))


@pytest.mark.parametrize("name", ["debug", "shapes", "lightgen"])
def test_parameter_estimate_matches_the_network(name: str) -> None:
    """The config's bound on the network size uses an exact count, computed without building anything."""
    from lightgen_model.config import estimate_parameters

    for overrides in ({}, {"learn_sigma": False, "mlp_ratio": 2.5, "buffer_size": 3, "encoder_depth": 0}):
        cfg = preset(name, **overrides)
        with torch.device("meta"):
            assert estimate_parameters(cfg) == count_parameters(LightGen(cfg))["total"], overrides


def test_overfitting_one_batch_drives_loss_down() -> None:
    torch.manual_seed(0)
    m = LightGen(preset("debug", text_drop_prob=0.0)).train()
    g = torch.Generator().manual_seed(0)
    color = torch.rand(4, 3, 1, 1, generator=g) * 2 - 1  # four smooth images: a color plus a vertical ramp
    lat = (color + torch.linspace(-0.3, 0.3, 32)[None, None, :, None]).clamp(-1, 1).expand(4, 3, 32, 32).contiguous()
    text, mask = make_text(4, lengths=[7, 5, 3, 6])
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = m(lat, text, mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first / 5, (first, last)


def test_lightgen_preset_matches_the_reference_checkpoint_layout() -> None:
    """With the behaviour-changing fixes off, names and shapes are those of the reference's fluid_large."""
    with torch.device("meta"):
        m = LightGen(preset("lightgen", buffer_size=0, text_key_mask=False))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expect = {
        "z_proj.weight": (1024, 64),
        "encoder_pos_embed_learned": (1, 256, 1024),
        "encoder_blocks.15.attn.qkv.weight": (3072, 1024),
        "encoder_blocks.15.mlp.fc1.weight": (4096, 1024),
        "decoder_embed.weight": (1024, 1024),
        "mask_token": (1, 1, 1024),
        "decoder_blocks.15.norm2.weight": (1024,),
        "last_embed.weight": (1024, 1024),
        "last_pos_embed_learned": (1, 256, 1024),
        "fake_latent": (1, 1, 1024),
        "text_emb.text_proj.linear_1.weight": (1024, 4096),
        "text_emb.text_proj.linear_2.weight": (1024, 1024),
        "text_emb.text_aligner.5.attn.proj.weight": (1024, 1024),
        "text_emb.text_aligner_norm.weight": (1024,),
        "cross_attn_blocks.15.normq.weight": (1024,),
        "cross_attn_blocks.15.normkv.bias": (1024,),
        "cross_attn_blocks.15.attn.query_linear.weight": (1024, 1024),
        "cross_attn_blocks.15.attn.kv.weight": (2048, 1024),
        "cross_attn_blocks.15.mlp.fc2.weight": (1024, 4096),
        "cross_norm.weight": (1024,),
        "diffloss.net.time_embed.mlp.0.weight": (1536, 256),
        "diffloss.net.cond_embed.weight": (1536, 1024),
        "diffloss.net.input_proj.weight": (1536, 64),
        "diffloss.net.res_blocks.7.adaLN_modulation.1.weight": (4608, 1536),
        "diffloss.net.final_layer.linear.weight": (128, 1536),  # eps and the variance range
    }
    for k, v in expect.items():
        assert shapes.get(k) == v, (k, shapes.get(k))
    prefixes = (
        "z_proj",
        "encoder_",
        "decoder_",
        "mask_token",
        "last_",
        "fake_latent",
        "text_emb.",
        "cross_",
        "diffloss.net.",
    )
    assert all(k.startswith(prefixes) for k in shapes)
    assert not any(k.startswith("encoder_blocks.16") or k.startswith("diffloss.net.res_blocks.8") for k in shapes)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    m = LightGen(preset("debug", text_drop_prob=0.0))
    lat, (text, mask) = torch.randn(2, 3, 32, 32), make_text(2, lengths=[7, 3])
    grads = []
    for on in (False, True):
        m.set_grad_checkpointing(on)
        m.zero_grad()
        m(lat, text, mask, generator=torch.Generator().manual_seed(0)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_sincos_position_init():
    from lightgen_model.mar import sincos_table

    t = sincos_table(8, (3, 4))
    assert t.shape == (12, 8)
    # raster order: row 1, column 2 is index 6; channel 0 = sin(row * 1), channel 4 = sin(col * 1)
    assert t[6, 0].item() == pytest.approx(math.sin(1.0)) and t[6, 4].item() == pytest.approx(math.sin(2.0))
    assert t[6, 2].item() == pytest.approx(math.cos(1.0)) and t[6, 6].item() == pytest.approx(math.cos(2.0))
    m = LightGen(preset("debug", pos_embed_init="sincos"))
    for p in (m.encoder_pos_embed_learned, m.decoder_pos_embed_learned, m.last_pos_embed_learned):
        assert torch.equal(p[0], sincos_table(p.shape[-1], m.cfg.base_grid)) and p.requires_grad
    assert not torch.equal(LightGen(preset("debug")).encoder_pos_embed_learned[0], sincos_table(64, (8, 8)))
    with pytest.raises(ValueError, match="pos_embed_init"):
        preset("debug", pos_embed_init="rope")


def test_a_preset_config_shares_nothing_with_the_table() -> None:
    first = preset("shapes")
    first.sampling["cfg"] = 9.0  # a caller editing its config must not change the next one
    assert preset("shapes").sampling == PRESETS["shapes"]["sampling"] and PRESETS["shapes"]["sampling"]["cfg"] == 2.0
