"""The repository carries what it needs: nothing in it reads or links a path beside it (a fresh clone has nothing
there), and the tests that read data files pass in a copy of the repository with nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A path that climbs out of the repository to a sibling folder, as `../shared/...` did.
OUTSIDE = re.compile(r"\.\./shared\b|\bparents\[[2-9]\]\s*/\s*[\"']shared")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_file_reads_or_links_beside_the_repository() -> None:
    offenders = []
    for path in _tracked():
        if path.suffix not in (".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", "") or not path.is_file():
            continue
        if path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not offenders, "reads or links outside the repository:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_data_reading_tests_pass_in_a_bare_copy(tmp_path: Path) -> None:
    """Copy the tracked files into an empty folder (nothing beside them) and run the tests that use data fixtures
    there, importing the copy's packages: a fixture or module that reads outside the repository fails them."""
    copy = tmp_path / "clone"
    for src in _tracked():
        dst = copy / src.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_file():
            shutil.copy2(src, dst)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "reads_data", "tests"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 8, tail  # the GenEval-metadata tests ran, not skipped
    # the copy's own package (and its data) was imported, not the working tree's
    where = subprocess.run(
        [sys.executable, "-c", "import shapesworld; print(shapesworld.GENEVAL_METADATA)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(copy.resolve()), where
