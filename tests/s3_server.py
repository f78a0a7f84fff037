"""A real S3 endpoint on the loopback interface for tests: moto's server (an S3 emulator speaking the real HTTP
protocol) standing in for AWS S3, GCS's S3 API or MinIO. pyarrow's S3 filesystem reaches it through the standard
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), as it reaches a real store."""

from __future__ import annotations

import os
import socket
import uuid

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "lightgen-test-key", "AWS_SECRET_ACCESS_KEY": "lightgen-test-secret"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's threaded server on 127.0.0.1:`port`. `stop()` / `start()` take it down and bring it back on the same
    port with the same objects (they live in this process), as a store that was unreachable for a while."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def env(self) -> dict[str, str]:
        """The environment a client (this process, torchrun, Ray workers) needs to reach the server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **FAKE_KEYS,
        }

    def start(self) -> S3Server:
        """Serve (again) on the same port."""
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving; the objects stay for a later `start()`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def bucket(self, prefix: str = "lg") -> str:
        """Create a fresh bucket; returns its URI `s3://NAME`."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **_boto_keys())
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def apply_env(server: S3Server) -> dict[str, str | None]:
    """Point this process (and its children) at `server`; returns the previous values for `restore_env`."""
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    return old


def restore_env(old: dict[str, str | None]) -> None:
    """Undo `apply_env`."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
