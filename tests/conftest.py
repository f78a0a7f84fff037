"""Shared fixtures: tiny models and inputs built in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shapesworld
from lightgen_model import LightGen, preset

REPO = Path(__file__).resolve().parents[1]
# Fixtures that hand tests data files: each must resolve inside the repository (tests/test_self_contained.py runs
# the tests using them in a copy of the repository with nothing beside it).
DATA_FIXTURES = ("geneval_metadata",)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Create transformers' log handler now, on the session's stderr: created during a CliRunner invocation, it would
    keep that invocation's stream and, once it is closed, print a 'Logging error' traceback into later tests' output."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that read data files (`reads_data`); skip those marked `gpu` where torch sees no CUDA device."""
    for item in items:
        if set(DATA_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.reads_data)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def inside_repo(path: Path) -> Path:
    """`path`, resolved, after checking that it lies inside the repository (the suite reads nothing beside it)."""
    path = Path(path).resolve()
    if not path.is_relative_to(REPO):
        pytest.fail(f"a test fixture reads {path}, outside the repository {REPO}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def geneval_metadata() -> Path:
    """GenEval's evaluation_metadata.jsonl as the package ships it (shapesworld/data/geneval/); missing: a failure."""
    path = inside_repo(shapesworld.GENEVAL_METADATA)
    if not path.is_file():
        pytest.fail(f"GenEval's metadata file is missing: expected {path}", pytrace=False)
    return path


def wake_head(model: LightGen, std: float = 0.05) -> LightGen:
    """Replace the zero-initialised AdaLN/output weights of the diffusion head by small random ones, so that
    the head's output depends on its condition (at init it is exactly zero)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.diffloss.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port for the whole session, this process's AWS_* environment pointing at
    it (subprocesses inherit it); stopped at the end."""
    from s3_server import S3Server, apply_env, restore_env

    server = S3Server().start()
    old = apply_env(server)
    try:
        yield server
    finally:
        server.stop()
        restore_env(old)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test S3 server: `s3://NAME`."""
    return s3_server.bucket()


@pytest.fixture
def debug_model() -> LightGen:
    """The `debug` preset with an awake diffusion head, seeded."""
    torch.manual_seed(0)
    return wake_head(LightGen(preset("debug")))


def cross_states(model: LightGen, tokens, mask, text, text_mask, grid):
    """z for every position: encoder/decoder then the cross stack over the full grid."""
    ctx, ctx_mask = model.encode_text(text, text_mask)
    return model.cross(model.encode_decode(tokens, mask, grid), ctx, ctx_mask, model.cross_pos(grid))


def make_text(B: int, Lt: int = 7, dim: int = 384, lengths: list[int] | None = None, seed: int = 0):
    """Random text states (B, Lt, dim) and a padding mask with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, Lt, dim, generator=g)
    lengths = lengths or [Lt] * B
    mask = torch.arange(Lt)[None] < torch.tensor(lengths)[:, None]
    return text, mask


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two cores are shared with other jobs: more torch threads only add contention to tiny models."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
