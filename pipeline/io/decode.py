"""Image decoding and validation: bytes -> a checked RGB image, or a `RejectError` with a machine-friendly reason.

Reasons: "empty_file", "undecodable", "truncated", "too_large", "too_small", "bad_mode".
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)


class RejectError(ValueError):
    """A bad input; `.reason` is a short code for the rejects file, `str(e)` a human message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = 64_000_000, min_size: int = 32) -> Image.Image:
    """Decode `data` fully, check its size, apply EXIF orientation and convert it to RGB; raise `RejectError`."""
    if not data:
        raise RejectError("empty_file", "zero-byte image file")
    # PIL reads this module global at load time; a library that set it would make truncated files decode silently
    # (gray-filled), and this pipeline's contract is to reject them.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat its warning as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img.size, max_pixels, min_size)  # from the header, before any pixel is decoded
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except RejectError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectError("too_large", f"decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        raise RejectError("undecodable", "not a recognised image format") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        if "truncated" in str(e).lower():
            raise RejectError("truncated", f"truncated image file: {e}") from e
        raise RejectError("undecodable", f"cannot decode image: {type(e).__name__}: {e}") from e


def _check_size(size: tuple[int, int], max_pixels: int, min_size: int) -> None:
    """Reject images whose header size is too large (bomb) or too small to be useful."""
    w, h = size
    if w * h > max_pixels:
        raise RejectError("too_large", f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    if min(w, h) < min_size:
        raise RejectError("too_small", f"{w}x{h}: smallest side is below min_size={min_size}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to RGB: alpha is composited onto white, 16/32-bit gray is rescaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette transparency is only honoured through RGBA; a plain RGB conversion would show the keyed color.
        return _on_white(img.convert("RGBA")) if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _on_white(img.convert("RGBA"))
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        # CMYK uses PIL's profile-free formula; embedded ICC profiles are not applied.
        return img.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_wide_gray_to_u8(np.asarray(img))).convert("RGB")
    raise RejectError("bad_mode", f"unsupported image mode {mode!r}")


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image onto an opaque white background."""
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_gray_to_u8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit (or 32-bit integer) gray to uint8 by scaling the range, not by clipping at 255."""
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 65535:
        # The usual case (16-bit PNG/TIFF, also loaded as mode "I"): the full 16-bit range maps to 0..255.
        out = a / 257.0
    elif hi > lo:
        # Signed or wider than 16 bits: there is no nominal range, so stretch the observed one.
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def center_crop_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM-style center crop: BOX-halve while the short side >= 2R, BICUBIC-resize it to R, crop -> (R, R, 3) uint8."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    # Repeated BOX halving anti-aliases large downscales cheaply before the single BICUBIC step.
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    # max(..., resolution) guards against rounding the short side one pixel below R.
    size = tuple(max(round(x * scale), resolution) for x in img.size)
    arr = np.asarray(img.resize(size, resample=Image.BICUBIC))  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])
