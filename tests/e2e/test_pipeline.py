"""The main job end to end on the `debug` flavor, as a user runs it: `python jobs/pipeline.py` in a fresh process.

One module-scoped run goes through every step (synthetic shards, towers
pretraining, latents, the three stages, register, evaluate, promote, serve with
two requests through the openai client, the learning curve); the tests then
read what it left: the state file, the registry, the files the API calls saved,
the MLflow run. A resubmission with one stage changed reruns only that stage
and what follows it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Tiny but complete: every step runs its real code path on the debug flavor.
QUICK = [
    "flavor=debug", "api_port=0",
    "synthetic.mmc4_shards=1", "synthetic.docs_per_shard=4", "synthetic.webdataset_shards=1",
    "synthetic.pairs_per_shard=16", "synthetic.parquet_shards=1", "synthetic.conversations=8",
    "synthetic.instruct_docs=2",
    "towers.vae.steps=4", "towers.unet.steps=4", "towers.vae.batch_size=4", "towers.unet.batch_size=4",
    "towers.vision.steps=4", "towers.vision.batch_size=4", "towers.llm.steps=4", "towers.llm.batch_size=4",
    "towers.llm.scored=1",
    "align.optim.max_steps=3", "igpt.optim.max_steps=3", "sft.optim.max_steps=3",
    "align.data.micro_batch_size=4", "igpt.data.micro_batch_size=4", "sft.data.micro_batch_size=4",
    "align.scaling.num_workers=1", "igpt.scaling.num_workers=1", "sft.scaling.num_workers=1",
    "evaluate.text_to_image=0", "evaluate.image_steps=2", "evaluate.heldout.max_pairs=4",
    "evaluate.heldout.max_questions=4",
    "learning.check.question_scenes=3", "learning.check.prompts=3", "learning.check.image_steps=2", "serve.defaults.steps=2",
]


def run_pipeline(root: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "MLFLOW_TRACKING_URI")}
    args = [a for kv in [f"root={root}", *QUICK, *extra] for a in ("--set", kv)]
    return subprocess.run([sys.executable, "jobs/pipeline.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    r = run_pipeline(root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return root, r


def state(root: Path) -> dict:
    return json.loads((root / "pipeline.json").read_text())["steps"]


def test_every_step_runs_and_the_summary_says_where_outputs_are(first_run):
    root, r = first_run
    steps = state(root)
    assert list(steps) == ["synthetic", "towers", "latents", "align", "igpt", "sft", "register", "evaluate",
                           "promote", "serve", "learning"]
    for i, step in enumerate(steps, 1):  # progress: a line when each step starts and when it finishes
        assert f"[{i:>2}/11]" in r.stdout
    assert "DreamLLM pipeline finished" in r.stdout
    for path in (steps["towers"]["result"]["towers"], steps["latents"]["result"]["store"],
                 steps["sft"]["result"]["export"], steps["serve"]["result"]["created_image"]):
        assert path in r.stdout and Path(path).exists(), path
    for stage in ("towers", "align", "igpt", "sft"):  # each training run's pictures, named in the summary
        plots = steps[stage]["result"]["pictures"]
        assert plots in r.stdout, plots
        assert {p.name for p in Path(plots.removeprefix("file://")).iterdir()} == {"loss.png", "samples_grid.png"}
    # The evaluation's figure (its metrics; it created no images: text_to_image=0) on its run, named too.
    figures = steps["evaluate"]["result"]["pictures"]
    assert list(figures) == ["plots/metrics.png"], figures
    assert figures["plots/metrics.png"] in r.stdout
    assert Image.open(figures["plots/metrics.png"].removeprefix("file://")).format == "PNG"
    # The towers the stages were trained with are the pretrained ones, inside the exported checkpoint.
    ckpt = json.loads((Path(steps["sft"]["result"]["export"]) / "dreamllm.json").read_text())
    assert ckpt["stage"] == "sft" and ckpt["config"]["flavor"] == "debug"
    assert (Path(steps["towers"]["result"]["towers"]) / "decoder.json").is_file()


def test_the_candidate_passed_the_gate_and_the_api_answered(first_run):
    root, _ = first_run
    steps = state(root)
    assert steps["register"]["result"]["version"] == "1"
    assert steps["promote"]["result"] == {"champion": "1", "promoted": True, "failures": []}
    assert {"val_loss_lm", "val_loss_diffusion", "qa_exact_match"} <= set(steps["evaluate"]["result"]["metrics"])
    serve = steps["serve"]["result"]
    chat = json.loads(Path(serve["chat"]).read_text())
    assert chat["question"] == "What color is the circle?" and isinstance(chat["answer"], str)
    assert Image.open(serve["created_image"]).size == (32, 32)  # the debug flavor's native resolution
    assert serve["api"].startswith("http://127.0.0.1:")


def test_the_learning_curve_is_printed_plotted_and_logged_on_the_sft_run(first_run):
    from mlflow import MlflowClient

    root, r = first_run
    steps = state(root)
    result = steps["learning"]["result"]
    assert "Learning check after every stage" in r.stdout
    assert list(result["curve"]) == ["untrained", "align", "igpt", "sft"]
    header = result["table"].splitlines()[0].split()
    assert header == ["untrained", "align", "igpt", "sft", "ceiling", "chance"]
    metrics = result["metrics"]
    for stage in ("untrained", "align", "igpt", "sft"):
        for k in ("comprehension.color", "creation.shape", "creation.diffusion_loss", "creation.null_gap"):
            assert f"learning.{stage}.{k}" in metrics
    accuracies = {k: v for k, v in metrics.items() if not k.endswith(("diffusion_loss", "null_gap"))}
    assert all(0.0 <= v <= 1.0 for v in accuracies.values())
    assert metrics["learning.creation.color"] == metrics["learning.sft.creation.color"]
    plot = Image.open(result["plot"])
    assert plot.format == "PNG" and plot.size[0] > 600
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = steps["sft"]["result"]["mlflow_run_id"]
    logged = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("learning.")}
    assert logged == pytest.approx(metrics)
    assert "learning_check/curve.png" in [a.path for a in client.list_artifacts(run_id, "learning_check")]


def test_a_resubmission_skips_finished_steps_and_reruns_a_changed_stage(first_run):
    root, _ = first_run
    before = state(root)
    r = run_pipeline(root, "sft.optim.max_steps=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    after = state(root)
    for step in ("synthetic", "towers", "latents", "align", "igpt"):
        assert after[step] == before[step], step
        assert f"{step_title(step)}: done in an earlier run, skipped" in r.stdout
    assert after["sft"]["key"] != before["sft"]["key"]
    assert after["sft"]["result"]["run_name"] != before["sft"]["result"]["run_name"]  # a fresh run, not a resume
    assert after["register"]["result"]["version"] == "2"


def step_title(step: str) -> str:
    from dreamllm_platform.pipeline import STEPS

    return next(s.title for s in STEPS if s.name == step)


def test_a_wrong_key_fails_in_one_line_before_anything_runs(tmp_path):
    r = run_pipeline(tmp_path / "never", "align.optim.learning_rate=1", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("config error: align: unknown config key(s) optim.learning_rate")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "never").exists()
