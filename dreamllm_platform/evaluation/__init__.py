"""Evaluation of DreamLLM versions on a held-out set (losses, QA exact match, FID, CLIP score).

`config` (EvalConfig), `heldout` (the set), `metrics` (the metric maths and
feature networks), `evaluate` (running it and logging on the registry version).
"""
from .config import EvalConfig, FeatureSpec, HeldOutSpec
from .evaluate import EvalResult, evaluate_model, run_evaluation

__all__ = ["EvalConfig", "EvalResult", "FeatureSpec", "HeldOutSpec", "evaluate_model", "run_evaluation"]
