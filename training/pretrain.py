"""Pretraining (256 px) and finetuning (512 / 1024 px) of LightGen on `encode-latents` shards.

    torchrun --nproc_per_node=N training/pretrain.py --config conf/shapes.yaml [section.key=value ...]
    python training/pretrain.py --config conf/shapes.yaml train.max_steps=100     # one process, CPU or GPU

Every option lives in the YAML config (see `conf/` and training/config.py); `section.key=value` overrides it.
Bad input (config, shards, checkpoints, a locked out_dir, a run stopped by non-finite values) is one `error: ...`
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python training/pretrain.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer
from torch import Tensor, nn

from lightgen.errors import user_errors
from lightgen_model import ModelConfig
from training.config import TrainConfig, load_config
from training.data import Collate, ShardSet, latent_batch
from training.trainer import NonFiniteError, Trainer


class PretrainTrainer(Trainer):
    """The masked diffusion loss on posterior samples of the stored moments."""

    kind = "pretrain"

    def shard_set(self, mcfg: ModelConfig) -> ShardSet:
        """The `data.shards` directories (encode-latents outputs; local paths or URIs)."""
        d = self.cfg.data
        return ShardSet(
            d.shards,
            vae=mcfg.vae or None,
            text_encoder=mcfg.text_encoder or None,
            allow_multi_resolution=d.allow_multi_resolution,
            cache=self.shard_cache(),
        )

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
    p.add_argument("--dry-run", action="store_true", help="one step on the meta device: FLOPs, memory per GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the --dry-run's memory per GPU assumes")
    p.add_argument("--resolution", type=int, help="--dry-run image side in px (default: the model's base)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.blr=2e-4 train.max_steps=10")
    return p.parse_known_args(argv)


def resolve(argv: list[str] | None = None) -> TrainConfig | None:
    """The config of a command line (None after --print-config has printed it)."""
    args, unknown = parse_args(argv)
    bad = [u for u in unknown if u.startswith("-")]
    if bad:
        raise ValueError(f"unknown option(s) {bad}; overrides are written section.key=value")
    cfg = load_config(args.config, args.overrides + unknown)
    if args.print_config:
        print(cfg.to_json())
        return None
    return cfg


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """`lightgen.errors.user_errors` for a plain script: bad input is one `error: ...` line on stderr and
    `SystemExit(2)`, no traceback. A run stopped by non-finite values is reported the same way."""
    try:
        with user_errors():
            try:
                yield
            except NonFiniteError as e:  # not one of lightgen.errors' user-error types
                raise ValueError(str(e)) from None
    except typer.Exit as e:  # click's Exit is a RuntimeError (a traceback) outside a click app
        raise SystemExit(e.exit_code) from None


def main(argv: list[str] | None = None, trainer_cls: type[Trainer] = PretrainTrainer) -> dict[str, Any] | None:
    """Parse, check and run (bad input: one `error:` line and exit code 2). The run's summary."""
    with reported_errors():
        cfg = resolve(argv)
        if cfg is None:
            return None
        args, _ = parse_args(argv)
        if args.dry_run:  # no shards, weights or out_dir needed
            from training.dryrun import dry_train

            print(json.dumps(report := dry_train(trainer_cls, cfg, args.gpus, args.resolution)))
            return report
        trainer = trainer_cls(cfg)
        trainer.check_config()
        return trainer.run()


if __name__ == "__main__":
    main()
