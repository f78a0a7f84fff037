"""The encoders of a worker: the image tokenizer (a VAE, or ShapesWorld's pixels) and the text encoder, and the
columns every shard of encoded rows has. Used by encode-latents (images) and build-dpo-pairs (winners and losers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def f16_column(arrays: Sequence[np.ndarray]) -> pa.LargeListArray:
    """Flattened float16 arrays -> a large_list<float16> column without copying per row."""
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float16)
    offsets = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float16), pa.float16()))


class Encoders:
    """The image tokenizer and text encoder of a worker, and what their shards record about them."""

    def __init__(self, vae: str, text_encoder: str, device: str, dtype: str, max_text_len: int, resolution: int):
        from lightgen_model.encoders import build_image_tokenizer, build_text_encoder

        self.tokenizer = build_image_tokenizer(vae, device=device, dtype=dtype)
        self.text = build_text_encoder(text_encoder, device=device, dtype=dtype, max_len=max_text_len)
        self.resolution = resolution
        side = resolution // self.tokenizer.stride
        self.moments_shape = [2 * self.tokenizer.latent_channels, side, side]  # (2C, h, w)

    def columns(self, ids: list[str], captions: list[str], texts: list[np.ndarray]) -> dict[str, pa.Array]:
        """The columns every shard of encoded rows has: id, caption, resolution, moments_shape, text, encoder names."""
        n = len(ids)
        return {
            "id": pa.array(ids, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "resolution": pa.array([self.resolution] * n, pa.int32()),
            "moments_shape": pa.array([self.moments_shape] * n, pa.list_(pa.int32(), 3)),
            "text_len": pa.array([t.shape[0] for t in texts], pa.int32()),
            "text_emb": f16_column(texts),
            "vae": pa.array([self.tokenizer.name] * n, pa.string()),
            "text_encoder": pa.array([self.text.name] * n, pa.string()),
        }

    def meta(self) -> dict[str, Any]:
        """Encoder names and shapes (the trainer checks them)."""
        return {
            "vae": self.tokenizer.name,
            "text_encoder": self.text.name,
            "text_dim": self.text.dim,
            "max_text_len": self.text.max_len,
            "resolution": self.resolution,
            "moments_shape": self.moments_shape,
        }
