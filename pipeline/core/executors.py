"""The executor: maps small, picklable tasks over workers in this process or on Ray Data, and yields their results.

`execute` runs the tasks in this process without importing Ray (`workers=0`), or maps them with Ray Data on an actor
pool (`make_worker` called once per actor, so models load once; actors restarted and tasks retried when a worker dies)
or, with `actors=False`, as plain Ray tasks. The runner (`pipeline.core.runner`) runs every stage's units through it;
`build-captions` runs its global phases through it too (`calls` wraps a module-level function).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa


def _star(fn: Callable[..., Any]) -> Callable[[tuple], Any]:
    return lambda args: fn(*args)


def calls(fn: Callable[..., Any]) -> Callable[[], Callable[[tuple], Any]]:
    """The worker factory of a plain module-level function whose tasks are its argument tuples."""
    return functools.partial(_star, fn)


class _ExecActor:
    """The Ray Data actor (or task): `make_worker()` once, then each pickled task in, its pickled result out."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]]) -> None:
        self.worker = make_worker()

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [pickle.dumps(self.worker(pickle.loads(t))) for t in batch.column("task").to_pylist()]
        return pa.table({"result": pa.array(results, pa.binary())})


def _run_batch(batch: pa.Table, make_worker: Callable[[], Callable[[Any], Any]]) -> pa.Table:
    """The Ray Data task of `execute(actors=False)`."""
    return _ExecActor(make_worker)(batch)


def execute(
    make_worker: Callable[[], Callable[[Any], Any]],
    tasks: Sequence[Any],
    *,
    workers: int,
    ray_address: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    actors: bool = True,
    shared: Sequence[str] = (),
) -> Iterator[Any]:
    """Map the callable `make_worker()` returns over `tasks` (small and picklable); yield its (small) results.

    `workers=0`: in this process, in task order, without importing Ray. Otherwise Ray Data maps the tasks, one per
    block, in completion order: on `workers` actors (`make_worker` called once per actor, so models load once), or
    with `actors=False` as tasks (for plain functions: Ray reuses its worker processes). `cpus` / `gpus` per worker
    default to a fair share of the cluster (`runtime.worker_resources`); every folder in `shared` must be seen by
    every node. A task may run twice (a worker died), so it must be idempotent: atomic writes under fixed names.
    """
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = no Ray), got {workers}")
    if workers == 0:
        worker = make_worker()
        for task in tasks:
            yield worker(task)
        return
    if not tasks:
        return
    from pipeline.core import runtime

    with runtime.ray_session(ray_address):  # shut down after the run if this call started it
        yield from _ray_execute(make_worker, tasks, workers, cpus, gpus, actors, shared)


def _ray_execute(
    make_worker: Callable[[], Callable[[Any], Any]],
    tasks: Sequence[Any],
    workers: int,
    cpus: float | None,
    gpus: float | None,
    actors: bool,
    shared: Sequence[str],
) -> Iterator[Any]:
    """The Ray Data job of `execute`."""
    import ray.data

    from pipeline.core import runtime

    for folder in shared:
        runtime.check_shared_storage(folder)
    cpus, gpus = runtime.worker_resources(workers, cpus, gpus)
    items = [{"task": pickle.dumps(t)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    size = min(workers, len(items))
    if actors:
        ds = ds.map_batches(
            _ExecActor,
            fn_constructor_kwargs={"make_worker": make_worker},
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=cpus,
            num_gpus=gpus,
            # A dead actor (an OOM kill, a lost node) is restarted, on another node if its own is gone, and its task
            # retried: tasks are idempotent. Ray Data's defaults (max_restarts=-1, max_task_retries=-1), no longer
            # passed: `ray_remote_args` goes in Ray 2.64; tests/test_runner.py and test_cluster_faults.py would see
            # a change of them.
        )
    else:
        ds = ds.map_batches(
            _run_batch,
            fn_kwargs={"make_worker": make_worker},
            compute=ray.data.TaskPoolStrategy(size=size),
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=cpus,
            num_gpus=gpus,
        )
    for row in ds.iter_rows():
        yield pickle.loads(row["result"])
