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


def test_help_config_prints_every_key_with_its_value_and_meaning(capsys):
    from dreamllm_platform.config import parse_job_args

    with pytest.raises(SystemExit) as e:
        parse_job_args(TrainConfig, ["--help-config", "--set", "optim.lr=3e-4"], "test", base=STAGE_DEFAULTS["sft"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("optim.lr: 0.0003  # Peak learning rate of DreamLLM's own parameters") for line in out)
    assert any(line.startswith("optim.llm_lr: null  # Peak learning rate of the LLM's parameters") for line in out)
    assert "stage: sft  # align (I), igpt (II) or sft (III)." in out
    assert any(line.startswith("data.mix: {instruct: 1.0, llava: 1.0}") for line in out)
    assert "optim:  # Optimiser and schedule." in out
    # every leaf key of the config is listed, each with its docstring
    leaves = [line for line in out if not line.endswith(":") and ":  #" not in line]
    assert {line.split(":")[0] for line in leaves} == set(_leaf_keys(TrainConfig()))
    assert all("  # " in line for line in leaves)


def _leaf_keys(cfg, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        yield from _leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
