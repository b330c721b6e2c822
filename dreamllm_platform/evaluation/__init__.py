"""Evaluation of DreamLLM versions on a held-out set (losses, QA exact match, FID, CLIP score), and the learning check.

`config` (EvalConfig, LearningCheckConfig, LearningJobConfig), `heldout` (the
set), `metrics` (the metric maths and feature networks), `evaluate` (running
it and logging on the registry version), `scenes` (reading colour, shape and
position back from a synthetic-scene image), `learning` (trained vs untrained
comprehension and creation accuracy on held-out synthetic scenes).
"""
from .config import EvalConfig, FeatureSpec, HeldOutSpec, LearningCheckConfig, LearningJobConfig
from .evaluate import EvalResult, evaluate_model, run_evaluation
from .learning import LearningResult, learning_check, log_learning_check, run_learning_check, untrained_model
from .scenes import SceneGuess, describe

__all__ = ["EvalConfig", "EvalResult", "FeatureSpec", "HeldOutSpec", "LearningCheckConfig", "LearningJobConfig",
           "LearningResult", "SceneGuess", "describe", "evaluate_model", "learning_check", "log_learning_check",
           "run_evaluation", "run_learning_check", "untrained_model"]
