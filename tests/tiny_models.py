"""Tiny random-weight models saved to disk, so tests exercise the real `from_pretrained` loading code.

Nothing here downloads anything: configs are built in code, weights are seeded random, and tokenizers are
built in memory with the `tokenizers` library over a small vocabulary. Each builder takes well under a second.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Words of ShapesWorld-style captions, so test captions mostly hit real tokens (others map to the unk token).
WORDS = [
    *["a", "an", "the", "photo", "of", "image", "picture", "and", "with", "on", "in", "to", "is", "are"],
    *["one", "two", "three", "four", "five", "six"],
    *["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"],
    *["circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars", "cross", "crosses"],
    *["left", "right", "above", "below", "top", "bottom", "next", "side"],
]
# Captions of 2 to 10 of those words (tiny BERT: one token a word), for text padding tests.
BERT_CAPTIONS = [
    "a red circle",
    "two blue squares left of a green cross",
    "a star",
    "three yellow triangles",
    "a photo of a pink star above a gray square",
    "an orange cross",
    "two circles",
    "a white square",
]


def make_tiny_vae(dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny SD3.5-like `AutoencoderKL` (16 latent channels, stride 8, scale 1.5305, shift 0.0609) in `dir`."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplers -> stride 8
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,  # as in SD3.5's VAE
            use_post_quant_conv=False,
        )
    out = Path(dir)
    vae.save_pretrained(out)
    return out


def _save_tokenizer(out: Path, tok, specials: dict[str, str], max_len: int) -> None:
    """Wrap a `tokenizers.Tokenizer` in the transformers fast tokenizer class and save it beside the model."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials)
    fast.save_pretrained(out)


def _word_level(vocab_words: list[str], unk: str):
    """A lower-casing, whitespace/punctuation-splitting word-level tokenizer over `vocab_words`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def make_tiny_t5(dir: str | Path, seed: int = 0, encoder_only: bool = True) -> Path:
    """Save a tiny T5 (d_model 32, 2 layers) and a T5-like tokenizer (`<pad>`=0, `</s>`=1, `<unk>`=2, appends `</s>`).

    `encoder_only=False` saves a full `T5ForConditionalGeneration`, the layout of the flan-T5 checkpoints.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    vocab = ["<pad>", "</s>", "<unk>", *WORDS]
    cfg = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        feed_forward_proj="gated-gelu",  # as in flan-T5
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (T5EncoderModel if encoder_only else T5ForConditionalGeneration)(cfg)
    out = Path(dir)
    model.save_pretrained(out)
    tok = _word_level(vocab, "<unk>")
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    _save_tokenizer(out, tok, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, 512)
    return out


def make_tiny_bert(dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny `BertModel` (hidden 32, 2 layers) and a BERT-like tokenizer (`[CLS] ... [SEP]`, `[PAD]`=0)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(cfg, add_pooling_layer=False)
    out = Path(dir)
    model.save_pretrained(out)
    tok = _word_level(vocab, "[UNK]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    _save_tokenizer(out, tok, {**specials, "mask_token": "[MASK]"}, 64)
    return out


def save_bert_debug_model(path: str | Path, text_encoder: str, text_key_mask: bool) -> Path:
    """Save the `debug` preset over 32-dim tiny-BERT states (max_text_len 16, no buffer), seeded 0, at `path`."""
    from lightgen_model import LightGen, preset, save_pretrained

    torch.manual_seed(0)
    cfg = preset(
        "debug", text_dim=32, max_text_len=16, text_key_mask=text_key_mask, buffer_size=0, text_encoder=text_encoder
    )
    return save_pretrained(LightGen(cfg), path)


CLIP_SPECIALS = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]


def _tiny_clip_tokenizer(vocab: list[str]):
    """A CLIP-like fast tokenizer (`<|startoftext|> ... <|endoftext|>`, 77 tokens) over `vocab`, built in memory."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = _word_level(vocab, "<|unk|>")
    tok.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)]
    )
    specials = {"pad_token": "<|pad|>", "unk_token": "<|unk|>", "bos_token": "<|startoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=77, eos_token="<|endoftext|>", **specials)


def _tiny_flux_models(vocab_size: int):
    """(transformer, CLIP text model, VAE) in the shapes of diffusers' own Flux pipeline tests."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = T5 d_model
        pooled_projection_dim=32,  # = CLIP projection dim
        axes_dims_rope=[4, 4, 8],
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=77,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return transformer, CLIPTextModel(clip_cfg), vae


def make_tiny_flux(dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random `FluxPipeline` (1+1 transformer blocks, 1-block VAE, tiny CLIP and T5) in `dir`.

    Shapes follow diffusers' own Flux pipeline tests; tokenizers are built in memory over `WORDS`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    out = Path(dir)
    make_tiny_t5(out / "t5", seed=seed)
    clip_vocab = [*CLIP_SPECIALS, *WORDS]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, clip, vae = _tiny_flux_models(len(clip_vocab))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=_tiny_clip_tokenizer(clip_vocab),
        text_encoder_2=T5EncoderModel.from_pretrained(out / "t5"),
        tokenizer_2=AutoTokenizer.from_pretrained(out / "t5"),
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    shutil.rmtree(out / "t5")  # the saved pipeline has its own copy in text_encoder_2 / tokenizer_2
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A webdataset-style tar of (name, payload) members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# Special tokens Qwen2.5-VL's processor and chat format need (names as in the released tokenizer).
QWEN_SPECIALS = [
    *["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    *["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
]
# A chat template with the structure of Qwen2.5-VL's (no system prompt): an image part becomes the vision
# placeholder the processor expands to one pad token per merged image patch.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen25vl(dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random `Qwen2_5_VLForConditionalGeneration` (text: hidden 64, 2 layers; vision: 1 block of width
    32, patch 14, merge 2) and its processor (`Qwen2VLImageProcessor` + an in-memory word-level tokenizer with
    Qwen's special tokens and chat format) in `dir`, loadable with `AutoProcessor` / `from_pretrained`.

    The vocabulary holds `WORDS` plus the tokens of judge answers ("score", ":", "/", digits 0-10, yes, no), so a
    random model can emit parseable and unparseable answers alike.
    """
    from tokenizers import decoders
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    answer_words = ["score", ":", "/", ".", "yes", "no", *[str(i) for i in range(11)]]
    vocab = [*QWEN_SPECIALS, "<unk>", *WORDS, *answer_words]
    ids = {t: i for i, t in enumerate(vocab)}
    tok = _word_level(vocab, "<unk>")
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=4096,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    text = dict(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},  # head_dim 16
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[0],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    out = Path(dir)
    model.save_pretrained(out)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
