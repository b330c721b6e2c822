"""The one Ray Train job skeleton: fit a worker loop with tracking, checkpoints and failure handling.

Owns: `fit`, which every training job of the platform (the three stages and
the towers) goes through: the MLflow run (created or resumed by run name,
always closed FINISHED, FAILED or KILLED by `tracking.run`), the
TorchTrainer with its RunConfig (the run's name and storage path),
FailureConfig (worker-group restarts from the last reported checkpoint) and
CheckpointConfig, Ray Data ingest that keeps the order (so a shard's epoch
is the same rows in the same order every time, which a resume relies on),
the config of a resumed run compared with the one it started with (changes
that alter what is computed are refused, the others recorded in a tag), and
SIGTERM (`ray job stop`) turned into a clean close.
Also the one place where local paths of a job's config become absolute (its
workers run in another directory, maybe on another node).
"""
from __future__ import annotations

from dataclasses import dataclass
import json
from typing import Any, Callable, Iterable, Mapping

from .. import storage, tracking
from ..mlflow_tags import CONFIG_CHANGES_TAG
from ..runtime import sigterm_raises


UNSET = "<unset>"
"""The logged value of a param the run did not log."""


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
        check: Callable[[Any], None] | None = None, may_change: Iterable[str] | None = None) -> Fitted:
    """Run `loop` on the workers of `scaling` inside the MLflow run `run_name` and return the result.

    The loop gets `{**loop_config, "run_id": <MLflow run id>}`. A run of the same name resumes from its
    last checkpoint in `storage_path/run_name`. `check(result)`, when given, runs before the MLflow run
    is closed, so an output it finds missing fails the run too.

    `may_change`: the param keys (or prefixes ending in ".") a resumed run may change (a harmless one such as
    `log_every`, or `optim.max_steps` to train on); a change of any other key, one that alters what is
    computed, is refused with a ValueError naming the keys, before the run is touched (a key the run never
    logged, from a newer config, is not). Without it, every change is allowed. Allowed changes are recorded
    in the run's `dreamllm.config_changes` tag.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    changes = config_changes(tracking_cfg, run_name, params or {})
    if may_change is not None:
        allowed = tuple(may_change)
        may = lambda k: any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)  # noqa: E731
        refused = sorted(k for k, (was, _) in changes.items() if was != UNSET and not may(k))
        if refused:
            raise ValueError(f"run {run_name!r} resumes with a changed config that changes what it computes: "
                             + ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
                             + "; set them back or use a new run_name")
    with tracking.run(tracking_cfg, run_name, params=params, tags=tags) as (run_id, resumed):
        print(f"[{label}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {tracking_cfg.tracking_uri}",
              flush=True)
        if changes:
            tracking.RunLogger(tracking_cfg, run_id).tags({CONFIG_CHANGES_TAG: json.dumps(changes, sort_keys=True)})
            print(f"[{label}] resumed with a changed config: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())), flush=True)
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the same rows in the same order every epoch: what resuming replays
        trainer = TorchTrainer(
            loop, train_loop_config={**loop_config, "run_id": run_id}, scaling_config=scaling,
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage_path,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep)),
            datasets=dict(datasets or {}), dataset_config=ray.train.DataConfig(execution_options=ingest))
        with sigterm_raises():  # `ray job stop` still closes the run (KILLED)
            result = trainer.fit()
        if check:
            check(result)
    return Fitted(result, run_id, resumed)


def config_changes(tracking_cfg: tracking.TrackingConfig, run_name: str,
                   params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{key: (logged, now)} for each param of `params` whose value differs from the one logged when the run
    `run_name` started (MLflow params are immutable: always the first config); {} for a new run."""
    logged = tracking.run_params(tracking_cfg, run_name)
    if logged is None:
        return {}
    now = tracking.param_values(params)
    return {k: (logged.get(k, UNSET), v) for k, v in now.items() if logged.get(k, UNSET) != v}
