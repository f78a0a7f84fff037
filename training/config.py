"""Trainer configuration: YAML presets in `conf/` plus `section.key=value` overrides on the command line.

A config has sections (model, data, optim, train, checkpoint, log, eval; DPO adds dpo). Unknown sections or keys are
errors that name the offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightgen_model.config import SamplingDefaults

DECAY_GROUPS = ("default", "reference")


@dataclass
class ModelSection:
    """The network: a preset with field overrides, or the config and weights of `init_from`."""

    preset: str = "shapes"  # a lightgen_model preset name (ignored when init_from is set)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed from the preset
    init_from: str | None = None  # a model or checkpoint directory to start from (finetune, DPO); a path or a URI


@dataclass
class DataSection:
    """The training shards and how batches are made from them."""

    # training-shard directories (encode-latents outputs): local paths or filesystem URIs (s3://, gs://, file://, ...)
    shards: list[str] = field(default_factory=list)
    batch_size: int = 64  # per process and micro-step; global batch = batch_size * world * grad_accum
    flip: bool = True  # use the stored horizontally flipped moments with p = 0.5 (off for left/right captions)
    allow_multi_resolution: bool = False  # shard sets at several resolutions (batches never mix resolutions)
    shuffle_window: int = 8  # shards whose rows are shuffled together (per epoch, per rank)
    prefetch: int = 4  # batches prepared ahead
    workers: int = 1  # threads preparing batches (raise on GPU machines: collation is CPU work)
    read_ahead: int = 2  # shards read (fetched, verified, parsed) ahead of the batches that need them; 0 = off
    # a local folder keeping verified copies of the shards read (e.g. from s3://), so later epochs need not fetch
    # them again; at most cache_bytes (an int or "200GB", "512MiB"), least recently used evicted first. null = off
    cache_dir: str | None = None
    cache_bytes: int | str = "100GB"
    # text_key_mask=false models (converted reference checkpoints) pad text as the reference did, so each batch's
    # captions are re-encoded: minilm or a local transformers directory, the encoder the shards were made with
    # (default: the model config's text_encoder)
    text_encoder: str | None = None


@dataclass
class OptimSection:
    """AdamW, the learning-rate schedule, clipping, gradient accumulation and the EMA."""

    blr: float = 1e-4  # base learning rate per 256 images of global batch
    lr: float | None = None  # absolute learning rate; overrides blr when set
    lr_scale: float = 1.0  # multiplies the resolved lr (0.1 for the 512-px finetune)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.02  # not on biases, norms, positional tables, learned tokens, the diffusion head
    # "default": as above; "reference": as the reference code (add_weight_decay), which also decays the 3-D
    # positional tables, mask token and null text (for finetuning converted checkpoints the way they were trained)
    weight_decay_groups: str = "default"
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    schedule_steps: int | None = None  # cosine length (default train.max_steps); with train.budget_minutes the cosine
    # also follows the elapsed share of the budget, whichever is further along
    grad_clip: float = 3.0  # 0 disables
    grad_accum: int = 1
    ema_decay: float = 0.9999  # 0 disables the EMA
    fused: bool | None = None  # fused AdamW; None = on CUDA when available


@dataclass
class TrainSection:
    """The run: length, time budget, device, precision, parallelism, seeds."""

    out_dir: str = "runs/train"  # a local folder; on a cluster a shared mount every node sees (not a URI)
    max_steps: int = 1000  # the budget in work: the same schedule, and on a CPU the same model, on any machine
    # also stop after this much training time (summed over resumes); the cosine follows its elapsed share
    budget_minutes: float | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block)
    compile: bool = False  # torch.compile each transformer block and the head
    grad_checkpointing: bool = False
    threads: int | None = None  # CPU threads per process (default: cores / local processes)
    max_nonfinite: int = 20  # stop after this many consecutive non-finite steps
    deterministic: bool = True  # CPU: deterministic kernels, so that resumed runs are bit-exact


@dataclass
class CheckpointSection:
    """When checkpoints are written, how many are kept, and what a run resumes from."""

    every_steps: int = 1000  # 0 disables step-based checkpoints
    every_minutes: float | None = None
    keep_last: int = 3
    resume: str = "auto"  # auto (newest valid checkpoint in out_dir) | never | a checkpoint directory


_SAMPLING_KEYS = ("steps", "cfg", "cfg_schedule", "temperature")  # the keywords of `SamplingDefaults.replace`


def _sampling_keywords(section: Any, prefix: str = "") -> dict[str, Any]:
    """The fields `prefix + key` of `section`, for each of `_SAMPLING_KEYS`, as `SamplingDefaults.replace` keywords."""
    return {key: getattr(section, prefix + key) for key in _SAMPLING_KEYS}


@dataclass
class LogSection:
    """stdout / TensorBoard reports and the sample grids of fixed captions."""

    every: int = 10  # stdout / TensorBoard interval in steps
    tensorboard: bool = True
    progress: bool = True  # a progress bar on the main process
    sample_every: int = 0  # sample-grid interval in steps (0 = only at the end)
    sample_count: int = 16  # grid of the first N captions of the data (fixed prompts)
    # the grids' sampling settings; None = the model's recorded default (ModelConfig.sampling)
    sample_steps: int | None = None  # masked-generation iterations
    sample_cfg: float | None = None
    sample_cfg_schedule: str | None = None
    sample_temperature: float | None = None
    vae: str | None = None  # image tokenizer to decode grids with (default: the model config's `vae` name)

    def sampling(self) -> dict[str, Any]:
        """The grids' sampling settings as `SamplingDefaults.replace` keywords (None = the model's)."""
        return _sampling_keywords(self, "sample_")


@dataclass
class EvalSection:
    """The held-out ShapesWorld score (learnability runs), computed on the main process with the weights being
    trained (the EMA when on) and logged to metrics.jsonl (`eval`) and TensorBoard (`eval/*`)."""

    every: int = 0  # score every this many steps and at the end of the run (0 = never)
    prompts: int = 120  # held-out scenes: shapesworld.generate_prompts(prompts, seed=prompt_seed), canonical text
    prompt_seed: int = 999_001  # the demo's held-out seed (recipes/shapes/commands.py HELDOUT_SEED)
    seeds: list[int] = field(default_factory=lambda: [0])  # one sample per prompt and seed (generator seeds)
    # sampling settings; None = the model's recorded default (ModelConfig.sampling), as `lightgen geneval`
    steps: int | None = None  # masked-generation iterations
    cfg: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    batch_size: int = 64  # images per generate call
    text_encoder: str | None = None  # encodes the prompts (default: the model config's text_encoder)

    def sampling(self) -> dict[str, Any]:
        """The sampling settings as `SamplingDefaults.replace` keywords (None = the model's)."""
        return _sampling_keywords(self)


@dataclass
class DPOSection:
    """Diffusion-DPO: beta, the pair shards, and where the frozen reference lives."""

    beta: float = 5000.0
    pairs: list[str] = field(default_factory=list)  # pair-shard directories (build-dpo-pairs outputs)
    reference_dtype: str = "float32"  # the frozen reference copy: float32 | bfloat16
    reference_device: str = "same"  # same | cpu (offloaded; slower)


@dataclass
class TrainConfig:
    """A training run's whole configuration: one section per concern."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        checks = [
            (self.data.batch_size >= 1, f"data.batch_size must be >= 1, got {self.data.batch_size}"),
            (self.data.shuffle_window >= 1, f"data.shuffle_window must be >= 1, got {self.data.shuffle_window}"),
            (self.data.read_ahead >= 0, f"data.read_ahead must be >= 0, got {self.data.read_ahead}"),
            (self.optim.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.optim.grad_accum}"),
            (self.optim.schedule in ("constant", "cosine"), f"optim.schedule: {self.optim.schedule!r}"),
            (
                self.optim.weight_decay_groups in DECAY_GROUPS,
                f"optim.weight_decay_groups must be one of {DECAY_GROUPS}, got {self.optim.weight_decay_groups!r}",
            ),
            (0.0 <= self.optim.ema_decay < 1.0, f"optim.ema_decay must be in [0, 1), got {self.optim.ema_decay}"),
            (len(self.optim.betas) == 2, f"optim.betas needs two values, got {self.optim.betas}"),
            (self.train.max_steps >= 0, f"train.max_steps must be >= 0, got {self.train.max_steps}"),
            (
                self.train.budget_minutes is None or self.train.budget_minutes > 0,
                f"train.budget_minutes must be > 0 (or null), got {self.train.budget_minutes}",
            ),
            (self.train.device in ("auto", "cpu", "cuda"), f"train.device: {self.train.device!r}"),
            (self.train.precision in ("auto", "fp32", "bf16"), f"train.precision: {self.train.precision!r}"),
            (self.train.parallel in ("ddp", "fsdp"), f"train.parallel: {self.train.parallel!r}"),
            (self.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}"),
            (self.log.every >= 1, f"log.every must be >= 1, got {self.log.every}"),
            (self.eval.every >= 0, f"eval.every must be >= 0, got {self.eval.every}"),
            (self.eval.prompts >= 1, f"eval.prompts must be >= 1, got {self.eval.prompts}"),
            (len(self.eval.seeds) >= 1, f"eval.seeds needs at least one seed, got {self.eval.seeds}"),
            (self.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.eval.batch_size}"),
            (self.dpo.reference_dtype in ("float32", "bfloat16"), f"dpo.reference_dtype: {self.dpo.reference_dtype!r}"),
            (self.dpo.reference_device in ("same", "cpu"), f"dpo.reference_device: {self.dpo.reference_device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self._check_locations()
        for section, settings in (("log", self.log.sampling()), ("eval", self.eval.sampling())):
            try:
                SamplingDefaults().replace(**settings)
            except ValueError as e:
                raise ValueError(f"{section}: {e}") from None

    def _check_locations(self) -> None:
        """train.out_dir and data.cache_dir are local folders (a URI is refused naming it, without credentials);
        data.cache_bytes is a byte count."""
        from .sources import byte_count, describe, is_uri

        if is_uri(self.train.out_dir):
            raise ValueError(
                f"train.out_dir={describe(self.train.out_dir)}: checkpoints are written to a local folder, not a "
                "URI; on several nodes use a shared filesystem every node mounts (NFS, Lustre, EFS, Filestore, ...)"
            )
        if self.data.cache_dir is not None and is_uri(self.data.cache_dir):
            raise ValueError(f"data.cache_dir={describe(self.data.cache_dir)}: the cache is a folder on a local disk")
        byte_count(self.data.cache_bytes, "data.cache_bytes")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dictionaries (JSON-ready)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """`to_dict` as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _section_class(name: str) -> type:
    return {
        "model": ModelSection,
        "data": DataSection,
        "optim": OptimSection,
        "train": TrainSection,
        "checkpoint": CheckpointSection,
        "log": LogSection,
        "eval": EvalSection,
        "dpo": DPOSection,
    }[name]


def _coerce(key: str, annotation: str, value: Any) -> Any:
    """YAML reads `1e-3` as a string and `1` as an int: make numbers of float fields floats, or fail clearly."""
    if "float" not in annotation or value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    return value


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from nested dictionaries; unknown sections/keys raise ValueError."""
    kwargs = {}
    for sec, values in (d or {}).items():
        if sec not in SECTIONS:
            raise ValueError(f"unknown config section {sec!r}; sections are {sorted(SECTIONS)}")
        cls = _section_class(sec)
        known = {f.name for f in dataclasses.fields(cls)}
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {sec!r} must be a mapping, got {values!r}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in config section {sec!r}; known: {sorted(known)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        kwargs[sec] = cls(**{k: _coerce(f"{sec}.{k}", types[k], v) for k, v in values.items()})
    cfg = TrainConfig(**kwargs)
    if isinstance(cfg.data.shards, str):
        cfg.data.shards = [cfg.data.shards]
    if isinstance(cfg.dpo.pairs, str):
        cfg.dpo.pairs = [cfg.dpo.pairs]
    if isinstance(cfg.eval.seeds, int):
        cfg.eval.seeds = [cfg.eval.seeds]
    cfg.validate()
    return cfg


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (value parsed as YAML); more dots reach deeper: `model.overrides.encoder.depth=3`."""
    out = json.loads(json.dumps(d or {}))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"override key {key!r} must name a section and a key, e.g. optim.lr=1e-3")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a mapping")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config file must be a mapping of sections")
    return from_dict(apply_overrides(d, overrides or []))
