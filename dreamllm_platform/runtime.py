"""Ray runtime: connect to a cluster or start a local Ray, once per process.

Owns: `init_ray()` (the single `ray.init` call of jobs and tests),
`cluster_resources()`, which pipelines use to size actor pools so that read
tasks are never starved (ENVIRONMENT.md: the 2-CPU actor-pool hang), and
`sigterm_raises()`, under which a driver's clean-up runs when the job is stopped,
and `serve_until_stopped()` for jobs whose local Ray must outlive their API.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS (set by `ray job submit` and on cluster nodes),
    else start a local Ray with `num_cpus` logical CPUs (default: all cores). Idempotent."""
    import ray

    if ray.is_initialized():
        return
    # Token auth would make a later `ray start`/`ray job submit` fail (ENVIRONMENT.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **kwargs)
        return
    # A local Ray's workers inherit the environment: put the repo on their import path
    # so that jobs run as `python jobs/x.py` (no editable install) can ship functions.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in paths if p])
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


@dataclass(frozen=True)
class Resources:
    """What the connected cluster offers (logical units, as Ray schedules them)."""

    cpus: float
    gpus: float


def cluster_resources() -> Resources:
    import ray

    r = ray.cluster_resources()
    return Resources(cpus=float(r.get("CPU", 0.0)), gpus=float(r.get("GPU", 0.0)))


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_raises():
    """Turn SIGTERM (`ray job stop`, schedulers) into SystemExit inside the block, so that a driver's
    `except`/`finally` still closes its MLflow run. A no-op outside the main thread."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_system_exit) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def serve_until_stopped() -> None:
    """Block until SIGINT or SIGTERM, then shut Ray Serve down: a local Ray (and the API on it) lives
    only as long as the job's process."""
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
