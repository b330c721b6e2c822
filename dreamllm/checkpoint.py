"""The DreamLLM checkpoint format: what evaluation, the registry and serving load.

Owns: saving and loading an inference checkpoint, a directory holding
  dreamllm.json          format version, the model config (frozen components
                         named by HF id or by a path inside the checkpoint),
                         the stage it was trained in, whether the LLM was trained
  trainable.safetensors  DreamLLM's own parameters: visual projector, dream
                         queries, condition projector, added-token rows
  tokenizer/             the tokenizer with DreamLLM's tokens (exact ids)
  llm/                   the LLM (save_pretrained) when it was trained or has
                         no pretrained source
  vision/, diffusion/    frozen parts, in the HF/diffusers layouts, unless their
                         source is an HF id: random-init ones and ones loaded from a
                         local directory (e.g. a decoder trained by the platform) are
                         copied in, so the checkpoint loads on any machine
Loading reads exactly what saving wrote and gives identical outputs.
Object-storage URIs are copied to a local directory by the platform first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .config import DreamLLMConfig
from .model import DreamLLM
from .tokenizer import add_special_tokens

FORMAT_VERSION = 1
CONFIG_FILE = "dreamllm.json"
WEIGHTS_FILE = "trainable.safetensors"


def save_checkpoint(model: DreamLLM, path: str | Path, metadata: dict | None = None) -> Path:
    """Write `model` to directory `path` (created); returns the path.

    The LLM is written when its stage trained it, it has no pretrained source
    or its config says `copy_into_checkpoints`; frozen parts are written unless
    they come from an HF id (a local directory would not exist where the
    checkpoint is loaded).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = DreamLLMConfig.from_dict(model.cfg.to_dict())  # a copy whose sources we may point inside the checkpoint
    if model.llm_trainable or not cfg.llm.name_or_path or cfg.llm.copy_into_checkpoints:
        model.llm.save_pretrained(path / "llm")
        cfg.llm.name_or_path = "llm"
    if _not_from_hub(cfg.vision.name_or_path):
        model.vision.save_pretrained(path / "vision")
        cfg.vision.name_or_path = "vision"
    if _not_from_hub(cfg.diffusion.name_or_path):
        for part in ("unet", "vae"):
            getattr(model, part).save_pretrained(path / "diffusion" / part)
        model.noise_scheduler.save_pretrained(path / "diffusion" / "scheduler")
        cfg.diffusion.name_or_path = "diffusion"
    model.tokenizer.save_pretrained(path / "tokenizer")
    cfg.tokenizer.name_or_path = "tokenizer"
    own = {name: p.detach().contiguous().cpu() for name, p in model.own_named_parameters().items()}
    save_file(own, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "stage": model.stage, "llm_trained": model.llm_trainable,
        "config": cfg.to_dict(), "metadata": metadata or {}}, indent=2))
    return path


def _not_from_hub(source: str | None) -> bool:
    """True for a part built from random weights or loaded from a local directory (not an HF id)."""
    return not source or Path(source).is_dir()


def read_checkpoint_info(path: str | Path) -> dict:
    """The checkpoint's `dreamllm.json` (config, stage, metadata), validated."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ValueError(f"{path} is not a DreamLLM checkpoint: {CONFIG_FILE} is missing")
    info = json.loads(f.read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{f}: unsupported checkpoint format_version {info.get('format_version')!r} "
                         f"(this code reads {FORMAT_VERSION})")
    return info


def _resolve(root: Path, source: str | None) -> str | None:
    """A source inside the checkpoint becomes an absolute path; HF ids and absolute paths stay."""
    if source and (root / source).exists():
        return str(root / source)
    return source


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DreamLLM:
    """Load a checkpoint written by `save_checkpoint` (in eval mode, stage as saved)."""
    root = Path(path).resolve()
    info = read_checkpoint_info(root)
    cfg = DreamLLMConfig.from_dict(info["config"])
    for section in (cfg.llm, cfg.vision, cfg.diffusion, cfg.tokenizer):
        section.name_or_path = _resolve(root, section.name_or_path)
    tokenizer = add_special_tokens(AutoTokenizer.from_pretrained(cfg.tokenizer.name_or_path), cfg.tokenizer)
    model = DreamLLM.from_config(cfg, tokenizer)
    state = load_file(str(root / WEIGHTS_FILE))
    missing = sorted(set(model.own_named_parameters()) - set(state))
    if missing:
        raise ValueError(f"{root / WEIGHTS_FILE} lacks {missing}")
    model.load_state_dict(state, strict=False)
    model.set_stage(info["stage"], info.get("llm_trained"))
    return model.to(device=device, dtype=dtype).eval()
