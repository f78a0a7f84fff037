"""Process-group set-up and model wrapping (DDP by default, FSDP2 as an option), outside the model code."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightgen_model.encoders import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set), else one process.

    ``device_pref``: auto | cpu | cuda (resolved by ``lightgen_model.encoders.resolve_device``); each process
    takes the GPU of its local rank."""
    try:
        kind = torch.device(resolve_device(device_pref)).type
    except ValueError as e:
        raise ValueError(f"train.device: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        kw = {"device_id": device} if kind == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kw)
    return DistInfo(rank, world, local_rank, local_world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """Maximum of a scalar over ranks (the value itself in one process)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (a detached copy)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap(model: nn.Module, parallel: str, info: DistInfo, find_unused: bool | None = None) -> nn.Module:
    """DDP (gradients all-reduced, every rank holds the full model) or FSDP2 (`fully_shard` per transformer
    block, then the root). One process: the model itself."""
    if not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # without buffer tokens the encoder is skipped when a batch masks every token: its parameters then
        # get no gradient in that step
        if find_unused is None:
            find_unused = getattr(getattr(model, "cfg", None), "buffer_size", 0) == 0
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused)
    from torch.distributed.fsdp import fully_shard

    for name in ("encoder_blocks", "decoder_blocks", "cross_attn_blocks"):
        for blk in getattr(model, name):
            fully_shard(blk)
    for blk in model.text_emb.text_aligner:
        fully_shard(blk)
    # the diffusion head is entered through `loss` / `sample`, not `forward`: it stays with the root unit
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The LightGen module inside a DDP wrapper (FSDP2 shards in place and keeps the class)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "cfg") else model
