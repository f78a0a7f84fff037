"""The trainer on object storage, against a real S3 endpoint (moto's server on 127.0.0.1, tests/s3_server.py): the
loader from s3:// gives the local batches (also resumed mid-epoch), read-ahead, the bounded local cache (filled,
capped LRU, reused with no fetch, a damaged copy refetched), model.init_from and dpo.pairs from s3://, and multi-node
training as users launch it (two torchrun launchers, c10d rendezvous) giving the weights of one node."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from s3_server import free_port
from safetensors.torch import load_file
from train_utils import STANDALONE, finish, random_shards, torchrun_cmd, torchrun_env, two_node_launch, user_error

from lightgen_model import LightGen, preset, save_pretrained
from pipeline.core import storage
from pipeline.core.schema import IncompatibleShardsError
from training import dpo, pretrain
from training.data import Loader, ShardSet, latent_batch
from training.sources import ShardCache

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--config", str(ROOT / "conf/debug.yaml"), "log.sample_count=0"]


def upload(local: Path, uri: str) -> str:
    """Copy a local folder to `uri` (recursively); returns `uri`."""
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def put(uri: str, data: bytes) -> None:
    fs, path = storage.resolve(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    return random_shards(tmp_path_factory.mktemp("data") / "shards", n=48, rows_per_shard=8)  # 6 shards


@pytest.fixture(scope="module")
def s3_shards(s3_server, local_shards) -> str:
    return upload(local_shards, s3_server.bucket() + "/latents")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every shard file read from the object store, by URI (reads through pipeline.core.storage are counted)."""
    seen: list[str] = []
    real = storage.read_bytes

    def counted(spec: str) -> bytes:
        if spec.endswith(".parquet"):
            seen.append(spec)
        return real(spec)

    monkeypatch.setattr(storage, "read_bytes", counted)
    return seen


def loader_of(shards: ShardSet, rank: int = 0, world: int = 1, epoch: int = 0, index: int = 0, **data) -> Loader:
    """A flipping loader (seed 3) of `data.*` settings, for rank of world, at position (epoch, index)."""
    from training.config import DataSection
    from training.dist import DistInfo

    loader = Loader(DataSection(**data), shards, lambda s, r, g: latent_batch(s, r, g, True), DistInfo(rank, world), 3)
    loader.load_state_dict({"epoch": epoch, "index": index})
    return loader


def batches(shards: ShardSet, n: int, **kw) -> list[dict]:
    """The first n batches of a loader (batch 4, window 2, flip on)."""
    opts = {"batch_size": 4, "shuffle_window": 2, "read_ahead": 2} | kw
    out = []
    for b in loader_of(shards, **opts):
        out.append(b)
        if len(out) == n:
            return out
    raise AssertionError("unreachable: the loader is endless")


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["captions"] == y["captions"]
        for k in ("latents", "text", "text_mask"):
            assert torch.equal(x[k], y[k]), k
        assert np.array_equal(x["flipped"], y["flipped"])


# -- the loader ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_s3_loader_gives_the_local_batches_also_resumed_mid_epoch(local_shards, s3_shards, world):
    steps = ShardSet([local_shards]).epoch_batches(0, 0, world, 4, 3, 2)
    n = len(steps) + 5  # into the second epoch
    for rank in range(world):
        local = batches(ShardSet([local_shards]), n, rank=rank, world=world)
        remote = batches(ShardSet([s3_shards]), n, rank=rank, world=world)
        assert_same_batches(local, remote)
        mid = len(steps) // 2 + 1
        resumed = batches(ShardSet([s3_shards]), n - mid, rank=rank, world=world, epoch=0, index=mid)
        assert_same_batches(local[mid:], resumed)
    # file:// URIs and no read-ahead read the same batches too
    assert_same_batches(local, batches(ShardSet([f"file://{local_shards}"]), n, rank=world - 1, world=world))
    assert_same_batches(local, batches(ShardSet([s3_shards]), n, rank=world - 1, world=world, read_ahead=0))


def test_read_ahead_reads_the_next_shards_before_a_batch_needs_them(s3_shards, reads):
    shards = ShardSet([s3_shards])
    loader = loader_of(shards, batch_size=4, shuffle_window=1, prefetch=1, read_ahead=2)
    order = [sh for _, sh in itertools.islice(loader.first_uses(0, 0), 3)]
    it = iter(loader)
    next(it)
    for _ in range(200):  # the read-ahead thread: the first shard and the next two, not more
        if len(reads) >= 3:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # and no more while batch 0 is out
    assert sorted(reads) == sorted(str(shards.shards[i].path) for i in order)
    it.close()


# -- the local cache -------------------------------------------------------------------------------------------------
def test_the_cache_is_filled_then_reused_with_no_fetch(tmp_path, local_shards, s3_shards, reads):
    cache = tmp_path / "cache"
    steps = len(ShardSet([local_shards]).epoch_batches(0, 0, 1, 4, 3, 2))
    first = ShardSet([s3_shards], cache=ShardCache(cache, 10**9))
    got = batches(first, steps)
    assert len(reads) == 6 and first.source_reads == 6  # each shard fetched once
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(f"{s.sha256}.shard" for s in first.shards)  # kept by content, sha256 verified
    # another epoch (a fresh process: nothing in memory) reads the cache only, and the same batches
    reads.clear()
    again = ShardSet([s3_shards], cache=ShardCache(cache, 10**9))
    assert_same_batches(got, batches(again, steps))
    assert reads == [] and again.source_reads == 0
    # within one run: with less memory than shards, later epochs come from the cache, not the store
    reads.clear()
    run = ShardSet([s3_shards], cache=ShardCache(tmp_path / "cache2", 10**9))
    loader = loader_of(run, batch_size=4, shuffle_window=1, read_ahead=1)
    run.cache_size = 1
    it = iter(loader)
    for _ in range(3 * steps):  # three epochs
        next(it)
    it.close()
    assert len(reads) == 6 and run.source_reads == 6


def test_the_cache_is_capped_least_recently_used_evicted_first(tmp_path, local_shards, s3_shards, reads):
    size = max(s.bytes for s in ShardSet([local_shards]).shards)
    c = ShardCache(tmp_path / "lru", int(2.5 * size))
    c.put("a" * 64, b"a" * size)
    c.put("b" * 64, b"b" * size)
    assert c.get("a" * 64) == b"a" * size  # a is now more recent than b
    c.put("c" * 64, b"c" * size)  # over the cap: b goes
    assert [e[1][0] for e in c.entries()] == ["a", "c"]
    c.put("d" * 64, b"d" * (3 * size))  # larger than the cap: not kept, nothing evicted for it
    assert [e[1][0] for e in c.entries()] == ["a", "c"]
    # the trainer's reads stay under the cap
    cap = int(2.5 * size)
    shards = ShardSet([s3_shards], cache=ShardCache(tmp_path / "capped", cap))
    batches(shards, 20)
    kept = shards.disk_cache.entries()
    assert len(kept) == 2 and sum(e[2] for e in kept) <= cap


def test_a_damaged_cached_copy_is_detected_and_fetched_again(tmp_path, s3_server, local_shards, capsys, reads):
    uri = upload(local_shards, s3_server.bucket() + "/latents")
    cache = ShardCache(tmp_path / "cache", 10**9)
    first = ShardSet([uri], cache=cache)
    first.decoded(0)
    copy = cache.path(first.shards[0].sha256)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    reads.clear()
    second = ShardSet([uri], cache=cache)
    dec = second.decoded(0)
    assert len(reads) == 1 and second.source_reads == 1  # fetched again from the store
    assert "cached copy" in capsys.readouterr().err
    assert copy.read_bytes() == (local_shards / "part-00000.parquet").read_bytes()  # the cache holds a good copy again
    assert dec.captions == ShardSet([local_shards]).decoded(0).captions
    # a shard changed on the store (same size) is refused naming its URI, with or without a cached copy
    changed = (local_shards / "part-00001.parquet").read_bytes()
    put(f"{uri}/part-00001.parquet", changed[:-1] + bytes([changed[-1] ^ 1]))
    with pytest.raises(IncompatibleShardsError, match=rf"{uri}/part-00001.parquet: sha256 .* does not match"):
        ShardSet([uri], cache=ShardCache(tmp_path / "other", 10**9)).decoded(1)


def test_remote_shard_errors_name_the_uri(tmp_path, s3_server, local_shards, capsys):
    bucket = s3_server.bucket()
    user_error(
        capsys,
        lambda: pretrain.main([*BASE, f"data.shards=[{bucket}/nothing]", f"train.out_dir={tmp_path}"]),
        f"no manifest.json in {bucket}/nothing",
    )
    uri = upload(local_shards, bucket + "/gone")
    storage.resolve(uri)[0].delete_file(storage.resolve(uri + "/part-00002.parquet")[1])
    user_error(
        capsys,
        lambda: pretrain.main([*BASE, f"data.shards=[{uri}]", f"train.out_dir={tmp_path}"]),
        rf"missing: \['{uri}/part-00002.parquet'\]",
    )
    line = user_error(
        capsys,
        lambda: pretrain.main([*BASE, "data.shards=[x]", "train.out_dir=s3://AKIA:SECRET@b/run"]),
        r"train.out_dir=s3://b/run: checkpoints are written to a local folder",
    )
    assert "SECRET" not in line and "AKIA" not in line
    user_error(
        capsys,
        lambda: pretrain.main([*BASE, "data.shards=[x]", "data.cache_bytes=lots"]),
        "data.cache_bytes must be a byte count",
    )


# -- the trainers ----------------------------------------------------------------------------------------------------
def weights(d: Path) -> dict[str, torch.Tensor]:
    """The weights of a model folder, and its EMA weights when it has them."""
    ema = d / "model_ema.safetensors"
    return load_file(str(d / "model.safetensors")) | (
        {f"ema.{k}": v for k, v in load_file(str(ema)).items()} if ema.is_file() else {}
    )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_pretrain_init_from_and_dpo_pairs_from_s3_train_the_local_models(
    tmp_path, s3_server, local_shards, monkeypatch
):
    from test_dpo import toy_pairs

    monkeypatch.setenv("LIGHTGEN_CACHE", str(tmp_path / "models"))  # where remote model folders are copied

    bucket = s3_server.bucket()
    s3 = upload(local_shards, bucket + "/latents")
    run = lambda out, data, *extra: pretrain.main(
        [*BASE, f"data.shards=[{data}]", f"train.out_dir={tmp_path / out}", "train.max_steps=3", *extra]
    )
    run("local", local_shards)
    run("s3", s3, f"data.cache_dir={tmp_path / 'cache'}")
    assert_same(weights(tmp_path / "local/model"), weights(tmp_path / "s3/model"))
    assert len(list((tmp_path / "cache").glob("*.shard"))) == 6
    # a finetune from a model folder on s3 = from the local folder
    model = upload(tmp_path / "local/model", bucket + "/model")
    run("ft_local", local_shards, f"model.init_from={tmp_path / 'local/model'}")
    run("ft_s3", s3, f"model.init_from={model}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_same(weights(tmp_path / "ft_local/model"), weights(tmp_path / "ft_s3/model"))
    assert list((tmp_path / "models").glob("*/model/model.safetensors"))  # copied once, locally
    # DPO from an s3 model on s3 pairs = from local ones
    torch.manual_seed(0)
    save_pretrained(LightGen(preset("debug")), tmp_path / "init")
    pairs = toy_pairs(tmp_path / "pairs")
    init, s3_pairs = upload(tmp_path / "init", bucket + "/init"), upload(pairs, bucket + "/pairs")
    args = [
        "--config",
        str(ROOT / "conf/dpo_shapes.yaml"),
        "log.sample_count=0",
        "log.progress=false",
        "log.tensorboard=false",
        "data.batch_size=8",
        "train.budget_minutes=null",
        "train.max_steps=2",
    ]
    dpo.main(
        [*args, f"model.init_from={tmp_path / 'init'}", f"dpo.pairs=[{pairs}]", f"train.out_dir={tmp_path / 'dl'}"]
    )
    dpo.main([*args, f"model.init_from={init}", f"dpo.pairs=[{s3_pairs}]", f"train.out_dir={tmp_path / 'ds'}"])
    assert_same(weights(tmp_path / "dl/model"), weights(tmp_path / "ds/model"))


# -- multi-node ------------------------------------------------------------------------------------------------------
def launch(nodes: str, out: Path, data: str, *extra: str, node_rank: int | None = None, port: int = 0) -> list:
    """torchrun as users start it: one node of two processes (`--standalone`), or node `node_rank` of two nodes of
    one process each meeting at a c10d rendezvous on 127.0.0.1:`port`."""
    where = STANDALONE if nodes == "one" else two_node_launch(node_rank, port, "lightgen-test")
    args = [*BASE, f"data.shards=[{data}]", f"train.out_dir={out}", "data.batch_size=4", "train.threads=1", *extra]
    cmd = torchrun_cmd(ROOT / "training/pretrain.py", *args, launch=where)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env())


@pytest.mark.slow
def test_two_nodes_reading_s3_train_the_weights_of_one_node_reading_local(tmp_path, local_shards, s3_shards):
    """`torchrun --nnodes 2 --node_rank R --rdzv-backend c10d` (two launchers here, one process each, both with
    LOCAL_RANK 0) reading s3:// = `--nnodes 1 --nproc_per_node 2` reading the local copy, to the bit; checkpoints in
    one folder both see, written by global rank 0 only; a resumed two-node run continues exactly."""
    finish([launch("one", tmp_path / "one", str(local_shards), "train.max_steps=4")])
    two = tmp_path / "two"

    def two_nodes(*extra: str) -> list[str]:
        port = free_port()
        return finish(
            [
                launch(
                    "two",
                    two,
                    s3_shards,
                    f"data.cache_dir={tmp_path / f'node{r}-cache'}",
                    *extra,
                    node_rank=r,
                    port=port,
                )
                for r in (0, 1)
            ]
        )

    outs = two_nodes("train.max_steps=2")
    assert sum(o.count("2 process(es)") for o in outs) == 1  # one main process (global rank 0) logs
    outs = two_nodes("train.max_steps=4")  # resumes from step 2 in the shared out_dir
    assert sum(o.count("resuming from") for o in outs) == 1
    assert_same(weights(tmp_path / "one/checkpoints/step-00000004"), weights(two / "checkpoints/step-00000004"))
    assert_same(weights(tmp_path / "one/model"), weights(two / "model"))
    assert json.loads((two / "summary.json").read_text())["step"] == 4
    for r in (0, 1):  # each node kept the shards its process read in its own cache
        assert list((tmp_path / f"node{r}-cache").glob("*.shard"))


def test_ranks_that_see_different_out_dirs_stop_naming_it(tmp_path, local_shards, monkeypatch):
    """On several nodes every rank must find the checkpoint rank 0 wrote: a node whose out_dir is another folder (it
    finds none while another rank finds step 4) stops with an error saying out_dir must be shared."""
    from training import dist as D
    from training.config import load_config

    trainer = pretrain.PretrainTrainer(
        load_config(None, [f"data.shards=[{local_shards}]", f"train.out_dir={tmp_path}"])
    )
    trainer.info = D.DistInfo(rank=1, world=2)
    monkeypatch.setattr(D, "all_reduce_max_each", lambda values, info: [1.0, 4.0])  # min step -1 (none), max 4
    with pytest.raises(ValueError, match="do not agree on the checkpoint to resume from .none to step 4.*shared mount"):
        trainer._find_resume()
