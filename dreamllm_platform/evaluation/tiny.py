"""Tiny random feature networks in the formats real runs use, for tests and the CPU demo (no downloads).

Owns: `save_tiny_inception` (a TorchScript module with the call signature of
NVIDIA's inception-2015-12-05.pt: net(x in [0, 255], return_features=True) ->
(N, D)) and `save_tiny_clip` (a random transformers CLIPModel saved with a
tokenizer, loadable like a saved openai/clip-vit-*). Metrics computed with
them are meaningless as numbers but exercise exactly the real code path.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x / 127.5 - 1.0))))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (N, 32)
        return feats if return_features else feats.sum(dim=1)


def save_tiny_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a random TorchScript feature network (32 features) to `path`."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_TinyInception().eval()).save(str(path))
    return path


def save_tiny_clip(path: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a random CLIPModel (width 32, one layer per tower) and the debug flavor's tokenizer to `path`."""
    from transformers import CLIPConfig, CLIPModel

    from dreamllm.config import get_flavor
    from dreamllm.tokenizer import build_tokenizer

    tok = build_tokenizer(get_flavor("debug").tokenizer)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **common),
                     vision_config=dict(image_size=image_size, patch_size=8, **common), projection_dim=16)
    torch.manual_seed(seed)
    path = Path(path)
    CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
