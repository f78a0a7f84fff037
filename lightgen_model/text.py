"""Text padding: the one way captions' encoder states become a model's text input (training, DPO, generation).

A model with ``text_key_mask=True`` masks padded text out of attention, so rows are zero-padded to the longest
caption of the batch and the mask marks the real tokens. A model with ``text_key_mask=False`` (a converted
reference checkpoint) attends to padding as the reference did, and the reference trained and sampled on text
padded to ``max_text_len`` with the text encoder's own states at the padded positions: those states depend on
the caption, so they are recomputed with the encoder (shards keep unpadded text). Both paths go through
``pad_text``, so a caption gives the same text input in the trainer and in ``LightGenPipeline.encode_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig
from .encoders import TextEncoder

__all__ = ["check_text", "pad_text", "reference_padding"]


def check_text(text: str, what: str) -> str:
    """``text`` unchanged when UTF-8 can encode it (what every tokenizer needs); otherwise a ValueError naming
    ``what`` (e.g. "prompt 3", "p.jsonl:7: prompt"), the text's repr and the offending character.

    Python keeps a byte that is not UTF-8 in a command-line argument or file name as a lone surrogate
    U+DC80..U+DCFF (``surrogateescape``); JSON's ``\\ud800`` escapes give other lone surrogates. Either would make
    the tokenizer fail with a TypeError deep inside generation or training.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        cause = (
            f"byte 0x{code - 0xDC00:02x} at character {e.start} is not UTF-8 (an argument or file in another encoding?)"
            if 0xDC80 <= code <= 0xDCFF
            else f"lone surrogate U+{code:04X} at character {e.start} (a JSON \\u{code:04x} escape?)"
        )
        raise ValueError(f"{what} {text!r} is not valid text: {cause}") from None
    return text


def reference_padding(cfg: ModelConfig | None) -> bool:
    """True when a model expects text padded to ``max_text_len`` with the encoder's own padding states."""
    return cfg is not None and not cfg.text_key_mask


def pad_text(
    rows: Sequence[np.ndarray | Tensor] | None = None,
    captions: Sequence[str] | None = None,
    *,
    cfg: ModelConfig | None = None,
    encoder: TextEncoder | None = None,
) -> tuple[Tensor, Tensor]:
    """(B, Lt, D) float32 text states on the CPU and the (B, Lt) bool mask (True = real token) for a batch.

    ``rows``: the captions' unpadded (L_i, D) states (e.g. from shards); without them ``encoder(captions)``
    computes them. ``cfg`` picks the padding: zeros up to the longest row (no config, or ``text_key_mask``), or
    the reference's (``text_key_mask=False``): ``encoder.encode_padded(captions, cfg.max_text_len)``, i.e. every
    caption re-encoded padded to ``max_text_len`` (its real positions too, in float32, as the reference computed
    them); given ``rows`` must then have the token counts the encoder's tokenizer gives (the same encoder).
    """
    if captions is not None and (rows is None or reference_padding(cfg)):  # the encoder's tokenizer reads them
        for i, caption in enumerate(captions):
            check_text(caption, f"caption {i}")
    if cfg is not None and reference_padding(cfg):
        if captions is None or encoder is None or not hasattr(encoder, "encode_padded"):
            name = getattr(encoder, "name", encoder)
            raise ValueError(
                f"a text_key_mask=False model needs the captions and a text encoder that gives its states at padded "
                f"positions (a transformers encoder) to pad text as the reference did; got encoder {name!r}"
            )
        text, mask = encoder.encode_padded(list(captions), cfg.max_text_len)  # (B, max_text_len, D), (B, Lt)
        if rows is not None:
            _check_lengths(rows, mask, captions)
        return text.float(), mask.bool()
    if rows is None:
        if captions is None or encoder is None:
            raise ValueError("pad_text needs the unpadded rows, or captions and a text encoder")
        rows = encoder(list(captions))
    return _zero_pad(rows, captions)


def _zero_pad(rows: Sequence[np.ndarray | Tensor], captions: Sequence[str] | None) -> tuple[Tensor, Tensor]:
    states = [r.float() if isinstance(r, Tensor) else torch.from_numpy(np.array(r, dtype=np.float32)) for r in rows]
    if not states:
        raise ValueError("no text rows to pad")
    lengths = [s.shape[0] for s in states]
    if min(lengths) == 0:
        i = lengths.index(0)
        raise ValueError(f"no text token for {f'prompt {captions[i]!r}' if captions else f'text row {i}'}")
    text = torch.zeros(len(states), max(lengths), states[0].shape[1])  # (B, Lt, D)
    for i, s in enumerate(states):
        text[i, : s.shape[0]] = s
    mask = torch.arange(text.shape[1])[None] < torch.tensor(lengths)[:, None]  # (B, Lt)
    return text, mask


def _check_lengths(rows: Sequence[np.ndarray | Tensor], mask: Tensor, captions: Sequence[str]) -> None:
    counts = mask.sum(1).tolist()
    for i, (r, n) in enumerate(zip(rows, counts, strict=True)):
        if r.shape[0] != n:
            raise ValueError(
                f"caption {captions[i]!r}: its stored text has {r.shape[0]} tokens, the text encoder's tokenizer "
                f"gives {n}: the shards were encoded by another encoder or max length"
            )
