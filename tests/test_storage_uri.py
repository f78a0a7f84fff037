"""Locations as local paths or filesystem URIs, against a real S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from pipeline import inputs, storage


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
    assert names(inputs.expand([storage.join(root, "a/[12].tar"), storage.join(root, "a/1.tar")])) == ["a/1.tar", "a/2.tar"]
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
