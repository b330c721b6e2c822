"""`make ui` for real: jobs/ui.py in a process of its own on a temporary sqlite store with one run, its MLflow
UI read over HTTP (the page and the REST API list that run), the Ray dashboard line of the running local Ray,
then Ctrl-C (SIGINT) stops the UI and its server."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dreamllm_platform.config import load_config
from dreamllm_platform.dashboards import UiConfig
from dreamllm_platform.tracking import TrackingConfig, end_run, start_or_resume_run

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read().decode()


def test_the_ui_lists_the_stores_run_names_the_ray_dashboard_and_stops_on_ctrl_c(tmp_path, ray_session):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art"))
    run_id, _ = start_or_resume_run(cfg, "ui-check")
    end_run(cfg, run_id, "FINISHED")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen([sys.executable, "jobs/ui.py", "--set", f"tracking.tracking_uri={cfg.tracking_uri}",
                             "--set", "port=0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    stopped = False
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops the UI" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        out = "".join(lines)
        url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", out).group(1)

        status, page = _get(f"{url}/")
        assert status == 200 and "<html" in page.lower()
        _, experiments = _get(f"{url}/api/2.0/mlflow/experiments/search?max_results=100")
        exp = {e["name"]: e["experiment_id"] for e in json.loads(experiments)["experiments"]}
        assert "dreamllm" in exp, exp
        _, runs = _get(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["dreamllm"]]})
        assert [r["info"]["run_id"] for r in json.loads(runs)["runs"]] == [run_id]

        # The session's local Ray (started like the jobs', without a dashboard) is named, with how to get one.
        gcs = ray_session.get_runtime_context().gcs_address
        assert f"Ray at {gcs}: running without a dashboard" in out, out
        assert "ray start --head --include-dashboard=true" in out

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == 0, "".join(lines)
        reader.join(timeout=10)
        assert "stopping the MLflow UI" in "".join(lines)
        try:
            _get(f"{url}/health")
            raise AssertionError("the UI still answers after Ctrl-C")
        except OSError:
            stopped = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server = re.search(r"server pid (\d+)", "".join(lines))
        if server and not stopped:  # the job stops its server; if it failed to, the test does (the group is the server's own)
            try:
                os.killpg(int(server.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_configs_ui_yaml_is_the_embedded_defaults():
    assert load_config(UiConfig, ROOT / "configs/ui.yaml") == UiConfig()
