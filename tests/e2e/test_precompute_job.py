"""The precompute job as users run it: fresh processes with their own local Ray, arguments on the command line.

The job is killed with SIGKILL after a few shards are committed, run again to
finish, and compared byte for byte with an uninterrupted run; a third run is a no-op.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_procs import kill_session

from dreamllm_platform.config import load_config
from dreamllm_platform.data.config import PrecomputeConfig
from dreamllm_platform.data.latents import run_precompute

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def job_env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.pop("PYTHONPATH", None)  # the job must put the repo on sys.path itself (no editable install)
    return env


def run_job(*args, timeout=240):
    return subprocess.run([sys.executable, "jobs/precompute_latents.py", *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)



def store_files(root: Path) -> dict[str, bytes]:
    """The store's files, without report.json and without the temp file of a write the kill cut short
    (storage.write_bytes renames a whole file into place; readers never list `.*.tmp`, and a later
    write of that file removes it once stale). Shards commit in bursts (in reading order), so a kill
    just after a manifest often lands in the next shard's write."""
    temps = [p for p in root.rglob(".*.tmp")]
    assert len(temps) <= 1, temps  # one driver writes one file at a time
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "report.json" and p not in temps}


def test_killed_job_resumes_to_the_same_store_and_reruns_as_a_no_op(tmp_path, ray_session):
    overrides = ["flavor=debug", f"data_root={tmp_path}/data", "synthetic.mmc4_shards=4", "synthetic.docs_per_shard=2",
                 "synthetic.webdataset_shards=4", "synthetic.pairs_per_shard=3", "synthetic.conversations=2",
                 "synthetic.instruct_docs=1", "ray_num_cpus=2"]
    args = [a for o in overrides + [f"output={tmp_path}/killed"] for a in ("--set", o)]
    job = subprocess.Popen([sys.executable, "jobs/precompute_latents.py", *args], cwd=REPO, env=job_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = tmp_path / "killed/manifest"
    deadline = time.time() + 180
    while job.poll() is None and time.time() < deadline and len(list(manifest.rglob("*.json"))) < 2:
        time.sleep(0.02)
    kill_session(job.pid)
    job.wait()
    committed = len(list(manifest.rglob("*.json")))
    assert 2 <= committed < 11, f"the kill should land mid-run, {committed} of 11 shards were committed"

    resumed = run_job(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"shards: 11 ({11 - committed} processed now, {committed} already complete)" in resumed.stdout

    # The same config, uninterrupted, in this process's Ray: the stores must be byte-identical.
    reference = load_config(PrecomputeConfig, overrides=overrides + [f"output={tmp_path}/ref"])
    run_precompute(reference)
    assert store_files(tmp_path / "killed") == store_files(tmp_path / "ref")
    report = json.loads((tmp_path / "killed/report.json").read_text())
    assert report["counts"]["images_out"] == 4 * 2 * 3 + 4 * 3 + 3 + 2 + 3 and report["dropped"] == {}

    again = run_job(*args)
    assert again.returncode == 0 and "shards: 11 (0 processed now, 11 already complete)" in again.stdout
    assert store_files(tmp_path / "killed") == store_files(tmp_path / "ref")


def test_bad_config_exits_with_a_one_line_reason():
    bad = run_job("--set", "filters.min_similarity=0.3", timeout=60)
    assert bad.returncode == 2
    assert "config error: unknown config key(s) filters.min_similarity" in bad.stderr
    assert "Traceback" not in bad.stderr
