"""Where the pipeline meets Ray: starting it, sizing workers, checking shared storage.

With `pipeline/core/executors.py` (the executor: the Ray Data jobs of the stages and of build-captions' phases) the
only Ray-aware module; Ray is imported inside the functions, so `--workers 0` never imports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Ray's own token authentication is for multi-tenant clusters; the pipeline talks to a local or trusted one.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(address: str | None = None, *, quiet: bool = True, num_cpus: int | None = None) -> bool:
    """Start a local Ray instance (`address=None`) or join the cluster at `address`; returns False if Ray was up."""
    import ray

    if ray.is_initialized():
        _quiet_data(quiet)
        return False
    level = logging.ERROR if quiet else logging.WARNING
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet, logging_level=level)
    if env := storage_env():
        kwargs["runtime_env"] = {"env_vars": env}
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
    ray.init(address=address, **kwargs)
    _quiet_data(quiet)
    return True


def storage_env() -> dict[str, str]:
    """The driver's storage settings (endpoint, region, keys, retries, model cache) that its Ray workers get, so that
    they reach the same store as the driver; nodes with their own credentials (an instance role) need none of them."""
    from pipeline.core.storage import STORAGE_ENV

    names = (*STORAGE_ENV, "AWS_EC2_METADATA_DISABLED", "GOOGLE_APPLICATION_CREDENTIALS", "LIGHTGEN_CACHE")
    return {k: os.environ[k] for k in names if os.environ.get(k)}


@contextmanager
def ray_session(address: str | None = None, *, enabled: bool = True, quiet: bool = True) -> Iterator[None]:
    """Ray for the length of a run: started (or joined) on entry and shut down on exit, unless it was already up."""
    started = enabled and init_ray(address, quiet=quiet)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def _quiet_data(quiet: bool) -> None:
    """Silence Ray Data's progress bars and per-dataset INFO lines (the pipeline shows its own progress)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.enable_auto_log_stats = False
    # One unit is one output shard: a GPU teacher may work on it for hours with no block produced in between;
    # Ray Data's no-progress timeout (30 min) would fail such a healthy run. A dead worker is still detected.
    ctx.execution_no_progress_timeout_s = -1
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.INFO)


def _cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def resolve_gpus_per_worker(gpus_per_worker: float | None, workers: int) -> float:
    """`None` shares the cluster's GPUs evenly, at most one per worker (none without GPUs); checks explicit values."""
    _, gpus = _cluster_resources()
    if gpus_per_worker is None:
        return min(1.0, gpus / workers)
    if gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if gpus_per_worker * workers > gpus:
        # Ray would wait forever for GPUs that do not exist; say so instead.
        raise ValueError(
            f"--workers {workers} x --gpus-per-worker {gpus_per_worker} needs {gpus_per_worker * workers:g} GPUs, "
            f"the Ray cluster has {gpus:g}"
        )
    return gpus_per_worker


def _alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (ray.nodes() entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def worker_resources(workers: int, cpus_per_worker: float | None, gpus_per_worker: float | None) -> tuple[float, float]:
    """(CPUs, GPUs) per actor: explicit values are checked; by default the workers are spread over the nodes and
    each gets an equal share of the CPUs of the smallest node (at least one), and of the GPUs (at most one)."""
    nodes = _alive_nodes()
    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in nodes] or [1.0]
    cpus, gpus = _cluster_resources()
    per_node = -(-workers // max(1, len(nodes)))
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, float(int(min(node_cpus) // per_node)))
    elif cpus_per_worker * per_node > max(node_cpus):
        raise ValueError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} does not fit the cluster's nodes "
            f"({len(nodes)} nodes, at most {max(node_cpus):g} CPUs each)"
        )
    return cpus_per_worker, resolve_gpus_per_worker(gpus_per_worker, workers)


def _probe_visible(uri: str, name: str) -> bool:
    """Whether file `name` exists in the output folder, as seen from the node this runs on (False where that node
    cannot reach the store: no credentials, no route)."""
    from pipeline.core.storage import Storage

    try:
        return Storage(uri).exists(name)
    except OSError:
        return False


def check_shared_storage(uri: str) -> None:
    """On a cluster of several nodes, check that every node sees the output folder (a local path on one node's
    disk would scatter the shards); an error names the node that does not."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.core.storage import Storage, public

    nodes = _alive_nodes()
    if len(nodes) < 2:
        return
    store = Storage(uri)
    store.makedirs()
    probe = f".probe-{uuid.uuid4().hex}"
    store.write_bytes(probe, b"lightgen")
    try:
        remote = ray.remote(num_cpus=0)(_probe_visible)
        refs = {
            n["NodeManagerAddress"] + "/" + n["NodeID"][:8]: remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(uri, probe)
            for n in nodes
        }
        blind = [node for node, ref in refs.items() if not ray.get(ref)]
    finally:
        store.delete(probe)
    if blind:
        raise ValueError(
            f"--output {public(uri)} is not visible from node(s) {', '.join(blind)}: on a multi-node Ray cluster the "
            "output must be storage every node sees (a shared mount, or a URI such as s3://bucket/path that every "
            "node can reach with its credentials)"
        )
