"""Locations as local paths or filesystem URIs, against a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from pipeline.core import storage
from pipeline.io import inputs


def _put(uri: str, data: bytes = b"x") -> None:
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_expand_files_folders_and_globs_alike(where, tmp_path, request) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/data"
    for name in ("a/1.tar", "a/2.tar", "a/b/3.tar", "a/x.jsonl", "a/.hidden.tar", "a/manifest.json", "a/p.done.json"):
        _put(storage.join(root, name))
    names = lambda files: [f[len(root) + 1 :] for f in files]
    assert names(inputs.expand([storage.join(root, "a")])) == ["a/1.tar", "a/2.tar", "a/b/3.tar", "a/x.jsonl"]
    assert names(inputs.expand([storage.join(root, "a/*.tar")])) == ["a/1.tar", "a/2.tar"]
    assert names(inputs.expand([storage.join(root, "a/**/*.tar")])) == ["a/1.tar", "a/2.tar", "a/b/3.tar"]
    assert names(inputs.expand([storage.join(root, "a/[12].tar"), storage.join(root, "a/1.tar")])) == [
        "a/1.tar",
        "a/2.tar",
    ]
    assert names(inputs.expand([storage.join(root, "a")], keep=lambda p: p.suffix == ".jsonl")) == ["a/x.jsonl"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inputs.expand([storage.join(root, "nope")])
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        inputs.expand([storage.join(root, "a/*.zip")])


def test_public_drops_credentials() -> None:
    assert storage.public("s3://AKIA:SECRET@bkt/key?access_key=AKIA&secret_key=S") == "s3://bkt/key"
    assert storage.public("/local/path") == "/local/path"
    with pytest.raises(ValueError, match="no bucket"):
        storage.resolve("s3:///key")


def test_errors_mask_the_endpoint_and_keys(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    with pytest.raises(OSError) as e, storage.masked_errors():
        raise OSError("Failed to connect to 10.1.2.3:9000 (http://10.1.2.3:9000) signing with s3cr3t-value")
    assert "10.1.2.3" not in str(e.value) and "s3cr3t" not in str(e.value) and "<endpoint>" in str(e.value)
    with pytest.raises(ValueError, match="^plain$"), storage.masked_errors():
        raise ValueError("plain")
    with (
        pytest.raises(storage.StorageError, match="cannot read s3://bkt/k: .*<endpoint>"),
        storage.named_errors("s3://bkt/k", "cannot read"),
    ):
        raise OSError("no route to 10.1.2.3:9000")


def test_retry_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIGHTGEN_S3_RETRIES", "lots")
    with pytest.raises(ValueError, match="LIGHTGEN_S3_RETRIES='lots'"):
        storage.resolve("s3://bkt/key")
    monkeypatch.setenv("LIGHTGEN_S3_RETRIES", "2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fs, path = storage.resolve("s3://bkt/key")
    assert path == "bkt/key" and isinstance(fs, storage.pafs.S3FileSystem)
    assert storage.resolve("s3://bkt/other")[0] is fs  # one client per bucket and environment
