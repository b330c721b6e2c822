"""The pipeline's config: every step's config derived from one root, checked before anything runs; the state file."""
from pathlib import Path

import pytest

from dreamllm_platform.config import load_config
from dreamllm_platform.pipeline import STEP_NAMES, PipelineConfig, State, StepConfigs, resolved_tracking

ROOT = Path(__file__).resolve().parents[2]


def test_configs_pipeline_yaml_is_the_embedded_defaults():
    assert load_config(PipelineConfig, ROOT / "configs/pipeline.yaml") == PipelineConfig()


def test_every_output_of_every_step_lives_under_the_root(tmp_path):
    root = str(tmp_path / "p")
    c = StepConfigs(load_config(PipelineConfig, None, [f"root={root}", "flavor=debug", "sft.optim.max_steps=7"]))
    assert c.cfg.root == root and c.towers.output == f"{root}/towers" and c.towers.flavor == "debug"
    assert c.towers.checkpoint.storage_path == f"{root}/ray_results"
    assert c.latents.output == f"{root}/latent_store" and c.latents.decoder == f"{root}/towers"
    for stage, tc in c.stages.items():
        assert tc.stage == stage and tc.model.decoder == f"{root}/towers" and tc.data.store == f"{root}/latent_store"
        assert tc.checkpoint.storage_path == f"{root}/ray_results" and not tc.data.prepare
    assert c.stages["sft"].optim.max_steps == 7
    assert c.stages["align"].optim.lr == 2e-3  # the paper's stage I rate
    # The LLM at the paper's fine-tuning rates, in proportion to stage I's (1/100, 1/50).
    assert c.stages["igpt"].optim.llm_lr == pytest.approx(2e-3 / 100)
    assert c.stages["sft"].optim.llm_lr == pytest.approx(2e-3 / 50)
    uri = f"sqlite:///{Path(root).resolve()}/mlflow.db"
    assert resolved_tracking(c.cfg).tracking_uri == uri
    assert c.stages["igpt"].tracking.tracking_uri == uri and c.learning.tracking.tracking_uri == uri
    assert c.serve.model.uri == "models:/dreamllm@champion" and c.evaluate.heldout.root == f"{root}/heldout"
    assert not Path(root).exists()  # building the configs writes nothing


def test_a_wrong_key_names_the_step_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"^igpt: unknown config key\(s\) optim.learnig_rate; valid keys"):
        StepConfigs(load_config(PipelineConfig, None, ["igpt.optim.learnig_rate=1"]))
    with pytest.raises(ValueError, match="flavor must be debug or small"):
        load_config(PipelineConfig, None, ["flavor=7b"])


def test_state_keeps_finished_steps_by_key_and_survives_a_corrupt_file(tmp_path, capsys):
    s = State(str(tmp_path), None)
    s.record("synthetic", "k1", {"data_root": "x"}, 1.0)
    again = State(str(tmp_path), None)
    assert again.done("synthetic", "k1") == {"data_root": "x"}
    assert again.done("synthetic", "k2") is None and again.done("towers", "k1") is None
    (tmp_path / "pipeline.json").write_text("{not json")
    assert State(str(tmp_path), None).steps == {}
    assert "not valid JSON" in capsys.readouterr().out
    assert STEP_NAMES[0] == "synthetic" and STEP_NAMES[-1] == "learning"
