"""DPO batches pad text as generation does: the pair batch `DPOTrainer.collate` builds for a caption holds the text
`LightGenPipeline.encode_prompt` gives it (as `test_training.py::test_training_pads_text_as_generation_does` checks
for pretraining). For a `text_key_mask=False` (converted-reference) model that is the reference's padding, which
only the trainer's bound `text_pad` gives: a collate that dropped it would train on zero-padded text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import PIXEL_LOGVAR, write_pair_shards

from lightgen_model import LightGen, pad_text, preset, save_pretrained
from training import dist as D
from training import dpo
from training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = [
    "a red circle",
    "two blue squares left of a green cross",
    "a star",
    "three yellow triangles",
    "a photo of a pink star above a gray square",
    "an orange cross",
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path, dict[bool, Path]]:
    """Pair shards whose text a tiny BERT encoded, and two debug models naming it: text_key_mask False and True."""
    from tiny_models import make_tiny_bert

    from lightgen_model.encoders import HFTextEncoder

    root = tmp_path_factory.mktemp("dpo-text")
    bert = make_tiny_bert(root / "bert")
    enc = HFTextEncoder(bert)
    rng = np.random.default_rng(0)
    win, lose = (rng.uniform(-1, 1, (len(CAPTIONS), 3, 32, 32)).astype(np.float32) for _ in range(2))
    lv = np.full_like(win, PIXEL_LOGVAR)
    d = write_pair_shards(
        root / "pairs",
        np.concatenate([win, lv], 1),
        np.concatenate([lose, lv], 1),
        enc(CAPTIONS),
        CAPTIONS,
        text_encoder=enc.name,
    )
    models = {}
    for key_mask in (False, True):
        torch.manual_seed(0)
        cfg = preset(
            "debug", text_dim=32, max_text_len=16, text_key_mask=key_mask, buffer_size=0, text_encoder=enc.name
        )
        models[key_mask] = save_pretrained(LightGen(cfg), root / f"model-{key_mask}")
    return bert, d, models


@pytest.mark.parametrize("key_mask", [False, True])
def test_dpo_pair_batch_pads_text_as_generation_does(pairs, key_mask: bool) -> None:
    from lightgen.api import LightGenPipeline

    bert, d, models = pairs
    overrides = [f"model.init_from={models[key_mask]}", f"dpo.pairs=[{d}]", f"data.text_encoder={bert}"]
    trainer = dpo.DPOTrainer(load_config(ROOT / "conf/dpo_shapes.yaml", overrides))
    mcfg = trainer.model_config(None)
    shard_set = trainer.shard_set(mcfg)
    trainer.text_pad = trainer.text_padding(mcfg, shard_set, D.DistInfo())  # bound as the trainer's build binds it
    refs = np.array(shard_set.first_rows(len(CAPTIONS)))
    batch = trainer.collate()(shard_set, refs, torch.Generator().manual_seed(0))
    pipe = LightGenPipeline.from_pretrained(models[key_mask], vae="pixel", text_encoder=str(bert), device="cpu")
    text, mask = pipe.encode_prompt(batch["captions"])
    assert batch["captions"] == CAPTIONS and batch["winner"].shape == batch["loser"].shape
    assert torch.equal(batch["text"], text) and torch.equal(batch["text_mask"], mask)
    lengths = [2 + len(c.split()) for c in CAPTIONS]  # [CLS] words [SEP]
    assert mask.sum(1).tolist() == lengths
    zero, _ = pad_text([shard_set.decoded(0).text_row(i) for i in range(len(CAPTIONS))])  # the shards' rows
    if key_mask:
        assert text.shape[1] == max(lengths)
    else:  # the reference's padding: max_text_len tokens, the encoder's own (non-zero) states after the caption
        assert text.shape[1] == 16 and zero.shape[1] == max(lengths)
        assert batch["text"][0, lengths[0] :].abs().min() > 0
