"""Ray runtime: connect to a cluster or start a local Ray, once per process.

Owns: `init_ray()` (the single `ray.init` call of jobs and tests; it never waits on a stopped cluster
that `ray start` recorded, see `recorded_cluster`), the quiet
console of a local Ray (library deprecation notices and transformers warnings
filtered out, Ray Data's progress and INFO lines in its log file only, the log
directory printed; progress lines, errors and Ray's warnings stay: see
`quiet_console`), `cluster_resources()`, which pipelines use to size actor
pools so that read tasks are never starved (ENVIRONMENT.md: the 2-CPU
actor-pool hang),
`sigterm_raises()`, under which a driver's clean-up runs when the job is stopped,
`serve_until_stopped()` for jobs whose local Ray must outlive their API, and `running_rays()`, the Rays
running on this machine and their dashboards (the local Ray of `init_ray` has none: `include_dashboard=False`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VERBOSE_ENV = "DREAMLLM_VERBOSE"
"""Set to 1 to keep Ray's and the libraries' console output as they make it (debugging a local run)."""


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS (set by `ray job submit` and on cluster nodes), else to
    a running cluster that `ray start` recorded on this machine, else start a local Ray with `num_cpus`
    logical CPUs (default: all cores). Idempotent.

    A recorded cluster that does not answer within a second or two (`ray stop` leaves its record behind)
    is reported in one line and a local Ray starts: left to itself, `ray.init()` would spend minutes on
    GCS time-outs trying to reach it."""
    import ray

    if ray.is_initialized():
        return
    # Token auth would make a later `ray start`/`ray job submit` fail (ENVIRONMENT.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **kwargs)
        return
    recorded = recorded_cluster(kwargs.get("_temp_dir"))
    if recorded and _answers(recorded):
        print(f"[ray] connecting to the cluster that `ray start` recorded at {recorded} "
              f"(`ray stop` it to run on a local Ray)", flush=True)
        ray.init(address=recorded, log_to_driver=True, **kwargs)
        return
    if recorded:
        print(f"[ray] the cluster that `ray start` recorded at {recorded} does not answer (stopped?): "
              f"starting a local Ray", flush=True)
    # A local Ray's workers inherit the environment: put the repo on their import path
    # so that jobs run as `python jobs/x.py` (no editable install) can ship functions.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in paths if p])
    quiet = not os.environ.get(VERBOSE_ENV)
    if quiet:
        quiet_console()
        runtime_env = kwargs.pop("runtime_env", None) or {}
        kwargs["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.quiet_worker", **runtime_env}
    # address="local": never the recorded cluster (Ray's default for address=None), which is dead here.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    if quiet:
        quiet_ray_data()
        logs = getattr(ray._private.worker._global_node, "get_logs_dir_path", lambda: None)()
        print(f"[ray] local Ray started; the full logs of its workers, Ray Data and Ray Train are in {logs} "
              f"(set {VERBOSE_ENV}=1 to see them on the console)", flush=True)


def recorded_cluster(temp_dir: str | None = None) -> str | None:
    """The address of the last `ray start` on this machine (Ray's `ray_current_cluster` file in its temp
    folder: RAY_TMPDIR, else TMPDIR, else /tmp/ray), or None."""
    from ray._private import services

    try:
        return services.find_bootstrap_address(temp_dir) or None
    except OSError:  # an unreadable record is no cluster
        return None


def _answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at `host:port` (a stopped cluster's GCS port refuses)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class RunningRay:
    """A Ray running on this machine: its GCS address, and its dashboard's URL (None: it has none)."""

    address: str
    dashboard: str | None


DASHBOARD_HINT = ("ray start --head --include-dashboard=true --dashboard-host=127.0.0.1  "
                  "(the jobs then run on it, as on any cluster `ray start` recorded; `ray stop` ends it)")
"""How to get a Ray with a dashboard: the jobs' own local Ray starts without one (a process and a port
fewer on a 2-core machine)."""


def running_rays() -> list[RunningRay]:
    """The Rays that answer on this machine (RAY_ADDRESS when it is host:port, the cluster `ray start`
    recorded, the GCS servers `ps` shows: other jobs' local Rays), each with the URL of its dashboard when
    one serves it. Reads only: joins none."""
    from ray._private import services
    from ray._raylet import GcsClient

    candidates = [os.environ.get("RAY_ADDRESS", ""), recorded_cluster() or ""]
    try:
        candidates += sorted(services.find_gcs_addresses())
    except Exception:  # noqa: BLE001 - ps missing or unreadable: only the recorded ones
        pass
    found = []
    for address in dict.fromkeys(a for a in candidates if a and "://" not in a):
        if not _answers(address):  # a stopped cluster's record, or a Ray out of reach: GcsClient waits 30 s
            continue
        try:
            gcs = GcsClient(address=address)
            url = gcs.internal_kv_get(b"dashboard", b"dashboard", timeout=2)
            session = gcs.internal_kv_get(b"session_name", b"session", timeout=2)
        except Exception:  # noqa: BLE001 - not a GCS after all, or it stopped meanwhile
            continue
        found.append(RunningRay(address, _dashboard(url.decode() if url else "", session)))
    return found


def _dashboard(address: str, session: bytes | None) -> str | None:
    """The dashboard URL when it serves this Ray: a Ray without one (`include_dashboard=False`) still records
    the address it would have used, where another Ray's dashboard may answer; its session name tells."""
    import json
    import urllib.request

    if not address:
        return None
    url = address if "://" in address else f"http://{address}"
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            served = json.loads(r.read()).get("session_name")
    except (OSError, ValueError):
        return None
    return url if session and served == session.decode() else None


# ---------------------------------------------------------------- quiet console
# A local run's console is for its progress lines ([train] step ..., [pipeline] ...) and errors. Ray
# forwards every worker's output (log_to_driver), which must stay on: the progress lines of Ray Train
# workers reach the console only that way. So the noise is lowered where it is made instead. Ray
# already folds identical lines of several workers into one (RAY_DEDUP_LOGS, on by default).

def quiet_console() -> None:
    """Before a local `ray.init` (its workers inherit the environment) and for this process: library
    notices off the console. Errors, and warnings of Ray itself, still show."""
    # Deprecation notices of torch, DeepSpeed and Ray internals (all_gather_into_tensor, exclude_resources)
    # speak to library authors, once per worker and run.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # transformers' warnings (e.g. the CLIP image processor's torchvision fallback) in every worker.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported before the variable was set: it read its default
        sys.modules["transformers"].logging.set_verbosity_error()
    # Ray Data's progress report: a block of lines every few seconds per dataset when stdout is no
    # terminal, from the driver and from the workers that run a dataset for Ray Train.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def quiet_ray_data() -> None:
    """In this process (the driver): Ray Data's INFO lines (execution start and plan, run times) only in
    its log file (ray-data.log); the plan line is off in the workers too (datasets carry the context)."""
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = False
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler):  # the console; the session file handler keeps everything
            h.setLevel(logging.WARNING)


def quiet_worker() -> None:
    """Runs first in every worker process of a local Ray (its `worker_process_setup_hook`)."""
    # Ray Train's placement-group cleaner polls the State API, which a local Ray without a dashboard
    # does not serve: one harmless warning a second for the whole run. Its real failures are errors.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


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
