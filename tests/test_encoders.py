"""Image tokenizers and text encoders, on tiny random models saved to disk (and the real packaged MiniLM)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_bert, make_tiny_t5, make_tiny_vae

from lightgen_model.encoders import (
    PIXEL_LOGVAR,
    DiffusersVAE,
    HFTextEncoder,
    ImageTokenizer,
    MiniLMEncoder,
    PixelTokenizer,
    TextEncoder,
    build_image_tokenizer,
    build_text_encoder,
    encode_with_flip,
    finite_rows,
    image_tokenizer_name,
    text_encoder_name,
)

SCALE, SHIFT, C = 1.5305, 0.0609, 16
CAPTIONS = [
    "a photo of a red circle",
    "two blue squares left of a green star",
    "three",
    "a yellow triangle above a purple cross and a zebra",  # "zebra" is out of vocabulary
]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def vae(vae_dir: Path) -> DiffusersVAE:
    return DiffusersVAE(vae_dir)


@pytest.fixture(scope="module")
def raw_vae(vae_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def images(B: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images (B, 3, size, size) in [-1, 1]."""
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------------ images


def test_vae_moments_shape_and_normalisation(vae: DiffusersVAE, raw_vae) -> None:
    x = images()
    m = vae(x)
    assert isinstance(vae, ImageTokenizer)
    assert m.shape == (2, 2 * C, 4, 4) and m.dtype == torch.float32 and m.device.type == "cpu"
    assert (vae.latent_channels, vae.stride, vae.scaling_factor, vae.shift_factor) == (C, 8, SCALE, SHIFT)
    with torch.no_grad():
        post = raw_vae.encode(x).latent_dist
    torch.testing.assert_close(m[:, :C], (post.mean - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)
    # Std of the stored (normalised) posterior is scale * the raw std: exp(0.5 logvar_n) == s exp(0.5 logvar).
    torch.testing.assert_close(torch.exp(0.5 * m[:, C:]), SCALE * post.std, atol=1e-6, rtol=1e-5)
    # Pathwise: the same eps gives the normalised version of the raw posterior's sample.
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    sample_n = m[:, :C] + torch.exp(0.5 * m[:, C:]) * eps
    torch.testing.assert_close(sample_n, (post.mean + post.std * eps - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)


def test_vae_decode_inverts_normalisation(vae: DiffusersVAE, raw_vae) -> None:
    x = images(seed=2)
    with torch.no_grad():
        ref = raw_vae.decode(raw_vae.encode(x).latent_dist.mean).sample
    out = vae.decode(vae(x)[:, :C])
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flip_moments_in_one_call(vae: DiffusersVAE) -> None:
    x = images(B=3, seed=3)
    m, mf = encode_with_flip(vae, x)
    assert m.shape == mf.shape == (3, 2 * C, 4, 4)
    torch.testing.assert_close(m, vae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mf, vae(x.flip(-1)), atol=1e-5, rtol=1e-5)
    assert (m - mf).abs().max() > 1e-3


def test_vae_subfolder_layout_and_name(tmp_path: Path) -> None:
    make_tiny_vae(tmp_path / "sd35-repo" / "vae")
    tok = build_image_tokenizer(str(tmp_path / "sd35-repo"))
    assert isinstance(tok, DiffusersVAE) and tok.name.startswith("sd35-repo-")
    assert image_tokenizer_name(str(tmp_path / "sd35-repo")) == tok.name  # the trainer's check loads no weights
    assert image_tokenizer_name("pixel") == "pixel"
    # Same config elsewhere -> same hash suffix: the name does not depend on where the model lives.
    other = build_image_tokenizer(str(make_tiny_vae(tmp_path / "sd35-repo2")))
    assert other.name.split("-")[-1] == tok.name.split("-")[-1]


def test_vae_low_precision_returns_float32(vae_dir: Path, vae: DiffusersVAE) -> None:
    tok = build_image_tokenizer(str(vae_dir), dtype="bfloat16")
    x = images(seed=4)
    m = tok(x)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, vae(x), atol=0.1, rtol=0.05)


def test_vae_rejects_size_not_multiple_of_stride(vae: DiffusersVAE) -> None:
    with pytest.raises(ValueError, match="stride"):
        vae(torch.zeros(1, 3, 20, 32))


def test_pixel_tokenizer_is_exact() -> None:
    tok = build_image_tokenizer("pixel")
    assert isinstance(tok, PixelTokenizer) and isinstance(tok, ImageTokenizer)
    assert (tok.name, tok.latent_channels, tok.stride) == ("pixel", 3, 1)
    x = images(seed=5)
    m, mf = encode_with_flip(tok, x)
    assert m.shape == (2, 6, 32, 32) and m.dtype == torch.float32
    assert torch.equal(m[:, :3], x) and torch.equal(mf[:, :3], x.flip(-1))
    assert (m[:, 3:] == PIXEL_LOGVAR).all()
    assert torch.equal(tok.decode(m[:, :3]), x)


def test_finite_rows() -> None:
    x = torch.zeros(4, 2, 3, 3)
    x[1, 0, 1, 1] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    assert finite_rows(x).tolist() == [True, False, False, True]


def test_image_tokenizer_path_errors(tmp_path: Path, t5_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_image_tokenizer(str(missing))
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_image_tokenizer(str(tmp_path))  # exists, no config
    with pytest.raises(ValueError, match="AutoencoderKL"):
        build_image_tokenizer(str(t5_dir))  # a config, but not a VAE's


# -------------------------------------------------------------------------------------------------------- text


def mask_lengths(model_dir: Path, captions: list[str], max_len: int) -> list[int]:
    """The attention-mask sums the model's own tokenizer gives."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(model_dir)(captions, padding=True, truncation=True, max_length=max_len)
    return [sum(m) for m in enc["attention_mask"]]


def assert_fp16_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to ~1 float16 ulp (the fp32 states agree to ~1e-6; the fp16 rounding may then differ by one ulp)."""
    assert a.shape == b.shape
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-5)


def test_t5_unpadded_states(t5_dir: Path) -> None:
    enc = build_text_encoder(str(t5_dir))
    assert isinstance(enc, HFTextEncoder) and isinstance(enc, TextEncoder)
    assert (enc.dim, enc.max_len) == (32, 128) and enc.name.startswith(t5_dir.name + "-")
    assert text_encoder_name(str(t5_dir)) == enc.name
    out = enc(CAPTIONS)
    assert [o.shape for o in out] == [(n, 32) for n in mask_lengths(t5_dir, CAPTIONS, 128)]
    assert all(o.dtype == np.float16 and np.isfinite(o).all() for o in out)
    assert len({o.shape[0] for o in out}) > 1, "captions of different lengths must give different lengths"
    for caption, batched in zip(CAPTIONS, out, strict=True):
        assert_fp16_close(enc([caption])[0], batched)  # padding does not change the unpadded rows


def test_t5_truncation_and_chunking(t5_dir: Path) -> None:
    long = " ".join(["red circle"] * 40)
    enc = HFTextEncoder(t5_dir, max_len=8, batch_size=2)
    out = enc([*CAPTIONS, long])
    assert out[-1].shape == (8, 32)
    assert [o.shape[0] for o in out] == mask_lengths(t5_dir, [*CAPTIONS, long], 8)
    for a, b in zip(out, HFTextEncoder(t5_dir, max_len=8)([*CAPTIONS, long]), strict=True):
        assert_fp16_close(a, b)


def test_t5_states_padded_as_the_reference(t5_dir: Path) -> None:
    """encode_padded: T5 run on captions padded to max_length, as the reference's T5_Embedding; real positions are
    the unpadded states, padded positions the encoder's own (caption-dependent) states; batching does not matter."""
    enc = HFTextEncoder(t5_dir, max_len=16, batch_size=2)
    states, mask = enc.encode_padded(CAPTIONS, 16)
    assert states.shape == (len(CAPTIONS), 16, 32) and states.dtype == torch.float32 and mask.dtype == torch.bool
    rows = enc(CAPTIONS)
    assert mask.sum(1).tolist() == [r.shape[0] for r in rows]
    for i, r in enumerate(rows):
        assert mask[i, : r.shape[0]].all() and not mask[i, r.shape[0] :].any()  # right padding
        assert_fp16_close(states[i, : r.shape[0]].numpy().astype(np.float16), r)
        assert states[i, r.shape[0] :].abs().sum() > 0
    alone = HFTextEncoder(t5_dir, max_len=16).encode_padded(CAPTIONS[:1], 16)[0]
    torch.testing.assert_close(alone[0], states[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at most 16 tokens, asked for 17"):
        enc.encode_padded(CAPTIONS, 17)


def test_t5_encoder_from_full_encoder_decoder_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model_dir = make_tiny_t5(tmp_path / "flan", encoder_only=False)
    out = build_text_encoder(str(model_dir))(CAPTIONS[:1])[0]
    full = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(CAPTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = full.get_encoder()(**ids).last_hidden_state[0].numpy()
    assert_fp16_close(out, ref.astype(np.float16))


def test_bert_like_via_automodel(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "bert")
    enc = build_text_encoder(str(model_dir), max_len=128)
    assert enc.dim == 32 and enc.max_len == 64, "max_len is capped by the absolute position table"
    out = enc(CAPTIONS)
    assert [o.shape for o in out] == [(n, 32) for n in mask_lengths(model_dir, CAPTIONS, 64)]
    assert out[2].shape[0] == 3, "[CLS] three [SEP]"
    for caption, batched in zip(CAPTIONS, out, strict=True):
        assert_fp16_close(enc([caption])[0], batched)


def test_minilm_packaged_model() -> None:
    enc = build_text_encoder("minilm", max_len=16)
    assert isinstance(enc, MiniLMEncoder)
    assert (enc.name, enc.dim, enc.max_len) == ("minilm", 384, 16) and text_encoder_name("minilm") == "minilm"
    out = enc(["a red circle", "a blue square", " ".join(["red"] * 40)])
    assert [o.shape[0] for o in out] == [5, 5, 16]  # [CLS] a red circle [SEP]; the last one truncated
    assert all(o.dtype == np.float16 and o.shape[1] == 384 for o in out)
    assert not np.allclose(out[0], out[1], atol=1e-2)
    assert math.isclose(float(np.abs(out[0]).mean()), float(np.abs(out[1]).mean()), rel_tol=0.5)


def test_text_encoder_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing-encoder"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_text_encoder(str(missing))
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_text_encoder(str(tmp_path))
