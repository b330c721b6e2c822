"""DreamLLM in plain PyTorch + transformers + diffusers (no Ray, no object storage)."""
from .config import STAGES, DreamLLMConfig, get_flavor

__all__ = ["STAGES", "DreamLLMConfig", "get_flavor"]
