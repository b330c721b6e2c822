"""The synergy ablation job on the debug flavor, as a user runs it (`python jobs/ablation.py` in a fresh
process): two arms share the pipeline's data, towers and latents, each trains its own stages, and the
figures land on an MLflow parent run with one child per arm x seed, with a table and a plot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_pipeline import QUICK

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PIPELINE = [q for q in QUICK if not q.startswith(("api_port", "evaluate.", "learning.", "serve."))]
CHECK = ["check.question_scenes=2", "check.prompts=2", "check.image_steps=2"]


def run_ablation(root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI")}
    sets = [f"root={root}", "seeds=[0]", *CHECK, *(f"pipeline.{q}" for q in PIPELINE),
            "arms={joint: {}, creation_only: {align: {data: {assembly: {pair_tasks: [creation]}}}, "
            "igpt: {data: {assembly: {pair_tasks: [creation]}}}, sft: {data: {mix: {llava: 0.0}}}}}", *extra]
    return subprocess.run([sys.executable, "jobs/ablation.py", *[a for kv in sets for a in ("--set", kv)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_two_arms_train_their_own_stages_and_log_child_runs(tmp_path):
    from mlflow import MlflowClient

    r = run_ablation(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "synergy ablation: mean ± standard deviation over 1 seed(s)" in r.stdout
    files = tmp_path / "ablation"
    doc = json.loads((files / "figures.json").read_text())
    assert set(doc["figures"]) == {"joint", "creation_only"}
    assert Image.open(files / "ablation.png").format == "PNG"
    # Shared steps ran once; each arm has its own stage III run.
    joint = json.loads((tmp_path / "ablation-joint-seed0.json").read_text())["steps"]
    creation = json.loads((tmp_path / "ablation-creation_only-seed0.json").read_text())["steps"]
    assert joint["towers"]["result"] == creation["towers"]["result"]  # trained once, found finished after
    assert joint["latents"]["result"]["store"] == creation["latents"]["result"]["store"]
    assert joint["sft"]["result"]["export"] != creation["sft"]["result"]["export"]
    assert r.stdout.count("already holds finished towers of this config") == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dreamllm")
    parent = client.search_runs([exp.experiment_id], "tags.`dreamllm.job` = 'ablation'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dreamllm.ablation.arm"] for c in children) == ["creation_only", "joint"]
    assert all("learning.creation.color" in c.data.metrics for c in children)
    assert parent.data.metrics["joint.creation.color.std"] == 0.0
    assert parent.info.status == "FINISHED"
    # A resubmission finds every arm done and only measures again.
    again = run_ablation(tmp_path)
    assert again.returncode == 0 and "stage III: SFT: done in an earlier run, skipped" in again.stdout


def test_the_summary_gives_mean_and_spread_and_bad_arms_are_refused():
    from dreamllm_platform.ablation import AblationConfig, summarise
    from dreamllm_platform.config import load_config

    s = summarise({"joint": [{"creation.color": 0.2}, {"creation.color": 0.4}]})
    assert s["joint"]["creation.color"][0] == pytest.approx(0.3)
    assert s["joint"]["creation.color"][1] == pytest.approx(0.1414, abs=1e-3)
    with pytest.raises(ValueError, match="only hold the sections align, igpt, sft"):
        load_config(AblationConfig, None, ["arms={x: {towers: {}}}"])
    assert load_config(AblationConfig, REPO / "configs/ablation.yaml") == AblationConfig()
