"""Every shipped stage config parses into the typed config of its stage; bad keys are refused."""
from pathlib import Path

import pytest

from dreamllm_platform.config import load_config
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig
from dreamllm_platform.train.loop import deepspeed_config, lr_lambda

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("stage", list(STAGE_DEFAULTS))
@pytest.mark.parametrize("suffix", ["", "_7b"])
def test_shipped_stage_configs_parse(stage, suffix):
    cfg = load_config(TrainConfig, CONFIGS / f"{stage}{suffix}.yaml", (), STAGE_DEFAULTS[stage])
    assert cfg.stage == stage
    assert cfg.optim.lr == {"align": 2e-3, "igpt": 2e-5, "sft": 4e-5}[stage]  # the paper's
    if suffix:
        assert cfg.model.flavor == "7b" and cfg.deepspeed.precision == "bf16"
        assert cfg.checkpoint.storage_path.startswith("s3://")


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) optim.learning_rate; valid keys under optim"):
        load_config(TrainConfig, None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="stage must be one of"):
        load_config(TrainConfig, None, ["stage=pretrain"])
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(TrainConfig, None, ["deepspeed.zero_stage=4"])


def test_deepspeed_config_and_schedule():
    cfg = load_config(TrainConfig, None, ["optim.max_steps=100", "optim.warmup_ratio=0.1"])
    cpu, gpu = deepspeed_config(cfg, on_gpu=False), deepspeed_config(cfg, on_gpu=True)
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["bf16"]["enabled"] and gpu["bf16"]["enabled"]
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0)
