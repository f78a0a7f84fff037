"""DPO batches pad text as generation does: the pair batch `DPOTrainer.collate` builds for a caption holds the text
`LightGenPipeline.encode_prompt` gives it (as `test_training.py::test_training_pads_text_as_generation_does` checks
for pretraining). For a `text_key_mask=False` (converted-reference) model that is the reference's padding, which
only the trainer's bound `text_pad` gives: a collate that dropped it would train on zero-padded text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import BERT_CAPTIONS, make_tiny_bert, save_bert_debug_model
from train_utils import bind_text_padding, random_pair_shards

from lightgen_model import pad_text
from training import dpo
from training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = BERT_CAPTIONS[:6]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path, dict[bool, Path]]:
    """Pair shards whose text a tiny BERT encoded, and two debug models naming it: text_key_mask False and True."""
    from lightgen_model.encoders import HFTextEncoder

    root = tmp_path_factory.mktemp("dpo-text")
    bert = make_tiny_bert(root / "bert")
    enc = HFTextEncoder(bert)
    d = random_pair_shards(root / "pairs", enc(CAPTIONS), CAPTIONS, text_encoder=enc.name)
    models = {k: save_bert_debug_model(root / f"model-{k}", enc.name, text_key_mask=k) for k in (False, True)}
    return bert, d, models


@pytest.mark.parametrize("key_mask", [False, True])
def test_dpo_pair_batch_pads_text_as_generation_does(pairs, key_mask: bool) -> None:
    from lightgen.api import LightGenPipeline

    bert, d, models = pairs
    overrides = [f"model.init_from={models[key_mask]}", f"dpo.pairs=[{d}]", f"data.text_encoder={bert}"]
    trainer = dpo.DPOTrainer(load_config(ROOT / "conf/dpo_shapes.yaml", overrides))
    shard_set = bind_text_padding(trainer)  # trainer.text_pad bound as the trainer's build binds it
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
