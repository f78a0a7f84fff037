"""The suite's own hooks (tests/conftest.py): `gpu`-marked tests are skipped, with a reason, where CUDA is not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

CASES = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    pass

def test_anywhere():
    pass
"""


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_marked_tests_skip_without_cuda(pytester: pytest.Pytester, monkeypatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(CASES)
    rec = pytester.inline_run("-p", "no:cacheprovider")
    reports = [r for r in rec.getreports("pytest_runtest_logreport") if r.when in ("setup", "call")]
    skipped = {r.nodeid.split("::")[-1]: r.longrepr[2] for r in reports if r.skipped}
    passed = {r.nodeid.split("::")[-1] for r in reports if r.passed and r.when == "call"}
    if cuda:
        assert passed == {"test_on_gpu", "test_anywhere"} and not skipped
    else:
        assert passed == {"test_anywhere"}
        assert skipped == {
            "test_on_gpu": "Skipped: marked gpu: needs a CUDA device (torch.cuda.is_available() is False)"
        }
