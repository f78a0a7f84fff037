"""The process: process group, kernel settings, SIGTERM/SIGINT, and parallelising the model (compile, DDP by
default, FSDP2 as an option), all outside the model code."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightgen_model.encoders import resolve_device


@dataclass
class DistInfo:
    """This process's place: rank and world size (global and on this node) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
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
        timeout = datetime.timedelta(seconds=collective_timeout_s())
        dist.init_process_group(backend, timeout=timeout, **kw)
    return DistInfo(rank, world, local_rank, local_world, device)


def collective_timeout_s() -> float:
    """How long a collective waits for a peer that does not answer (frozen, or its node gone without closing its
    connections; a peer that dies is seen at once): `LIGHTGEN_DIST_TIMEOUT_S`, default 1800 (a checkpoint of a large
    model on a slow disk keeps the other ranks waiting in a barrier)."""
    from pipeline.core.storage import env_positive

    return env_positive("LIGHTGEN_DIST_TIMEOUT_S", 1800.0, "seconds")


def configure(info: DistInfo, deterministic: bool, threads: int | None) -> None:
    """Kernel settings of a training process: TF32 and no cuDNN attention on GPUs; on CPUs flush-to-zero, the
    thread count (default: cores / local processes) and, with `deterministic`, bit-reproducible kernels."""
    if info.device.type == "cuda":
        # cuDNN attention is CPU-bound for our masked attention (BENCHMARKS.md); flash / mem-efficient stay on
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return
    if deterministic:  # multi-threaded CPU backward is otherwise not bit-reproducible
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)  # denormals cost up to 6x on our CPUs (BENCHMARKS.md)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world)))


class PeerLostError(ConnectionError):
    """Another process of the run is gone (its launcher or its node died): this one stops too."""


# What gloo and NCCL say (lower case) when the other end of a collective died or froze (besides torch's DistError).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout")


@contextlib.contextmanager
def peer_failures(info: DistInfo) -> Iterator[None]:
    """Turn a collective that failed because another process of the run is gone into one `PeerLostError` line
    (reported as `error: ...`, exit code 2) instead of a traceback per rank."""
    try:
        yield
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if not info.distributed or not (isinstance(e, dist.DistError) or any(m in text.lower() for m in _PEER_GONE)):
            raise
        cause = text.split("] ", 1)[-1].split(". ")[0][:200]  # gloo: "Connection closed by peer [host]:port"
        raise PeerLostError(
            f"rank {info.rank} of {info.world}: another process of this run is gone or does not answer ({cause}); "
            "stopping. Rerun every launcher to resume from the last checkpoint"
        ) from None


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """Maximum of a scalar over ranks (the value itself in one process)."""
    return all_reduce_max_each([value], info)[0]


def all_reduce_max_each(values: list[float], info: DistInfo) -> list[float]:
    """Maximum of each scalar over ranks, in one collective (the values themselves in one process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (a detached copy)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing in one process)."""
    if info.distributed:
        dist.barrier()


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block and the diffusion head's network (in place)."""
    for stack in (model.encoder_blocks, model.decoder_blocks, model.cross_attn_blocks):
        for blk in stack:
            blk.compile()
    model.diffloss.net.compile()


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


class StopSignals:
    """While entered: the first SIGTERM / SIGINT is recorded in `received` (the run stops after its step with a
    checkpoint), a second one interrupts at once. The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        print(f"\nsignal {signum}: finishing this step, writing a checkpoint, then exiting", flush=True)

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner thread)
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
