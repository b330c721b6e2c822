"""Staged DreamLLM training on Ray Train + DeepSpeed (align, I-GPT, SFT)."""
