"""Image decoding: poisoned inputs are rejected with the right reason, every mode converts to correct RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.io.decode import RejectError, center_crop_resize, decode_image, to_rgb


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """Serialise an image to bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    """Random RGB image (compresses badly, so a byte cut lands inside the pixel data)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_with_header_size(w: int, h: int) -> bytes:
    """A valid small PNG whose IHDR claims w x h (CRC fixed), i.e. a decompression bomb as seen from the header."""
    data = bytearray(encode(noise_image(32, 32)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + 13 data bytes
    return bytes(data)


def half(data: bytes) -> bytes:
    """The first half of `data`."""
    return data[: len(data) // 2]


POISONED = [
    ("zero_bytes", b"", {}, "empty_file"),
    ("random_bytes", np.random.default_rng(1).bytes(4096), {}, "undecodable"),
    ("text", b"<html>not an image</html>", {}, "undecodable"),
    ("truncated_png", half(encode(noise_image())), {}, "truncated"),
    ("truncated_jpeg", half(encode(noise_image(), "JPEG", quality=95)), {}, "truncated"),
    ("png_header_only", encode(noise_image())[:20], {}, "truncated"),
    ("bomb_20000x20000", png_with_header_size(20000, 20000), {}, "too_large"),  # PIL's DecompressionBombError
    ("bomb_pil_warning", png_with_header_size(10000, 10000), {"max_pixels": 200_000_000}, "too_large"),
    ("over_max_pixels", png_with_header_size(3000, 3000), {"max_pixels": 1_000_000}, "too_large"),
    ("tiny_10x10", encode(noise_image(10, 10)), {}, "too_small"),
    ("thin_1000x8", encode(noise_image(1000, 8)), {}, "too_small"),
    ("float_tiff", encode(Image.new("F", (40, 40), 0.5), "TIFF"), {}, "bad_mode"),
]


@pytest.mark.parametrize("data,kwargs,reason", [p[1:] for p in POISONED], ids=[p[0] for p in POISONED])
def test_poisoned_inputs_are_rejected_with_reason(data: bytes, kwargs: dict, reason: str) -> None:
    with pytest.raises(RejectError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and str(info.value)


def test_size_is_checked_from_the_header_before_decoding() -> None:
    # The pixel data is that of a 32x32 image: decoding it as 3000x3000 would fail as truncated, so "too_large"
    # proves the header check ran first.
    with pytest.raises(RejectError) as info:
        decode_image(png_with_header_size(3000, 3000), max_pixels=1_000_000)
    assert info.value.reason == "too_large"
    with pytest.raises(RejectError) as info:
        decode_image(png_with_header_size(3000, 3000))
    assert info.value.reason == "truncated"


def test_valid_rgb_roundtrip() -> None:
    img = noise_image(48, 40)
    out = decode_image(encode(img))
    assert out.mode == "RGB" and out.size == (48, 40)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def rgb_of(img: Image.Image, fmt: str = "PNG") -> np.ndarray:
    """Encode with `fmt`, decode with decode_image, return the (H, W, 3) array."""
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_red_is_red(fmt: str) -> None:
    px = rgb_of(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), fmt)
    np.testing.assert_allclose(px[20, 20], (255, 0, 0), atol=3)


def palette_image(transparent_index: int | None) -> Image.Image:
    """P image: left half index 0 (red), right half index 1 (blue)."""
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (20, 0, 40, 40))
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


def test_palette_without_transparency() -> None:
    px = rgb_of(palette_image(None))
    assert tuple(px[10, 5]) == (255, 0, 0) and tuple(px[10, 30]) == (0, 0, 255)


def test_palette_transparency_becomes_white() -> None:
    img = palette_image(0)
    data = encode(img, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    px = np.asarray(decode_image(data)).astype(int)
    assert tuple(px[10, 5]) == (255, 255, 255) and tuple(px[10, 30]) == (0, 0, 255)


def test_pa_alpha_composited_on_white() -> None:
    img = Image.new("PA", (40, 40))
    img.putpalette([255, 0, 0] * 256)  # every index is red
    alpha = np.zeros((40, 40), np.uint8)
    alpha[:, 20:] = 255  # left half transparent, right half opaque
    img.putalpha(Image.fromarray(alpha))
    px = np.asarray(decode_image(encode(img, "TIFF"))).astype(int)
    assert tuple(px[10, 5]) == (255, 255, 255) and tuple(px[10, 30]) == (255, 0, 0)


def test_gray_modes() -> None:
    assert tuple(rgb_of(Image.new("L", (40, 40), 128))[5, 5]) == (128, 128, 128)
    la = Image.new("LA", (40, 40), (30, 255))
    la.paste((30, 0), (0, 0, 20, 40))  # left half fully transparent
    px = rgb_of(la)
    assert tuple(px[5, 5]) == (255, 255, 255) and tuple(px[5, 30]) == (30, 30, 30)


def test_one_bit_image() -> None:
    arr = np.zeros((40, 40), bool)
    arr[:, 20:] = True
    px = rgb_of(Image.fromarray(arr).convert("1"))
    assert tuple(px[5, 5]) == (0, 0, 0) and tuple(px[5, 30]) == (255, 255, 255)


@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("TIFF", "I")])
def test_16_bit_gray_ramp_is_scaled_not_clipped(fmt: str, mode: str) -> None:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    arr = np.tile(ramp, (32, 1))  # (32, 256)
    if mode == "I":
        img = Image.fromarray(arr.astype(np.int32))
    else:  # frombytes: PIL's convert("I;16B") clips to 255
        img = Image.frombytes(mode, (256, 32), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert img.mode == mode
    px = rgb_of(img, fmt)
    row = px[0, :, 0]
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == px[..., 2]).all()
    assert (np.diff(row) >= 0).all(), "ramp must stay monotonic"
    assert row[0] == 0 and row[-1] == 255 and len(np.unique(row)) > 200, "full 8-bit range, not clipped"


def test_rgba_alpha_on_white() -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    img.paste((0, 255, 0, 0), (0, 0, 10, 40))  # fully transparent green -> white
    img.paste((255, 0, 0, 128), (10, 0, 20, 40))  # half-transparent red -> pink
    px = rgb_of(img)
    assert tuple(px[5, 5]) == (255, 255, 255)
    np.testing.assert_allclose(px[5, 15], (255, 127, 127), atol=2)
    assert tuple(px[5, 30]) == (255, 0, 0)


def test_unknown_mode_is_bad_mode() -> None:
    with pytest.raises(RejectError) as info:
        to_rgb(Image.new("F", (40, 40)))
    assert info.value.reason == "bad_mode"


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((60, 40, 3), np.uint8)  # stored as 40 wide, 60 tall
    arr[:10, :10] = (255, 0, 0)  # red marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(Image.fromarray(arr), exif=exif.tobytes()))
    assert out.size == (60, 40)
    px = np.asarray(out).astype(int)
    assert tuple(px[5, 55]) == (255, 0, 0), "stored top-left must land top-right after a 90-degree CW turn"
    assert tuple(px[5, 5]) == (0, 0, 0)


def thirds(w: int, h: int) -> Image.Image:
    """Wide (or tall) image split in thirds along its long side: red, green (the center), blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    long_axis = 1 if w >= h else 0
    n = arr.shape[long_axis]
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if long_axis == 1:
            arr[:, sl] = color
        else:
            arr[sl, :] = color
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (1200, 400)])
def test_center_crop_keeps_the_center(size: tuple[int, int]) -> None:
    out = center_crop_resize(thirds(*size), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    inner = out[4:-4, 4:-4].astype(int)  # the crop's borders touch the red/blue thirds through the resize kernel
    assert (inner[..., 1] > 240).all() and (inner[..., 0] < 15).all() and (inner[..., 2] < 15).all()


@pytest.mark.parametrize("size,res", [((40, 50), 64), ((1024, 768), 64), ((257, 255), 128), ((64, 64), 64)])
def test_center_crop_shapes_and_uniform_color(size: tuple[int, int], res: int) -> None:
    out = center_crop_resize(Image.new("RGB", size, (10, 200, 30)), res)
    assert out.shape == (res, res, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out.reshape(-1, 3), np.tile([10, 200, 30], (res * res, 1)), atol=1)


def test_center_crop_identity_at_target_size() -> None:
    img = noise_image(64, 64)
    np.testing.assert_array_equal(center_crop_resize(img, 64), np.asarray(img))
