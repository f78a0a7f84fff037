"""LightGen network, diffusion head, sampling and inpainting — pure PyTorch."""

from .config import PRESETS, ModelConfig, SamplingDefaults, Stack, preset
from .hub import count_parameters, from_pretrained, load_config, save_pretrained
from .mar import LightGen
from .sampling import generate, inpaint, masked_generation, pixel_mask_to_tokens
from .text import check_text, pad_text

__all__ = [
    "PRESETS",
    "LightGen",
    "ModelConfig",
    "SamplingDefaults",
    "Stack",
    "check_text",
    "count_parameters",
    "from_pretrained",
    "generate",
    "inpaint",
    "load_config",
    "masked_generation",
    "pad_text",
    "pixel_mask_to_tokens",
    "preset",
    "save_pretrained",
]
