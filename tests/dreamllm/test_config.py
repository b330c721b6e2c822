import pytest

from dreamllm.config import FLAVORS, DreamLLMConfig, get_flavor


@pytest.mark.parametrize("name", list(FLAVORS))
def test_flavors_round_trip_through_dicts(name):
    cfg = get_flavor(name)
    assert DreamLLMConfig.from_dict(cfg.to_dict()) == cfg


def test_7b_flavor_matches_the_paper():
    cfg = get_flavor("7b")
    assert cfg.llm.name_or_path == "lmsys/vicuna-7b-v1.1" and cfg.llm.context_length == 2048
    assert cfg.vision.name_or_path == "openai/clip-vit-large-patch14" and cfg.vision.num_tokens == 256
    assert cfg.vision.select_layer == -2
    assert cfg.diffusion.name_or_path == "stabilityai/stable-diffusion-2-1-base"
    assert cfg.diffusion.cross_attention_dim == 1024 and cfg.num_dream_queries == 64
    assert (cfg.stage_losses["igpt"].lm, cfg.stage_losses["igpt"].diffusion) == (1.0, 10.0)


def test_unknown_keys_are_rejected_with_the_valid_ones_listed():
    with pytest.raises(ValueError, match=r"llm\.hiden.*valid keys under llm: context_length"):
        DreamLLMConfig.from_dict({"llm": {"hiden": 3}})
    with pytest.raises(ValueError, match="unknown flavor 'huge'"):
        get_flavor("huge")
    with pytest.raises(ValueError, match="unknown stage"):
        DreamLLMConfig.from_dict({"stage_losses": {"pretrain": {"lm": 1.0}}})


def test_values_are_checked():
    with pytest.raises(ValueError, match="condition_dropout"):
        DreamLLMConfig.from_dict({"condition_dropout": 1.5})
    with pytest.raises(ValueError, match="cannot hold one image"):
        DreamLLMConfig.from_dict({"llm": {"context_length": 20}})


def test_partial_stage_losses_keep_the_other_defaults():
    cfg = DreamLLMConfig.from_dict({"stage_losses": {"igpt": {"diffusion": 5.0}}})
    assert cfg.stage_losses["igpt"].diffusion == 5.0 and cfg.stage_losses["sft"].diffusion == 10.0
