import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from dreamllm.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from dreamllm.config import DreamLLMConfig
from dreamllm.generation import ImageSampling, TextSampling, generate_document, text_to_image
from dreamllm.model import DreamLLM


def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("stage", ["align", "sft"])
def test_save_then_load_gives_identical_outputs(model, batch, tmp_path, stage):
    model.set_stage(stage)
    _perturb(model)  # trained weights, not the init
    save_checkpoint(model, tmp_path / "ckpt", metadata={"run": "test"})
    info = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert info["stage"] == stage and info["llm_trained"] == (stage == "sft") and info["metadata"] == {"run": "test"}
    loaded = load_checkpoint(tmp_path / "ckpt")
    model.eval()
    a = model(**batch, generator=torch.Generator().manual_seed(0))
    b = loaded(**batch, generator=torch.Generator().manual_seed(0))
    assert a.loss_lm == b.loss_lm and a.loss_diffusion == b.loss_diffusion
    s = ImageSampling(num_inference_steps=2, seed=1)
    assert np.array_equal(np.asarray(text_to_image(model, ["a red ring"], s)[0]),
                          np.asarray(text_to_image(loaded, ["a red ring"], s)[0]))
    t = TextSampling(max_new_tokens=6, temperature=0.8, seed=3)
    assert generate_document(model, "Once", t) == generate_document(loaded, "Once", t)


def test_pretrained_components_load_from_local_paths_like_the_7b_flavor(model, cfg, tmp_path):
    """The real-weights path (from_pretrained on each part) on weights saved here, no hub."""
    from dreamllm.tokenizer import _train_bpe
    from tokenizers import Tokenizer
    base_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_train_bpe(cfg.tokenizer.vocab_size)),
                                       bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model.llm.save_pretrained(tmp_path / "vicuna")
    base_tok.save_pretrained(tmp_path / "vicuna")  # a tokenizer without DreamLLM's tokens, as Vicuna's
    model.vision.save_pretrained(tmp_path / "clip")
    for part in ("unet", "vae"):
        getattr(model, part).save_pretrained(tmp_path / "sd" / part)
    model.noise_scheduler.save_pretrained(tmp_path / "sd" / "scheduler")
    d = cfg.to_dict()
    d["llm"]["name_or_path"] = d["tokenizer"]["name_or_path"] = str(tmp_path / "vicuna")
    d["vision"]["name_or_path"] = str(tmp_path / "clip")
    d["diffusion"]["name_or_path"] = str(tmp_path / "sd")
    from dreamllm.tokenizer import build_tokenizer
    cfg7 = DreamLLMConfig.from_dict(d)
    real = DreamLLM.from_config(cfg7, build_tokenizer(cfg7.tokenizer))
    assert len(real.tokenizer) == len(model.tokenizer)
    for part in ("llm", "vision", "unet", "vae"):
        for (n, p), (_, q) in zip(getattr(model, part).state_dict().items(), getattr(real, part).state_dict().items()):
            assert torch.equal(p, q), f"{part}.{n}"
    # a stage-I checkpoint of it names the untrained LLM instead of copying it; frozen parts from
    # local directories are copied in (they would not exist where the checkpoint is loaded)
    real.set_stage("align")
    save_checkpoint(real, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "llm").exists()
    assert (tmp_path / "ckpt" / "diffusion" / "vae").is_dir() and (tmp_path / "ckpt" / "vision").is_dir()
    info = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert info["config"]["llm"]["name_or_path"] == str(tmp_path / "vicuna")
    assert (info["config"]["diffusion"]["name_or_path"], info["config"]["vision"]["name_or_path"]) == ("diffusion", "vision")
    again = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(again.dream_queries, real.dream_queries)
    for part in ("vision", "unet", "vae"):
        for (n, p), (_, q) in zip(getattr(real, part).state_dict().items(), getattr(again, part).state_dict().items()):
            assert torch.equal(p, q), f"{part}.{n}"


def test_hub_ids_are_named_not_copied(model, cfg, tmp_path):
    d = cfg.to_dict()
    d["diffusion"]["name_or_path"] = "stabilityai/stable-diffusion-2-1-base"  # as the 7b flavor: an HF id
    model.cfg = DreamLLMConfig.from_dict(d)  # a fresh model per test: nothing else sees this
    save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "diffusion").exists()
    info = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert info["config"]["diffusion"]["name_or_path"] == "stabilityai/stable-diffusion-2-1-base"


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a DreamLLM checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="unsupported checkpoint format_version 99"):
        load_checkpoint(tmp_path)
