"""Diffusion-DPO post-training of LightGen on `build-dpo-pairs` shards (the paper's eq. 7).

    torchrun --nproc_per_node=N training/dpo.py --config conf/dpo_shapes.yaml model.init_from=DIR [k=v ...]
    python training/dpo.py --config conf/dpo_shapes.yaml model.init_from=runs/demo/pretrain/model

For a pair (winner w, loser l) of the same caption, with one shared token mask/order, timestep and noise per
token, and L(x) the per-sample diffusion MSE of the per-token head:

    diff = [L_policy(w) - L_ref(w)] - [L_policy(l) - L_ref(l)]        loss = -log sigmoid(-beta / 2 * diff)

with beta as in the paper and in the public Diffusion-DPO training code (``scale_term = -0.5 * beta_dpo``), whose
beta = 5000 the paper follows; the paper's T * w(lambda_t) is folded into beta (under -log sigmoid(-beta * diff)
a beta of 5000 would act like their 10000). The reference is a frozen copy of the starting weights.
Logged: loss, implicit accuracy (share of pairs with diff < 0: the policy prefers the winner more than the
reference does) and the reward margin (mean of -beta / 2 * diff, the sigmoid's argument). Same launcher,
checkpoints, resume and logging as pretrain.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightgen_model import LightGen, ModelConfig, pad_text
from lightgen_model.encoders import resolve_dtype
from training import dist as D
from training.data import Collate, ShardSet, TextPad, sample_posterior, text_of
from training.pretrain import main as _main
from training.trainer import Trainer

PAIR_COLUMNS = ("winner_moments", "winner_moments_flip", "loser_moments", "loser_moments_flip")


def dpo_loss(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. (7) on per-sample losses (B,) -> (mean loss, {"implicit_acc", "reward_margin"}), in Diffusion-DPO's
    convention: loss = -log sigmoid(-beta/2 * diff), diff = (policy_w - ref_w) - (policy_l - ref_l)."""
    diff = (policy_w - ref_w) - (policy_l - ref_l)
    inside = -0.5 * beta * diff
    loss = -F.logsigmoid(inside).mean()
    return loss, {"implicit_acc": (diff < 0).float().mean(), "reward_margin": inside.mean()}


def pair_batch(
    shards: ShardSet, refs: np.ndarray, g: torch.Generator, flip: bool, text_pad: TextPad = pad_text
) -> dict[str, Any]:
    """Winner and loser latents (one posterior draw each, the same flip for both), padded text (``text_pad``: see
    ``training.data.latent_batch``)."""
    use_flip = (torch.rand(len(refs), generator=g) < 0.5).numpy() if flip else np.zeros(len(refs), bool)
    out: dict[str, Any] = {}
    for side in ("winner", "loser"):
        m = np.stack(
            [
                shards.decoded(int(s)).moments[f"{side}_moments_flip" if f else f"{side}_moments"][int(r)]
                for (s, r), f in zip(refs, use_flip, strict=True)
            ]
        )
        out[side] = sample_posterior(m, g)
    rows, out["captions"] = text_of(shards, refs)
    out["text"], out["text_mask"] = text_pad(rows, out["captions"])
    return out


class DPOTrainer(Trainer):
    """The pretraining loop with the Diffusion-DPO loss on pair shards and a frozen reference (`loss` overridden)."""

    kind = "dpo"
    init_prefers_ema = True  # post-train the released (EMA) weights
    find_unused_parameters = True  # no caption dropout here: the learned null text gets no gradient

    def model_config(self, resume: Path | None) -> ModelConfig:
        """The pretraining config with dropout off unless `model.overrides` asks for it."""
        cfg = super().model_config(resume)
        over = self.cfg.model.overrides
        # no dropout unless asked for: with policy == reference the loss is then exactly log 2
        return cfg.replace(attn_dropout=over.get("attn_dropout", 0.0), proj_dropout=over.get("proj_dropout", 0.0))

    def check_config(self) -> None:
        """DPO needs a starting model (`model.init_from`) and pair shards (`dpo.pairs`)."""
        if not self.cfg.model.init_from:
            raise ValueError(
                "DPO needs model.init_from: the pretrained model directory (policy and reference start there)"
            )
        if not self.cfg.dpo.pairs:
            raise ValueError("dpo.pairs is empty: name build-dpo-pairs output directories (dpo.pairs=[DIR])")

    def shard_set(self, mcfg: ModelConfig) -> ShardSet:
        """The `dpo.pairs` directories (build-dpo-pairs outputs; local paths or URIs)."""
        return ShardSet(
            self.cfg.dpo.pairs,
            vae=mcfg.vae or None,
            text_encoder=mcfg.text_encoder or None,
            allow_multi_resolution=self.cfg.data.allow_multi_resolution,
            kind="pairs",
            moment_columns=PAIR_COLUMNS,
            cache=self.shard_cache(),
        )

    def collate(self) -> Collate:
        """`pair_batch` with the configured flip and the model's text padding."""
        flip = self.cfg.data.flip
        return lambda shards, refs, g: pair_batch(shards, refs, g, flip, self.text_pad)

    def setup_task(self, model: LightGen, info: D.DistInfo) -> None:
        """The frozen reference: the starting weights (of a fresh run; a resumed run rebuilds it from init_from)."""
        ref = LightGen(model.cfg)
        start, _ = self.initial_weights()
        ref.load_state_dict(start, strict=True)
        dev = info.device if self.cfg.dpo.reference_device == "same" else torch.device("cpu")
        dtype = resolve_dtype(self.cfg.dpo.reference_dtype, str(dev))
        self.reference = ref.to(device=dev, dtype=dtype).eval().requires_grad_(False)

    def _draws(self, net: LightGen, B: int, grid: tuple[int, int], device: torch.device):
        L = grid[0] * grid[1]
        mask = net.random_mask(B, L, device)
        m = int(mask[0].sum())
        mul = net.cfg.diffusion_batch_mul
        t = torch.randint(0, net.diffloss.train_schedule.num_steps, (mul, B, m), device=device)
        noise = torch.randn(mul, B, m, net.cfg.token_dim, device=device)
        two = lambda x, dim: torch.cat([x, x], dim=dim)
        return two(mask, 0), two(t, 1), two(noise, 1)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. (7): policy and reference per-sample losses of winner and loser under shared draws."""
        net = D.unwrap(model)
        w, l_ = batch["winner"], batch["loser"]
        B = w.shape[0]
        lat = torch.cat([w, l_])
        text, tmask = torch.cat([batch["text"]] * 2), torch.cat([batch["text_mask"]] * 2)
        mask, t, noise = self._draws(net, B, net.latent_grid(w), w.device)
        policy = model(lat, text, tmask, draws=(mask, t, noise), reduction="none", vlb=False)
        ref_net = self.reference
        p = next(ref_net.parameters())
        with torch.no_grad():
            moved = [
                x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
                for x in (lat, text, tmask, mask, t, noise)
            ]
            ref = ref_net.sample_losses(*moved).to(policy.device, policy.dtype)
        return dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.cfg.dpo.beta)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """`training.pretrain.main` with the DPO trainer."""
    return _main(argv, trainer_cls=DPOTrainer)


if __name__ == "__main__":
    main()
