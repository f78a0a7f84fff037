"""Reading training shards: deterministic, rank-strided, shuffled, resumable batches.

The order of the data is a pure function of (seed, epoch, rank): each epoch permutes the shards; with at least as
many shards as processes, rank r reads shards r, r + W, r + 2W, ... of that permutation (every rank reads only
its own files), otherwise every rank reads all shards and keeps every W-th row. Rows are shuffled inside windows
of `shuffle_window` consecutive shards. All ranks run the same number of steps per epoch (the smallest rank's
count); a batch never mixes resolutions. The loader's position (epoch, batch index) is all a checkpoint needs
to continue exactly; the per-batch randomness (flip, posterior sample) is seeded by that position as well.

Integrity: each shard's size is checked against its manifest entry at start-up, and each time a shard is read its
file's bytes are read once, hashed (sha256, compared with the manifest's) and then parsed from memory, so a shard
that changed after it was written stops the run before any of its rows is trained on.

Where from: a shard directory is a local path or a filesystem URI (`s3://`, `gs://`, `file://`, ...;
training/sources.py). While a shard trains, a background thread of the loader fetches and parses the next
`read_ahead` shards of this rank's order; with a `ShardCache` the verified bytes of each shard are also kept on a
local disk, so later epochs read them from there (verified again). Neither changes a batch: the order and the
randomness depend on the position only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightgen_model import ModelConfig, pad_text

from .sources import ShardCache, describe, is_uri, read_source, remote_listing

if TYPE_CHECKING:
    from .config import DataSection
    from .dist import DistInfo

LATENT_COLUMNS = ("moments", "moments_flip")
# (unpadded rows, captions) -> (B, Lt, D) text and (B, Lt) mask: lightgen_model.pad_text bound to a model
TextPad = Callable[[list[np.ndarray], list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Shard:
    """One Parquet shard: its path, row count and image resolution, and its size and sha256 per the manifest (None
    when the manifest does not list them: not verified)."""

    path: str | Path  # a local path or a filesystem URI
    rows: int
    resolution: int
    sha256: str | None = None
    bytes: int | None = None

    def read(self) -> bytes:
        """The file's bytes, checked against the manifest's sha256 (IncompatibleShardsError naming the shard)."""
        data = read_source(self.path)
        if (digest := self.mismatch(data)) is not None:
            from pipeline.core.schema import IncompatibleShardsError

            raise IncompatibleShardsError(
                f"{self.name}: sha256 {digest} does not match the manifest ({self.sha256}): the shard changed after "
                "it was written (rerun the stage that wrote it)"
            )
        return data

    def mismatch(self, data: bytes) -> str | None:
        """The sha256 of `data` when it differs from the manifest's (None when it matches or none is listed)."""
        if self.sha256 is None or (digest := hashlib.sha256(data).hexdigest()) == self.sha256:
            return None
        return digest

    @property
    def name(self) -> str:
        """The shard's location for messages (a URI without credentials)."""
        return describe(self.path)


@dataclass
class Decoded:
    """One shard's columns as arrays: moments per column (N, 2C, h, w) float16, text rows, captions."""

    moments: dict[str, np.ndarray]
    text: np.ndarray  # (sum L, D) float16
    text_start: np.ndarray  # (N + 1,) row offsets into `text`
    captions: list[str]
    extra: dict[str, list[Any]]

    def text_row(self, i: int) -> np.ndarray:
        """Row i's unpadded text states (L_i, D)."""
        return self.text[self.text_start[i] : self.text_start[i + 1]]


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and runs)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
        >> 1
    )


class ShardSet:
    """The validated shards of one or more directories (encode-latents or build-dpo-pairs outputs)."""

    def __init__(
        self,
        directories: list[str] | list[Path],
        *,
        vae: str | None = None,
        text_encoder: str | None = None,
        allow_multi_resolution: bool = False,
        kind: str = "latents",
        moment_columns: tuple[str, ...] = LATENT_COLUMNS,
        extra_columns: tuple[str, ...] = (),
        cache: ShardCache | None = None,
    ) -> None:
        from pipeline.core import schema  # pyarrow is imported only where shards are really read

        if not directories:
            raise ValueError("no shard directory given")
        self.moment_columns, self.extra_columns = moment_columns, extra_columns
        self.shards: list[Shard] = []
        self.manifests: list[dict[str, Any]] = []
        self.unverified: list[str] = []  # directories whose manifest lists no sha256
        for d in directories:
            self._add_directory(d, kind, vae, text_encoder)
        if not self.shards:
            raise schema.IncompatibleShardsError(
                f"the shard directories {[describe(d) for d in directories]} hold no rows"
            )
        resolutions = sorted({s.resolution for s in self.shards})
        if len(resolutions) > 1 and not allow_multi_resolution:
            raise schema.IncompatibleShardsError(
                f"shards at several resolutions {resolutions}: train one resolution at a time, or set "
                "data.allow_multi_resolution=true"
            )
        self.resolutions = resolutions
        self.unverified.sort()
        self._cache: OrderedDict[int, Decoded] = OrderedDict()  # decoded shards in memory (see `decoded`)
        self._loading: dict[int, threading.Event] = {}  # shards being read now, so no shard is read twice at once
        self._lock = threading.Lock()
        self.cache_size = 16
        self.disk_cache = cache  # verified shard files on a local disk (data.cache_dir), or None
        self.source_reads = 0  # shard files read from their source (not from the disk cache)

    def _add_directory(self, d: str | Path, kind: str, vae: str | None, text_encoder: str | None) -> None:
        """The validated shards of one directory (local, or a URI listed through its filesystem), with rows."""
        from pipeline.core import schema

        sizes: list[int | None]
        if is_uri(d):  # s3://, gs://, file://, ...: listed through its filesystem (training/sources.py)
            manifest, paths, sizes = remote_listing(str(d), kind, vae, text_encoder)
        elif kind == "latents":
            manifest, paths = schema.training_shards(d, vae=vae, text_encoder=text_encoder)
        else:
            manifest, paths = schema.pair_shards(d, vae=vae, text_encoder=text_encoder)
        if not is_uri(d):
            sizes = [None] * len(paths)
        res = int(manifest.get("resolution") or manifest.get("config", {}).get("resolution") or 0)
        shown = describe(d) if is_uri(d) else str(Path(d))
        for p, e, size in zip(paths, manifest["shards"], sizes, strict=True):
            if int(e["rows"]) > 0:
                self.shards.append(listed_shard(p, e, res, size))
                if self.shards[-1].sha256 is None and shown not in self.unverified:
                    self.unverified.append(shown)
        self.manifests.append(manifest)

    @property
    def rows(self) -> int:
        """Rows in all shards."""
        return sum(s.rows for s in self.shards)

    # -- reading -----------------------------------------------------------------------------------
    def decoded(self, i: int) -> Decoded:
        """Shard i's arrays (an LRU cache keeps the shards of the current shuffle windows). Threads asking for a
        shard another thread is reading wait for that read instead of starting their own."""
        while True:
            with self._lock:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    return self._cache[i]
                busy = self._loading.get(i)
                if busy is None:
                    busy = self._loading[i] = threading.Event()
                    break
            busy.wait()  # then take it from the cache (or, if that read failed, read it here and fail alike)
        try:
            dec = self._decode(i)
            with self._lock:
                self._cache[i] = dec
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return dec
        finally:
            with self._lock:
                del self._loading[i]
            busy.set()

    def read(self, i: int) -> bytes:
        """Shard i's verified bytes: from the disk cache when it holds a copy whose sha256 matches, else from the
        source (then kept in the cache). A damaged cached copy is dropped with a warning and fetched again."""
        shard, cache = self.shards[i], self.disk_cache
        if cache is not None and shard.sha256 is not None:
            data = cache.get(shard.sha256)
            if data is not None:
                if (digest := shard.mismatch(data)) is None:
                    return data
                cache.drop(shard.sha256)
                print(
                    f"warning: the cached copy of {shard.name} ({cache.path(shard.sha256)}) has sha256 {digest}, "
                    f"not the manifest's {shard.sha256}: dropped, fetching the shard again",
                    file=sys.stderr,
                )
        data = shard.read()
        with self._lock:
            self.source_reads += 1
        if cache is not None and shard.sha256 is not None:
            cache.put(shard.sha256, data)
        return data

    def _decode(self, i: int) -> Decoded:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.core import schema

        shard = self.shards[i]
        table = pq.read_table(pa.BufferReader(self.read(i)))
        if len(table) != shard.rows:
            raise schema.IncompatibleShardsError(f"{shard.name}: {len(table)} rows, the manifest says {shard.rows}")
        moments = {c: schema.moments_array(table, c) for c in self.moment_columns}
        lens = table.column("text_len").to_numpy().astype(np.int64)
        col = table.column("text_emb").combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False)
        total = int(lens.sum())
        if total == 0 or flat.size % total:
            raise schema.IncompatibleShardsError(f"{shard.name}: text_emb sizes do not match text_len")
        text = flat.reshape(total, flat.size // total)
        start = np.concatenate([[0], np.cumsum(lens)])
        extra = {c: table.column(c).to_pylist() for c in self.extra_columns}
        return Decoded(moments, text, start, table.column("caption").to_pylist(), extra)

    def first_rows(self, n: int) -> list[tuple[int, int]]:
        """(shard, row) of the first n rows in manifest order (fixed prompts for sample grids)."""
        out = []
        for si, s in enumerate(self.shards):
            for r in range(s.rows):
                if len(out) == n:
                    return out
                out.append((si, r))
        return out

    # -- order -------------------------------------------------------------------------------------
    def _group(self, order: list[int], window: int) -> list[list[int]]:
        groups: list[list[int]] = []
        for i in order:
            if (
                groups
                and len(groups[-1]) < window
                and self.shards[groups[-1][0]].resolution == self.shards[i].resolution
            ):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _rank_batches(self, epoch: int, rank: int, world: int, batch: int, seed: int, window: int) -> list[np.ndarray]:
        perm = np.random.default_rng(seed_of(seed, epoch, 7)).permutation(len(self.shards)).tolist()
        own = perm[rank::world] if len(self.shards) >= world else perm
        batches: list[np.ndarray] = []
        carry = np.zeros((0, 2), np.int64)
        for w, group in enumerate(self._group(own, window)):
            refs = np.concatenate(
                [np.stack([np.full(self.shards[i].rows, i), np.arange(self.shards[i].rows)], 1) for i in group]
            )
            refs = refs[
                np.random.default_rng(seed_of(seed, epoch, rank if len(self.shards) >= world else 0, w)).permutation(
                    len(refs)
                )
            ]
            if len(self.shards) < world:
                refs = refs[rank::world]
            if len(carry) and self.shards[int(carry[0, 0])].resolution != self.shards[group[0]].resolution:
                carry = carry[:0]  # a batch never mixes resolutions: the partial batch is dropped
            refs = np.concatenate([carry, refs])
            n = len(refs) // batch
            batches.extend(refs[k * batch : (k + 1) * batch] for k in range(n))
            carry = refs[n * batch :]
        return batches

    def epoch_batches(self, epoch: int, rank: int, world: int, batch: int, seed: int, window: int) -> list[np.ndarray]:
        """This rank's batches of (shard, row) references for `epoch`, cut to the count every rank reaches."""
        counts = [
            len(self._rank_batches(epoch, r, world, batch, seed, window)) if r != rank else None for r in range(world)
        ]
        mine = self._rank_batches(epoch, rank, world, batch, seed, window)
        steps = min([len(mine)] + [c for c in counts if c is not None])
        if steps == 0:
            raise ValueError(
                f"batch size {batch} x {world} processes is larger than the data ({self.rows} rows): no full batch"
            )
        return mine[:steps]


def listed_shard(path: str | Path, entry: dict[str, Any], resolution: int, actual: int | None = None) -> Shard:
    """The Shard of a manifest entry; IncompatibleShardsError when the entry's sha256 or size is malformed or the
    file's size (`actual`, else the local file's) differs from the listed one (a cheap check of every shard at
    start-up)."""
    from pipeline.core.schema import IncompatibleShardsError

    digest, size, shown = entry.get("sha256"), entry.get("bytes"), describe(path)
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise IncompatibleShardsError(f"{shown}: the manifest's sha256 {digest!r} is not a sha256 hex digest")
    if size is not None and not (type(size) is int and size >= 0):
        raise IncompatibleShardsError(f"{shown}: the manifest's size {size!r} is not a byte count")
    if size is not None and (actual := Path(path).stat().st_size if actual is None else actual) != size:
        raise IncompatibleShardsError(
            f"{shown}: {actual} bytes, the manifest lists {size}: the shard changed after it was written (rerun the "
            "stage that wrote it)"
        )
    return Shard(path, int(entry["rows"]), resolution, digest.lower() if digest else None, size)


def check_shards(shards: ShardSet, mcfg: ModelConfig) -> None:
    """IncompatibleShardsError when the shards' latent channels or text width differ from the model's, or a
    resolution does not tile into its tokens (ValueError)."""
    from pipeline.core.schema import IncompatibleShardsError

    dec = shards.decoded(0)
    m = dec.moments[shards.moment_columns[0]]
    if m.shape[1] != 2 * mcfg.latent_channels:
        raise IncompatibleShardsError(
            f"shards hold {m.shape[1] // 2}-channel latents, the model expects latent_channels={mcfg.latent_channels}"
        )
    if dec.text.shape[1] != mcfg.text_dim:
        raise IncompatibleShardsError(
            f"shards hold {dec.text.shape[1]}-dim text states, the model expects text_dim={mcfg.text_dim}"
        )
    for res in shards.resolutions:
        mcfg.grid_for(res, res)


def reference_text_pad(spec: str, mcfg: ModelConfig, shards: ShardSet, device: str) -> tuple[TextPad, str]:
    """(``pad_text`` bound to a ``text_key_mask=False`` model and the text encoder ``spec``, the encoder's name).

    Such models (converted reference checkpoints) attend to padding, and the reference trained on captions padded
    to ``max_text_len`` with the encoder's own padding states, so every batch's captions are re-encoded; ``spec``
    (minilm or a local directory) must be the encoder the shards were made with."""
    from lightgen_model.encoders import build_text_encoder, text_encoder_name
    from pipeline.core.schema import IncompatibleShardsError

    if spec != "minilm" and not Path(spec).is_dir():
        raise FileNotFoundError(
            f"the model attends to padded text (text_key_mask=false), so captions are re-encoded to pad them as "
            f"the reference did; text encoder {spec!r} is not a local directory: set data.text_encoder=DIR"
        )
    name, made = text_encoder_name(spec), sorted({str(m.get("text_encoder")) for m in shards.manifests})
    if made != [name]:
        raise IncompatibleShardsError(
            f"text encoder {spec!r} ({name}) is not the one the shards were encoded with ({made}): set "
            "data.text_encoder to that encoder"
        )
    encoder = build_text_encoder(spec, device=device, max_len=mcfg.max_text_len)
    return functools.partial(pad_text, cfg=mcfg, encoder=encoder), name


def text_of(shards: ShardSet, refs: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """The unpadded (L_i, D) text states and the captions of the referenced rows."""
    rows = [shards.decoded(int(s)).text_row(int(r)) for s, r in refs]
    return rows, [shards.decoded(int(s)).captions[int(r)] for s, r in refs]


def sample_posterior(moments: np.ndarray, g: torch.Generator) -> torch.Tensor:
    """(B, 2C, h, w) stored moments (mean ‖ logvar) -> one draw mean + exp(logvar / 2) * eps, float32."""
    m = torch.from_numpy(moments.astype(np.float32))
    mean, logvar = m.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)


def gather_moments(shards: ShardSet, refs: np.ndarray, column: str) -> np.ndarray:
    """The stored moments of the referenced rows in one column, stacked (B, 2C, h, w)."""
    return np.stack([shards.decoded(int(s)).moments[column][int(r)] for s, r in refs])


def latent_batch(
    shards: ShardSet, refs: np.ndarray, g: torch.Generator, flip: bool, text_pad: TextPad = pad_text
) -> dict[str, Any]:
    """A pretraining batch: posterior samples of the (possibly flipped) moments, padded text, captions.

    ``text_pad(rows, captions)`` pads the text (the trainer binds ``lightgen_model.pad_text`` to the model's config
    and, for reference-padded models, its text encoder)."""
    use_flip = (torch.rand(len(refs), generator=g) < 0.5).numpy() if flip else np.zeros(len(refs), bool)
    moments = np.stack(
        [
            shards.decoded(int(s)).moments["moments_flip" if f else "moments"][int(r)]
            for (s, r), f in zip(refs, use_flip, strict=True)
        ]
    )
    latents = sample_posterior(moments, g)
    rows, captions = text_of(shards, refs)
    text, mask = text_pad(rows, captions)
    return {"latents": latents, "text": text, "text_mask": mask, "captions": captions, "flipped": use_flip}


Collate = Callable[[ShardSet, np.ndarray, torch.Generator], dict[str, Any]]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors moved to `device` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Loader:
    """Iterates batches from a position (epoch, index); `data.workers` threads prepare up to `data.prefetch` batches
    ahead, handed out strictly in order (collation is numpy/torch work that releases the GIL), and one more thread
    reads the next `data.read_ahead` shards of this rank's order before a batch needs them (fetch, sha256, parse).
    The position is its state: `state_dict()` / `load_state_dict()`."""

    def __init__(self, cfg: DataSection, shards: ShardSet, collate: Collate, info: DistInfo, seed: int = 0) -> None:
        self.shards, self.collate, self.seed = shards, collate, seed
        self.batch_size, self.window, self.rank, self.world = cfg.batch_size, cfg.shuffle_window, info.rank, info.world
        self.prefetch, self.workers = max(1, cfg.prefetch), max(1, cfg.workers)
        self.read_ahead = max(0, cfg.read_ahead)
        self.epoch, self.index = 0, 0  # position of the next batch to hand out
        # the window being trained, the one before (a batch may carry its rows over) and the shards read ahead
        self.shards.cache_size = max(16, 2 * self.window + 2 + self.read_ahead)
        self._plans: dict[int, list[np.ndarray]] = {}
        self._plan_lock = threading.Lock()
        self._reached = threading.Condition()
        self._reach = (0, 0)  # the position of the last batch handed to the workers

    @property
    def steps_per_epoch(self) -> int:
        """Batches in the current epoch (later epochs may differ slightly)."""
        return len(self._plan(self.epoch))

    def _plan(self, epoch: int) -> list[np.ndarray]:
        with self._plan_lock:  # the producer and the read-ahead thread: the current and the next epoch are kept
            if epoch not in self._plans:
                plan = self.shards.epoch_batches(epoch, self.rank, self.world, self.batch_size, self.seed, self.window)
                self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1} | {epoch: plan}
            return self._plans[epoch]

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch, for a checkpoint."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a checkpoint's position (before iterating)."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._reach = (self.epoch, self.index)

    @staticmethod
    def valid_state(state: Any) -> bool:
        """Whether `state` is a position `state_dict` writes: {"epoch", "index"}, both natural numbers."""
        return (
            isinstance(state, dict)
            and set(state) == {"epoch", "index"}
            and all(type(v) is int and v >= 0 for v in state.values())
        )

    def _make(self, epoch: int, index: int, refs: np.ndarray) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch, self.rank, index, 11))
        return self.collate(self.shards, refs, g)

    def first_uses(self, epoch: int, index: int) -> Iterator[tuple[tuple[int, int], int]]:
        """((epoch, batch), shard) for each shard at the first batch that needs it, from a position on, in order
        (endless: epoch after epoch)."""
        while True:
            seen: set[int] = set()
            for b, refs in enumerate(self._plan(epoch)[index:], start=index):
                for sh in dict.fromkeys(int(x) for x in refs[:, 0]):
                    if sh not in seen:
                        seen.add(sh)
                        yield (epoch, b), sh
            epoch, index = epoch + 1, 0

    def _read_ahead(self, epoch: int, index: int, stop: threading.Event) -> None:
        """Read shards in their order of first use, at most `read_ahead` beyond those the batches handed to the
        workers have reached. A failed read is left to the batch that needs the shard (it reports the error)."""
        history: deque = deque()  # positions of the shards read, the last `read_ahead` of them
        with contextlib.suppress(Exception):
            for pos, sh in self.first_uses(epoch, index):
                if len(history) == self.read_ahead:
                    gate = history.popleft()
                    with self._reached:
                        self._reached.wait_for(lambda g=gate: stop.is_set() or self._reach >= g)
                if stop.is_set():
                    return
                self.shards.decoded(sh)
                history.append(pos)

    def _reached_at(self, epoch: int, index: int) -> None:
        with self._reached:
            self._reach = (epoch, index)
            self._reached.notify_all()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="loader")
        pending: deque = deque()
        epoch, index = self.epoch, self.index
        stop = threading.Event()
        if self.read_ahead:
            threading.Thread(
                target=self._read_ahead, args=(epoch, index, stop), name="loader-read-ahead", daemon=True
            ).start()
        try:
            while True:
                while len(pending) < self.prefetch:
                    plan = self._plan(epoch)
                    last = index == len(plan) - 1
                    pending.append((epoch, index, last, pool.submit(self._make, epoch, index, plan[index])))
                    self._reached_at(epoch, index)
                    epoch, index = (epoch + 1, 0) if last else (epoch, index + 1)
                e, i, last, fut = pending.popleft()
                batch = fut.result()
                self.epoch, self.index = (e + 1, 0) if last else (e, i + 1)
                yield batch
        finally:
            stop.set()
            self._reached_at(*self._reach)
            for *_, fut in pending:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
