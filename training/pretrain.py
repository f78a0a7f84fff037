"""Pretraining (256 px) and finetuning (512 / 1024 px) of LightGen on `encode-latents` shards.

    torchrun --nproc_per_node=N training/pretrain.py --config conf/shapes.yaml [section.key=value ...]
    python training/pretrain.py --config conf/shapes.yaml train.max_steps=100     # one process, CPU or GPU

Every option lives in the YAML config (see `conf/` and training/config.py); `section.key=value` overrides it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python training/pretrain.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch import Tensor, nn

from lightgen_model import ModelConfig
from pipeline.schema import IncompatibleShardsError
from training.config import TrainConfig, load_config
from training.data import Collate, ShardSet, latent_batch
from training.trainer import Trainer


class PretrainTrainer(Trainer):
    """The masked diffusion loss on posterior samples of the stored moments."""

    kind = "pretrain"

    def shard_set(self, mcfg: ModelConfig) -> ShardSet:
        """The `data.shards` directories (encode-latents outputs)."""
        d = self.cfg.data
        return ShardSet(
            d.shards, vae=mcfg.vae or None, text_encoder=mcfg.text_encoder or None,
            allow_multi_resolution=d.allow_multi_resolution,
        )  # fmt: skip

    def collate(self) -> Collate:
        """`latent_batch` with the configured flip and the model's text padding."""
        flip = self.cfg.data.flip
        return lambda shards, refs, g: latent_batch(shards, refs, g, flip, self.text_pad)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The model's masked diffusion loss on the batch's latents and text; no extra metrics."""
        return model(batch["latents"], batch["text"], batch["text_mask"]), {}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(--config / --print-config, the remaining arguments)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="training/pretrain.py"
    )
    p.add_argument("--config", help="YAML config (conf/*.yaml); defaults apply to everything it leaves out")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.blr=2e-4 train.max_steps=10")
    return p.parse_known_args(argv)


def resolve(argv: list[str] | None = None) -> TrainConfig | None:
    """The config of a command line (None after --print-config has printed it)."""
    args, unknown = parse_args(argv)
    bad = [u for u in unknown if u.startswith("-")]
    if bad:
        raise SystemExit(f"unknown option(s) {bad}; overrides are written section.key=value")
    cfg = load_config(args.config, args.overrides + unknown)
    if args.print_config:
        print(cfg.to_json())
        return None
    return cfg


def main(argv: list[str] | None = None, trainer_cls: type[Trainer] = PretrainTrainer) -> dict[str, Any] | None:
    """Parse, check and run; user errors exit with a one-line message. The run's summary."""
    try:
        cfg = resolve(argv)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg is None:
        return None
    trainer = trainer_cls(cfg)
    try:
        trainer.check_config()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return trainer.run()
    except (IncompatibleShardsError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
