"""Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, debug flavor, on a real latent store and sqlite MLflow."""
import pytest
import torch
from PIL import Image

from dreamllm.checkpoint import load_checkpoint
from dreamllm.config import get_flavor
from dreamllm.model import DreamLLM
from dreamllm_platform import storage
from dreamllm_platform.config import load_config
from dreamllm_platform.data.config import PrecomputeConfig
from dreamllm_platform.data.latents import run_precompute
from dreamllm_platform.mlflow_tags import CHECKPOINT_URI_TAG
from dreamllm_platform.tracking import client
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig
from dreamllm_platform.train.trainer import FAIL_ENV, run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    run_precompute(PrecomputeConfig(flavor="debug", data_root=str(d / "data"), output=str(d / "store")))
    return d


def stage_cfg(stage, d, name, *sets) -> TrainConfig:
    base = ["model.flavor=debug", "scaling.num_workers=2", "log_every=1", "data.micro_batch_size=4",
            "tracking.sample_images=1", f"data.store={d / 'store'}", f"checkpoint.storage_path={d / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{d / 'mlflow.db'}", f"run_name={name}"]
    return load_config(TrainConfig, None, base + list(sets), STAGE_DEFAULTS[stage])


def history(cfg, run_id, key):
    return [(m.step, m.value) for m in client(cfg.tracking).get_metric_history(run_id, key)]


def test_three_stages_chain_through_their_exports_and_are_tracked(workdir):
    fresh = DreamLLM.from_config(get_flavor("debug"))
    exports = {}
    prev = None
    for stage in ("align", "igpt", "sft"):
        sets = ["optim.max_steps=3", "checkpoint.every_n_steps=3"] + ([f"model.init_from={prev}"] if prev else [])
        cfg = stage_cfg(stage, workdir, f"chain-{stage}", *sets)
        r = run_stage(cfg)
        assert r.metrics["step"] == 3
        exports[stage] = prev = r.export_uri
        run = client(cfg.tracking).get_run(r.mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == str(cfg.optim.lr) and run.data.params["stage"] == stage
        assert run.data.tags[CHECKPOINT_URI_TAG] == r.export_uri
        for key in ("loss", "loss_lm", "loss_diffusion", "lr", "tokens_per_s", "images_per_s", "samples_seen",
                    "grad_norm"):
            assert len(history(cfg, r.mlflow_run_id, key)) == 3, key
        artifacts = [a.path for a in client(cfg.tracking).list_artifacts(r.mlflow_run_id, "samples")]
        assert artifacts, "no sample images logged"
        # the run's pictures: its loss curves and the grid of its final samples (the same prompts each stage)
        plots = {a.path for a in client(cfg.tracking).list_artifacts(r.mlflow_run_id, "plots")}
        assert plots == {"plots/loss.png", "plots/samples_grid.png"}, plots
        grid = Image.open(client(cfg.tracking).download_artifacts(r.mlflow_run_id, "plots/samples_grid.png",
                                                                  str(workdir)))
        assert grid.format == "PNG" and grid.width == 160 and grid.height > 160, grid.size  # one cell + caption

    models = {s: load_checkpoint(u) for s, u in exports.items()}
    assert [m.stage for m in models.values()] == ["align", "igpt", "sft"]
    # stage I keeps the LLM frozen; stage II trains it; every stage trains the dream queries
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert same(models["align"].llm, fresh.llm)
    assert not same(models["igpt"].llm, models["align"].llm)
    assert not torch.equal(models["align"].dream_queries, fresh.dream_queries)
    assert not torch.equal(models["sft"].dream_queries, models["igpt"].dream_queries)


def test_loss_falls_over_a_short_run(workdir):
    cfg = stage_cfg("igpt", workdir, "loss-falls", "optim.max_steps=24", "optim.lr=3e-3", "optim.warmup_ratio=0",
                    "checkpoint.every_n_steps=24", "log_every=4", "tracking.sample_images=0")
    r = run_stage(cfg)
    lm = [v for _, v in history(cfg, r.mlflow_run_id, "loss_lm")]
    assert len(lm) == 6
    assert sum(lm[-2:]) / 2 < 0.8 * sum(lm[:2]) / 2, lm


def test_a_dead_worker_resumes_from_the_s3_checkpoint_and_resubmission_continues(workdir, s3, monkeypatch):
    storage_path = f"s3://{s3['bucket']}/train-fault"
    sets = [f"checkpoint.storage_path={storage_path}", "checkpoint.every_n_steps=2", "tracking.sample_images=0"]
    cfg = stage_cfg("igpt", workdir, "fault", "optim.max_steps=5", *sets)
    monkeypatch.setenv(FAIL_ENV, "3")  # the last rank dies once, at step 3
    r = run_stage(cfg)
    assert storage.exists(f"{storage_path}/fault/.fault_injected")
    assert r.metrics["step"] == 5 and r.checkpoint.endswith("step_0000005")
    assert [v for _, v in history(cfg, r.mlflow_run_id, "resumed_from_step")] == [2.0]
    # steps 1-2 were logged, a worker died in step 3 (before its metrics were reduced), and
    # steps 3-5 ran again from the step-2 checkpoint
    assert sorted(s for s, _ in history(cfg, r.mlflow_run_id, "loss")) == [1, 2, 3, 4, 5]
    assert storage.exists(f"{r.export_uri}/dreamllm.json")

    monkeypatch.delenv(FAIL_ENV)
    again = run_stage(stage_cfg("igpt", workdir, "fault", "optim.max_steps=7", *sets))
    assert again.mlflow_run_id == r.mlflow_run_id  # the same MLflow run goes on
    assert again.metrics["step"] == 7
    # it resumed from step 5; should a worker of this run fail too, Ray restarts it from step 5 again
    resumes = [v for _, v in history(cfg, r.mlflow_run_id, "resumed_from_step")]
    assert resumes[0] == 2.0 and len(resumes) >= 2 and set(resumes[1:]) == {5.0}, resumes
    assert client(cfg.tracking).get_run(r.mlflow_run_id).info.status == "FINISHED"
