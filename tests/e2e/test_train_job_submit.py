"""`ray job submit` of the I-GPT job against a real `ray start --head` on loopback, as users run it.

The job gets only command-line overrides; it prepares its own latent store
(synthetic data + precompute), trains 3 steps with DeepSpeed on 2 workers and
exports the stage.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from e2e_procs import kill_session

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback with the job server; its temp dir is short (Unix socket paths are limited)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    short_tmp = tempfile.mkdtemp(prefix="rh", dir=os.environ.get("TMPDIR"))
    # As with an activated venv: the job's `python` is this environment's.
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=short_tmp, HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    gcs, dash = free_port(), free_port()
    # Every port the head would take by default (agent, metrics, runtime env, client) is chosen
    # free: the test session's own Ray already holds the defaults, and the head's raylet exits
    # when its dashboard agent cannot bind.
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--ray-client-server-port={free_port()}"]
    # `--block` in a session of its own: teardown stops exactly this cluster (`ray stop` would stop
    # every Ray on the machine, the test session's own included).
    proc = subprocess.Popen([ray_bin(), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                             "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={short_tmp}", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while subprocess.run([ray_bin(), "job", "list", f"--address={address}"], env=env,
                         capture_output=True).returncode != 0:
        assert proc.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(2)
    yield env, address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc.pid)  # whatever the head left behind in its session
    shutil.rmtree(short_tmp, ignore_errors=True)



def test_ray_job_submit_runs_the_igpt_job_to_completion(head, tmp_path):
    env, address = head
    (tmp_path / "precompute.yaml").write_text(f"data_root: {tmp_path}/data\n")
    sets = ["model.flavor=debug", "optim.max_steps=3", "checkpoint.every_n_steps=3", "data.micro_batch_size=4",
            "tracking.sample_images=0", f"data.store={tmp_path}/store", f"data.precompute_config={tmp_path}/precompute.yaml",
            f"checkpoint.storage_path={tmp_path}/ray", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    args = [a for s in sets for a in ("--set", s)]
    for _ in range(15):
        r = subprocess.run([ray_bin(), "job", "submit", f"--address={address}", "--working-dir", str(REPO), "--",
                            "python", "jobs/igpt.py", *args], env=env, capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        if "No available agent to submit job" not in out:  # the head answers before its job agent is up
            break
        time.sleep(2)
    assert r.returncode == 0, out[-4000:]
    assert "stage igpt finished" in out and "succeeded" in out, out[-4000:]
    export = tmp_path / "ray" / "dreamllm-igpt-debug" / "export"
    info = json.loads((export / "dreamllm.json").read_text())
    assert info["stage"] == "igpt" and info["metadata"]["step"] == 3
    assert (tmp_path / "store").is_dir()  # the job prepared its own latent store
