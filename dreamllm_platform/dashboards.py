"""One command to look at what the jobs recorded: the MLflow UI on the embedded store, and Ray's dashboard.

Owns: `UiConfig` (which store: the pipeline root's mlflow.db unless `tracking.tracking_uri` names
another, as the pipeline resolves it; the port), `mlflow_ui_command` (the `mlflow server` line: that
store, the runs' artifact root, loopback only: the UI has no authentication), and `run_ui`, which
starts it in a process group of its own, waits until it answers, prints its URL and the dashboards of
the Rays running on this machine (`runtime.running_rays`; the jobs' own local Ray has none), and stops
it on Ctrl-C or SIGTERM. A tracking server (http://) is named, not started: it serves its own UI.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dreamllm.config import check

from .tracking import TrackingConfig, tracking_uri

HOST = "127.0.0.1"
"""The UI binds to loopback only: anyone who reaches it reads and changes every run and model."""


@dataclass
class UiConfig:
    """`make ui`: the MLflow UI on the pipeline's store, and where Ray's dashboard is."""

    root: str = "outputs/pipeline"
    """The pipeline root whose store (<root>/mlflow.db) the UI opens, unless tracking.tracking_uri is set."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow: tracking_uri names another store (sqlite:///path, or a tracking server, which is only named);
    artifact_location is the artifact root of experiments created from the UI."""
    port: int = 5000
    """Port of the UI on 127.0.0.1 (0 picks a free one)."""
    start_timeout_s: float = 180.0
    """Seconds the UI may take to answer before the job gives up (it opens and checks the database)."""

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, f"port must be a TCP port or 0 (a free one), got {self.port}")
        check(self.start_timeout_s > 0, f"start_timeout_s must be > 0, got {self.start_timeout_s}")


def store_uri(cfg: UiConfig) -> str:
    """The tracking URI the UI shows: the pipeline's resolution of root and tracking (one implementation)."""
    from .pipeline import resolved_tracking

    return tracking_uri(resolved_tracking(cfg), create=False)


def mlflow_ui_command(uri: str, artifact_root: str, port: int) -> list[str]:
    """`mlflow server` on `uri`: the runs' artifacts are read where their runs recorded them (a local folder
    for the embedded store: no artifact proxy); `artifact_root` is only for experiments made in the UI."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--registry-store-uri", uri,
            "--default-artifact-root", artifact_root, "--no-serve-artifacts", "--host", HOST, "--port", str(port),
            "--workers", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def ray_lines() -> list[str]:
    """What the console says about Ray's dashboard: each running Ray's, or how to get one."""
    from .runtime import DASHBOARD_HINT, running_rays

    rays = running_rays()
    lines = [f"Ray dashboard: {r.dashboard}  (Ray at {r.address})" for r in rays if r.dashboard]
    lines += [f"Ray at {r.address}: running without a dashboard (the jobs' own local Ray starts with "
              f"include_dashboard=False)" for r in rays if not r.dashboard]
    if not rays:
        lines.append("Ray dashboard: no Ray is running on this machine (a job's local Ray lives only while the job "
                     "runs, and has no dashboard)")
    if not any(r.dashboard for r in rays):
        lines.append(f"  for a Ray with a dashboard: {DASHBOARD_HINT}")
    return lines


def run_ui(cfg: UiConfig, out: Callable[[str], None] = print) -> int:
    """Start the MLflow UI, print its URL and Ray's dashboard, and serve until Ctrl-C or SIGTERM (then 0).

    Raises FileNotFoundError when the store does not exist and ValueError for a store it cannot open or a
    port in use; a UI that exits or does not answer in time is RuntimeError, with the end of its log."""
    from .runtime import sigterm_raises

    uri = store_uri(cfg)
    if uri.startswith(("http://", "https://")):
        out(f"MLflow UI: {uri}  (the tracking server's own; nothing started)")
        for line in ray_lines():
            out(line)
        return 0
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"make ui opens a sqlite store (sqlite:///path) or names a tracking server (http://), "
                         f"got tracking URI {uri!r}")
    db = Path(uri[len("sqlite:///"):])
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}: run `make pipeline` first, or name the store with "
                                f"--set root=<pipeline root> or --set tracking.tracking_uri=sqlite:///<file>")
    port = cfg.port or _free_port()
    if _port_taken(port):
        raise ValueError(f"port {port} on {HOST} is in use (another `make ui`?): --set port=0 picks a free one")
    # Experiments the jobs create keep MLflow's default artifact root, ./mlruns of the directory they ran in.
    artifact_root = cfg.tracking.artifact_location or str(Path("mlruns").resolve())
    log_path = Path(tempfile.gettempdir()) / f"mlflow-ui-{port}.log"
    url = f"http://{HOST}:{port}"
    with open(log_path, "wb") as log, sigterm_raises():
        # A session of its own: Ctrl-C reaches this job only, which then stops the server and its workers.
        # Without MLflow's job runner (GenAI jobs: a runner and seven huey consumers), which a UI of runs and
        # models does not use and a 2-core machine feels.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(mlflow_ui_command(uri, artifact_root, port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + cfg.start_timeout_s
            while not _answers(f"{url}/health"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                        f"did not answer in {cfg.start_timeout_s:.0f} s"
                    raise RuntimeError(f"the MLflow UI {why}; its log ({log_path}) ends:\n{tail}")
                time.sleep(0.5)
            out(f"MLflow UI: {url}  (store {uri}; server pid {proc.pid}, log {log_path})")
            for line in ray_lines():
                out(line)
            out("Ctrl-C stops the UI.")
            sys.stdout.flush()
            proc.wait()
            raise RuntimeError(f"the MLflow UI exited with {proc.returncode}; its log: {log_path}")
        except (KeyboardInterrupt, SystemExit):
            out("stopping the MLflow UI")
            return 0
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and its workers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # a worker its server left behind: the group is this job's own
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
