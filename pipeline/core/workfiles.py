"""The work folder of a partitioned stage: deterministic file names and atomic writes of intermediate files.

Phases exchange data through files, never through the driver's memory: numpy arrays as `.npz` (shuffle pieces,
edges, statistics) and Arrow IPC tables as `.arrow` (cleaned input chunks, rejects). Every file is written under a
temporary name and renamed, so a phase task that is retried (a Ray worker died) rewrites the same file and readers
never see half a file. Shuffle pieces are named `<phase>/c<chunk>-p<partition>`: the writer of chunk c owns them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

WORK_DIR = ".build-captions-work"  # under the output folder; removed at the end of a successful run


def work_path(work: str | Path, phase: str, name: str) -> Path:
    """`<work>/<phase>/<name>`, creating the phase folder."""
    folder = Path(work) / phase
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def piece(chunk: int, part: int) -> str:
    """The name of chunk `chunk`'s piece of partition `part`."""
    return f"c{chunk:05d}-p{part:03d}.npz"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays as an uncompressed `.npz`, atomically."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file, loaded."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write one array as `.npy`, atomically (readers may memory-map it)."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """An `.npy` array, memory-mapped read-only by default (shared by all workers through the page cache)."""
    return np.load(path, mmap_mode="r" if mmap else None)


class ArrowWriter:
    """Stream record batches into an Arrow IPC file; `close()` publishes it under its final name."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.tmp = path, _tmp(path)
        self._writer = pa.ipc.new_file(str(self.tmp), schema)

    def write(self, table: pa.Table) -> None:
        """Append rows."""
        self._writer.write_table(table)

    def close(self) -> None:
        """Finish the file and rename it into place."""
        self._writer.close()
        os.replace(self.tmp, self.path)


def write_arrow(path: Path, table: pa.Table) -> None:
    """Write a table as one Arrow IPC file, atomically."""
    w = ArrowWriter(path, table.schema)
    w.write(table)
    w.close()


def read_arrow(path: Path, columns: list[str] | None = None) -> pa.Table:
    """An Arrow IPC file (memory-mapped), optionally only some columns."""
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()  # buffers keep the mapping alive
    return table.select(columns) if columns else table


def reset(work: str | Path) -> Path:
    """An empty work folder (an earlier run's leftovers removed)."""
    path = Path(work)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def remove(work: str | Path) -> None:
    """Delete the work folder."""
    shutil.rmtree(work, ignore_errors=True)
