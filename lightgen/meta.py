"""Run real model code on the ``meta`` device and measure it: matmul FLOPs, peak live tensor bytes, output shapes.

Meta tensors carry shapes and dtypes but no data, so a full-size forward (and backward) costs no memory and takes
seconds. Two things are added on top:

- **Shadow values.** Code that reads a value (``int(mask.sum())``, ``.tolist()``, ``nonzero``) cannot run on meta
  tensors. ``MetaMeter`` keeps a real CPU copy ("shadow") of every small tensor whose inputs are all known (made
  by a factory op or copied from the CPU, then transformed): masks, counts, timestep tables, image grids. An op the
  meta backend cannot run is computed on the shadows and its result moved to meta. Weights and activations never
  get shadows (they are not small and their inputs are unknown), so no value of a weight is ever invented.
- **Peak memory, estimated.** Every tensor storage created under the meter is recorded with its byte size and a
  weak reference; the live bytes are those whose storage is still referenced (by Python, by autograd's saved
  tensors, by a view). The peak over the run is the activation peak a GPU allocator would see without
  fragmentation, weights (made before the meter) excluded.

FLOPs are counted as ``torch.utils.flop_counter.FlopCounterMode`` counts them: its formula registry (matmuls,
convolutions, attention; element-wise ops count zero), after the same decomposition of ops it has no formula for.
The meter applies the registry itself, without FlopCounterMode's per-module tracking, which tripled the time of a
full-size run; ``tests/test_dryrun.py`` checks that both give the same count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

META = torch.device("meta")
_NO_DECOMPOSITION: set[Any] = set()  # ops whose decompose() gave NotImplemented (asking again is slow)
_expired = torch.UntypedStorage._expired  # (cdata) -> True once the storage is freed
SHADOW_LIMIT = 1 << 22  # elements: tensors up to this size get a CPU copy when their inputs are known
_aten = torch.ops.aten
# uninitialised memory has no value to know: tensors made by these never get a shadow
EMPTY_OPS = (_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided)
# indexing with a boolean mask needs the mask's values: a known mask is turned into integer indices
INDEX_OPS = (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default)


class MetaValueError(RuntimeError):
    """Code read a value of a meta tensor whose value is unknown (computed from weights or large inputs)."""


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class MetaMeter(TorchDispatchMode):
    """Dispatch mode: shadow values for small meta tensors, and live/peak bytes of the storages made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shadow = WeakIdKeyDictionary()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.flops = 0
        self.ops = 0

    # -- memory -----------------------------------------------------------------------------------
    def _prune(self) -> None:
        dead = [k for k in self.live if _expired(k)]
        for k in dead:
            self.live_bytes -= self.live.pop(k)[1]

    def _record(self, out: Any, inputs: list[torch.Tensor]) -> None:
        seen = {StorageWeakRef(t.untyped_storage()).cdata for t in inputs}  # views of inputs own nothing new
        for t in _tensors(out):
            if t.device.type != "meta":
                continue
            s = t.untyped_storage()
            ref = StorageWeakRef(s)
            if ref.cdata not in self.live and ref.cdata not in seen:
                self.live[ref.cdata] = (ref, s.nbytes())
                self.live_bytes += s.nbytes()
        self.ops += 1
        # live_bytes only over-counts between prunes, so pruning before a candidate new peak keeps the peak exact
        if self.live_bytes > self.peak_bytes or self.ops % 512 == 0:
            self._prune()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    # -- values -----------------------------------------------------------------------------------
    def _known(self, args: Any, kwargs: Any) -> bool:
        return all(t.device.type != "meta" or t in self.shadow for t in _tensors((args, kwargs)))

    def _on_cpu(self, func: Any, args: Any, kwargs: Any) -> Any:
        """``func`` on the shadows (meta devices become cpu)."""
        swap = lambda x: (self.shadow[x] if x.device.type == "meta" else x) if isinstance(x, torch.Tensor) else x
        a, k = tree_map(swap, args), tree_map(swap, kwargs)
        if k.get("device") == META or str(k.get("device")) == "meta":
            k = {**k, "device": torch.device("cpu")}
        return func(*a, **k)

    def _has_known_bool_index(self, args: Any) -> bool:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.shadow for i in args[1] or ())

    def _long_indices(self, args: Any) -> tuple:
        """Index args with each known bool mask replaced by the long indices of its True entries (on meta)."""
        out: list[Any] = []
        for i in args[1]:
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i in self.shadow:
                for col in self.shadow[i].nonzero().unbind(1):
                    m = col.to(META)
                    self.shadow[m] = col
                    out.append(m)
            else:
                out.append(i)
        return (args[0], out, *args[2:])

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in flop_registry and func not in _NO_DECOMPOSITION and func is not torch.ops.prim.device.default:
            with self:  # as FlopCounterMode: count what an op without a formula decomposes into
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
            _NO_DECOMPOSITION.add(func)
        out = self._run(func, types, args, kwargs)
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out

    def _run(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """``func`` on meta tensors, with shadow values and memory bookkeeping."""
        metas = [t for t in _tensors((args, kwargs)) if t.device.type == "meta"]
        makes_meta = str(kwargs.get("device")) == "meta"
        if func is torch.ops.aten._local_scalar_dense.default and metas:
            if metas[0] in self.shadow:
                return self.shadow[metas[0]].item()
            raise MetaValueError(f"a value of a {tuple(metas[0].shape)} meta tensor was read ({func})")
        known = (metas or makes_meta) and self._known(args, kwargs) and func._overloadpacket not in EMPTY_OPS
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:  # data-dependent ops: compute on the shadows
            if func in INDEX_OPS and self._has_known_bool_index(args):
                return self._run(func, types, self._long_indices(args), kwargs)
            if not known:
                raise MetaValueError(f"{func} needs values the meta device does not have: {e}") from None
            cpu = self._on_cpu(func, args, kwargs)
            out = tree_map(lambda x: x.to(META) if isinstance(x, torch.Tensor) else x, cpu)
            for m, c in zip(_tensors(out), _tensors(cpu), strict=True):
                self.shadow[m] = c
            self._record(out, metas)
            return out
        if known:
            outs = [t for t in _tensors(out) if t.device.type == "meta"]
            if outs and all(t.numel() <= SHADOW_LIMIT for t in outs):
                cpu = self._on_cpu(func, args, kwargs)
                for m, c in zip(_tensors(out), _tensors(cpu), strict=False):
                    if m.device.type == "meta" and isinstance(c, torch.Tensor):
                        self.shadow[m] = c
        elif metas and func._schema.is_mutable:  # an in-place op with unknown inputs: the shadow is stale
            for t in metas:
                self.shadow.pop(t, None)
        self._record(out, metas)
        return out


class ShadowReads(TorchFunctionMode):
    """``Tensor.tolist`` of a meta tensor (refused before dispatch) answered from the meter's shadow values, and
    ``torch.tensor(data, device="meta")`` made on the CPU and moved, so that its values are known."""

    def __init__(self, meter: MetaMeter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.tolist and args[0].device.type == "meta":
            if args[0] not in self.meter.shadow:
                raise MetaValueError(f"tolist() of a {tuple(args[0].shape)} meta tensor whose values are unknown")
            return self.meter.shadow[args[0]].tolist()
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device")) == "meta":  # keep the values
            return func(*args, **{**kwargs, "device": "cpu"}).to(META)
        return func(*args, **kwargs)


@dataclass
class Measure:
    """What one metered call did: matmul FLOPs, peak live bytes (beyond what was live before), outputs, seconds."""

    flops: int = 0
    peak_bytes: int = 0
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self, per: int = 1) -> dict[str, Any]:
        """JSON-ready figures; FLOPs also per item when ``per`` items were processed."""
        return {
            "flops": self.flops,
            "flops_per_item": self.flops / per,
            "peak_activation_bytes": self.peak_bytes,
            "outputs": {k: list(v) for k, v in self.outputs.items()},
            "seconds": round(self.seconds, 2),
        }


_sdpa = torch.nn.functional.scaled_dot_product_attention


def fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the memory-efficient kernel, as a GPU runs it: on meta tensors the
    dispatcher would pick the math path, which keeps the (L x L) attention weights for the backward pass."""
    if query.dim() != 4 or query.device.type != "meta":
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            zeros = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            attn_mask = zeros.masked_fill(~attn_mask, float("-inf"))
        bias = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, grad, dropout_p, is_causal, scale=scale
    )[0]


def measure(fn: Callable[[], Any], name: str = "output") -> tuple[Measure, Any]:
    """Run ``fn`` under a `MetaMeter` -> (Measure, its result); shapes of the tensors it returns are recorded.
    Attention runs through the memory-efficient kernel (`fused_sdpa`)."""
    t0 = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        with MetaMeter() as meter, ShadowReads(meter):
            out = fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = _sdpa
    result = Measure(meter.flops, meter.peak_bytes, seconds=time.perf_counter() - t0)
    items = out.items() if isinstance(out, dict) else [(name, out)]
    for k, v in items:
        for i, t in enumerate(_tensors(v)):
            result.outputs[k if i == 0 else f"{k}.{i}"] = tuple(t.shape)
    return result, out


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers at their current dtypes."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def param_count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
