"""The one Ray Train job skeleton: fit a worker loop with tracking, checkpoints and failure handling.

Owns: `fit`, which every training job of the platform (the three stages and
the towers) goes through: the MLflow run (created or resumed by run name,
always closed FINISHED, FAILED or KILLED by `tracking.run`), the
TorchTrainer with its RunConfig (the run's name and storage path),
FailureConfig (worker-group restarts from the last reported checkpoint) and
CheckpointConfig, and SIGTERM (`ray job stop`) turned into a clean close.
Also the one place where local paths of a job's config become absolute (its
workers run in another directory, maybe on another node).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import storage, tracking
from ..runtime import sigterm_raises


@dataclass
class Fitted:
    """What `fit` returns: the Ray Train result and the MLflow run it logged into."""

    result: Any
    run_id: str
    resumed: bool


def absolute(uri: str | None) -> str | None:
    """`storage.absolute` that passes None (an optional path) and models:/ references through."""
    if uri is None or uri.startswith("models:/"):
        return uri
    return storage.absolute(uri)


def fit(loop: Callable[[dict], None], loop_config: dict, *, run_name: str, storage_path: str,
        scaling, max_failures: int, num_to_keep: int, datasets: Mapping[str, Any] | None,
        tracking_cfg: tracking.TrackingConfig, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None, label: str = "train",
        check: Callable[[Any], None] | None = None) -> Fitted:
    """Run `loop` on the workers of `scaling` inside the MLflow run `run_name` and return the result.

    The loop gets `{**loop_config, "run_id": <MLflow run id>}`. A run of the same name resumes from its
    last checkpoint in `storage_path/run_name`. `check(result)`, when given, runs before the MLflow run
    is closed, so an output it finds missing fails the run too.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    with tracking.run(tracking_cfg, run_name, params=params, tags=tags) as (run_id, resumed):
        print(f"[{label}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {tracking_cfg.tracking_uri}",
              flush=True)
        trainer = TorchTrainer(
            loop, train_loop_config={**loop_config, "run_id": run_id}, scaling_config=scaling,
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage_path,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep)),
            datasets=dict(datasets or {}))
        with sigterm_raises():  # `ray job stop` still closes the run (KILLED)
            result = trainer.fit()
        if check:
            check(result)
    return Fitted(result, run_id, resumed)
