"""Shared pipeline machinery: shard files, manifests, schema checks, input listing, the in-process runtime."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import write_tar

from pipeline.core import runner, shards
from pipeline.core.schema import (
    LATENT_SCHEMA,
    IncompatibleShardsError,
    check_compatible,
    load_manifest,
    moments_array,
    shard_metadata,
    text_arrays,
    training_shards,
)
from pipeline.core.storage import Storage
from pipeline.io.decode import RejectError
from pipeline.io.image_sources import BlobReader, Record, list_records, parse_caption


def latent_rows(ids: list[str], text_lens: list[int], dim: int = 4, shape=(4, 2, 2)) -> pa.Table:
    """A `LATENT_SCHEMA` table of random rows."""
    rng = np.random.default_rng(0)
    n, size = len(ids), int(np.prod(shape))
    col = lambda arrays: pa.LargeListArray.from_arrays(
        pa.array(np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)),
        pa.array(np.concatenate(arrays), pa.float16()),
    )
    texts = [rng.standard_normal(n_tok * dim).astype(np.float16) for n_tok in text_lens]
    data = {
        "id": ids,
        "caption": [f"caption {i}" for i in ids],
        "resolution": [16] * n,
        "moments_shape": [list(shape)] * n,
        "moments": col([rng.standard_normal(size).astype(np.float16) for _ in ids]),
        "moments_flip": col([rng.standard_normal(size).astype(np.float16) for _ in ids]),
        "text_len": text_lens,
        "text_emb": col(texts),
        "vae": ["pixel"] * n,
        "text_encoder": ["minilm"] * n,
    }
    return pa.table(data, schema=LATENT_SCHEMA)


# ------------------------------------------------------------------------------------------------ shards.py


def test_names_and_digests():
    assert shards.shard_name(7) == "part-00007.parquet" and shards.rejects_name(7) == "part-00007.rejects.parquet"
    assert shards.digest({"a": 1, "b": [2]}) == shards.digest({"b": [2], "a": 1}) != shards.digest({"a": 2})


def test_publish_shard_is_atomic_readable_and_resumable(tmp_path):
    """The runner's one writer (stages and build-captions): shard, rejects, receipt; kept when rerun unchanged."""
    table = latent_rows(["a", "b", "c"], [3, 1, 2])
    store = Storage(str(tmp_path))

    def tables():
        yield table.slice(0, 2)
        # Before the shard is complete only a temporary file exists: a reader (or a resume) sees no shard.
        assert not (tmp_path / "part-00002.parquet").exists() and len(list(tmp_path.iterdir())) == 1
        yield table.slice(2)

    receipt = runner.publish_shard(store, 2, LATENT_SCHEMA, {"input_digest": "x", "shard": 2}, tables())
    names = ["part-00002.done.json", "part-00002.parquet", "part-00002.rejects.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert (receipt["rows"], receipt["rejected"], receipt["skipped"]) == (3, 0, False)
    assert receipt["sha256"] == shards.sha256_file(tmp_path / "part-00002.parquet")
    back = pq.read_table(tmp_path / "part-00002.parquet")  # plain pyarrow
    assert back.equals(table) and back.schema.equals(LATENT_SCHEMA, check_metadata=False)
    # float16 lists are byte-stream-split (the one writer setup of every shard), other columns are not.
    col = pq.ParquetFile(tmp_path / "part-00002.parquet").metadata.row_group(0)
    encodings = {col.column(i).path_in_schema: col.column(i).encodings for i in range(col.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["moments.list.element"] and "BYTE_STREAM_SPLIT" not in encodings["id"]
    assert shard_metadata(back.schema) == {"input_digest": "x", "shard": 2}
    assert moments_array(back).shape == (3, 4, 2, 2) and moments_array(back).dtype == np.float16
    assert [t.shape for t in text_arrays(back)] == [(3, 4), (1, 4), (2, 4)]
    # Rerun: the same metadata keeps the shard; other metadata or damaged bytes redo it.
    assert runner.publish_shard(store, 2, LATENT_SCHEMA, {"input_digest": "x", "shard": 2}, [table])["skipped"]
    assert not runner.publish_shard(store, 2, LATENT_SCHEMA, {"input_digest": "y", "shard": 2}, [table])["skipped"]
    (tmp_path / "part-00002.parquet").write_bytes(b"damaged")
    assert not runner.publish_shard(store, 2, LATENT_SCHEMA, {"input_digest": "y", "shard": 2}, [table])["skipped"]


def test_a_failed_shard_leaves_nothing(tmp_path):
    def tables():
        yield latent_rows(["a"], [1])
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runner.publish_shard(Storage(str(tmp_path)), 0, LATENT_SCHEMA, {}, tables())
    assert list(tmp_path.iterdir()) == []


def test_stale_files_are_cleaned(tmp_path):
    store = Storage(str(tmp_path))
    for k in range(3):
        runner.publish_shard(store, k, LATENT_SCHEMA, {"k": k}, [latent_rows(["a"], [1])])
    (tmp_path / "part-00003.parquet.tmp-123").write_bytes(b"partial")  # left by a killed writer
    (tmp_path / "user-notes.txt").write_text("keep me")
    runner.prepare_output(store, "encode-latents", overwrite=False, config_digest="d")
    assert not (tmp_path / "part-00003.parquet.tmp-123").exists()
    runner.drop_shards_beyond(store, 2)
    assert sorted(p.name for p in tmp_path.glob("part-*[0-9].parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (tmp_path / "part-00002.done.json").exists() and not (tmp_path / "part-00002.rejects.parquet").exists()
    (tmp_path / "diversity.json").write_text("{}")
    runner.prepare_output(store, "encode-latents", overwrite=True, config_digest="d")
    assert [p.name for p in tmp_path.iterdir()] == ["user-notes.txt"]


def test_write_manifest(tmp_path):
    store = Storage(str(tmp_path))
    receipts = [runner.publish_shard(store, k, LATENT_SCHEMA, {}, [latent_rows([f"{k}-a"], [1])]) for k in range(3)]
    header = {"format": "lightgen-latents", "schema_version": 1, "stage": "encode-latents", "config_digest": "d"}
    m = runner.write_manifest(store, header, receipts, 3, text_encoder="minilm")
    assert [s["name"] for s in m["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (m["rows"], m["rejected"], m["inputs"], m["rows_per_shard"]) == (3, 3, 6, [1, 1, 1])
    assert m["shards"][2]["sha256"] == receipts[2]["sha256"] == shards.sha256_file(tmp_path / "part-00002.parquet")
    assert m["complete"] and m["text_encoder"] == "minilm" and set(m["shards"][0]) == set(runner.ENTRY_KEYS)
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        runner.prepare_output(store, "encode-latents", overwrite=False, config_digest="other")
    with pytest.raises(ValueError, match="holds encode-latents output; choose another"):
        runner.prepare_output(store, "synthesize", overwrite=False, config_digest="d")


# ------------------------------------------------------------------------------------------------ schema.py


def test_check_compatible_names_each_mismatch(tmp_path):
    manifest = {"format": "lightgen-latents", "schema_version": 1, "vae": "pixel", "text_encoder": "minilm"}
    check_compatible(manifest, vae="pixel", text_encoder="minilm", require_complete=False)
    with pytest.raises(IncompatibleShardsError) as e:
        check_compatible({**manifest, "schema_version": 0, "complete": True}, vae="sd35-vae", text_encoder="minilm")
    assert "schema version 0" in str(e.value) and "'pixel' != expected 'sd35-vae'" in str(e.value)
    with pytest.raises(IncompatibleShardsError, match="has not finished"):
        check_compatible(manifest, vae="pixel")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": True, "shards": [{"name": "p"}]}))
    with pytest.raises(IncompatibleShardsError, match="missing"):
        training_shards(tmp_path, vae="pixel", text_encoder="minilm")


# ------------------------------------------------------------------------------------------------ sources.py


def test_tar_grouping_ids_and_blobs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tar(
        tmp_path / "a" / "00000.tar",
        [
            ("x/k1.jpg", b"IMG1"),
            ("x/k1.json", b'{"caption": "one"}'),
            ("k2.v2.png", b"IMG2"),  # key up to the first dot of the base name: "k2"
            ("k2.v2.txt", b"two"),
            ("k3.cls", b"7"),  # no image and no caption: not a sample
            ("k4.json", b'{"caption": "orphan"}'),
            ("k5.webp", b"IMG5"),
        ],
    )
    write_tar(tmp_path / "b" / "00000.tar", [("k1.png", b"B"), ("k1.txt", b"b")])
    recs = list_records([str(tmp_path / "*" / "*.tar")])
    assert [r.id for r in recs] == ["a/00000/x/k1", "a/00000/k2", "a/00000/k4", "a/00000/k5", "b/00000/k1"]
    assert [r.caption_kind for r in recs] == ["json", "txt", "json", "", "txt"]
    assert recs[2].image is None and recs[3].caption is None
    with BlobReader() as reader:
        assert reader.read(recs[1].image) == b"IMG2" and reader.read(recs[0].caption) == b'{"caption": "one"}'
    assert Record.from_json(json.loads(json.dumps(recs[0].to_json()))) == recs[0]
    # The same inputs named differently (folder vs glob) give the same ids.
    assert [r.id for r in list_records([tmp_path])] == [r.id for r in recs]


def test_truncated_and_broken_tars(tmp_path):
    path = write_tar(tmp_path / "t.tar", [("k1.png", b"A" * 4000), ("k1.txt", b"a"), ("k2.png", b"B" * 4000)])
    data = path.read_bytes()
    path.write_bytes(data[:6500])  # cut inside k2's payload
    recs = list_records([path])
    with BlobReader() as reader:
        assert reader.read(recs[0].image) == b"A" * 4000
        with pytest.raises(RejectError) as e:
            reader.read(next(r for r in recs if r.id == "t/k2").image)
    assert e.value.reason == "truncated"
    path.write_bytes(data[:6000])  # cut inside k2's header: tarfile stops quietly, the lost tail is reported
    assert [r.id for r in list_records([path])] == ["t/k1", "t/<unreadable>"]
    assert list_records([path])[1].error.startswith("bad_tar")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "t.tar").unlink()
    junk = list_records([tmp_path / "junk.tar"])
    assert len(junk) == 1 and junk[0].error.startswith("bad_tar")


def test_folder_captions_jsonl_then_sidecars(tmp_path):
    sub = tmp_path / "imgs" / "sub"
    sub.mkdir(parents=True)
    for name in ("a.png", "b.jpg", "c.png", "sub/d.png", "e.png"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    (tmp_path / "imgs" / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "caption": "from jsonl"}\nnot json\n{"file_name": "sub/d.png", "text": "deep"}\n'
    )
    (tmp_path / "imgs" / "a.txt").write_text("sidecar loses to jsonl")
    (tmp_path / "imgs" / "b.txt").write_text("b text")
    (tmp_path / "imgs" / "c.json").write_text('{"caption": "c json"}')
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"x")
    recs = {r.id: r for r in list_records([tmp_path / "imgs"])}
    assert sorted(recs) == ["a.png", "b.jpg", "c.png", "e.png", "sub/d.png"]
    with BlobReader() as reader:
        caption = lambda rid: parse_caption(reader.read(recs[rid].caption), recs[rid].caption_kind)
        assert [caption(k) for k in ("a.png", "b.jpg", "c.png", "sub/d.png")] == [
            "from jsonl",
            "b text",
            "c json",
            "deep",
        ]
    assert recs["e.png"].caption is None


def test_input_errors_name_the_bad_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*nope"):
        list_records([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="glob matches nothing"):
        list_records([str(tmp_path / "*.tar")])
    with pytest.raises(ValueError, match="no .tar shards or images"):
        list_records([tmp_path])


@pytest.mark.parametrize(
    "data,kind,reason",
    [
        (b"\xff\xfe", "txt", "bad_caption_encoding"),
        (b'{"caption": "\xc3"}', "json", "bad_caption_encoding"),
        (b"  \n", "txt", "empty_caption"),
        (b'{"caption": "  "}', "json", "empty_caption"),
        (b"{not json", "json", "bad_caption_json"),
        (b'{"url": "x"}', "json", "missing_caption"),
        (b'["a list"]', "json", "missing_caption"),
    ],
)
def test_parse_caption_rejects(data, kind, reason):
    with pytest.raises(RejectError) as e:
        parse_caption(data, kind)
    assert e.value.reason == reason


def test_parse_caption_fields():
    assert parse_caption(b' {"prompt": " a cat "} ', "json") == "a cat"
    assert parse_caption("un café\n".encode(), "txt") == "un café"


# ------------------------------------------------------------------------------------------------ runtime.py


def test_declared_sizes_are_judged_before_reading(tmp_path):
    from pipeline.io.decode import RejectError
    from pipeline.io.image_sources import MAX_MEMBER_BYTES, Blob, BlobReader

    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 100)
    with BlobReader() as reader:
        assert reader.read(Blob(str(path), 10, 5)) == b"xxxxx"
        with pytest.raises(RejectError, match="declares 1099511627776 bytes") as e:
            reader.read(Blob(str(path), 0, 1 << 40))
        assert e.value.reason == "too_large"
        with pytest.raises(RejectError) as e:
            reader.read(Blob(str(path), 90, 50))
        assert e.value.reason == "truncated"
    assert MAX_MEMBER_BYTES < 1 << 40


def test_captions_utf8_cannot_encode_are_rejected():
    from pipeline.io.decode import RejectError
    from pipeline.io.image_sources import check_caption, parse_caption

    assert check_caption("  a red circle ") == "a red circle"
    for data, kind in ((b'{"caption": "\\ud800 x"}', "json"), (b'{"caption": "ok \\udfff"}', "json")):
        with pytest.raises(RejectError) as e:
            parse_caption(data, kind)
        assert e.value.reason == "bad_caption_encoding"
