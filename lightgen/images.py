"""Reading image files a user gives the `lightgen` commands (inpaint's image and mask, FID's folders) safely."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

# pixels an input image may have, read from its header before any pixel is decoded: a decompression bomb (a small
# file declaring a huge image) is refused, as in pipeline/io/decode.py
MAX_PIXELS = 64_000_000


def read_image(path: str | Path, mode: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file loaded into memory (converted to ``mode`` if given). A missing file is an OSError; an image
    over ``max_pixels`` (or PIL's own bomb limit), or one PIL cannot decode, a ValueError naming the file."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; treat its warning as a bomb too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: nothing is decoded yet
                if w * h <= max_pixels:
                    return im.convert(mode) if mode else im.copy()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused as a decompression bomb ({e})") from None
    except Exception as e:  # a damaged file makes PIL raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    raise ValueError(f"{path}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (a decompression bomb?)")
