"""The registry jobs as users run them: fresh processes, no PYTHONPATH, arguments on the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_job(name, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, f"jobs/{name}.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_promote_starts_from_a_checkout_and_fails_in_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_job("promote", "--history", "--set", f"tracking.tracking_uri={uri}")
    assert r.returncode == 0, r.stderr
    assert "alias moves of 'dreamllm' (0)" in r.stdout
    r = run_job("promote", "--version", "3", "--set", f"tracking.tracking_uri={uri}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"promote failed: registered model 'dreamllm' does not exist in {uri}"
    assert "Traceback" not in r.stderr
