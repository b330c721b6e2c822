"""Experiment tracking in MLflow: the only module of the project that talks to MLflow.

Owns: the tracking URI (config, else MLFLOW_TRACKING_URI, else a local sqlite
file), creating or resuming a run by its Ray run name (a resubmitted job keeps
logging into the same run), logging params/metrics/tags/images from rank 0,
closing runs FINISHED or FAILED, and resolving `models:/NAME@ALIAS` references
to the checkpoint URI a registered version points at.

Nothing here runs at import time; mlflow is imported inside functions so that
importing the platform touches no tracking server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

RUN_NAME_TAG = "dreamllm.ray_run_name"
CHECKPOINT_URI_TAG = "dreamllm.checkpoint_uri"
DEFAULT_DB = "outputs/mlflow.db"


@dataclass
class TrackingConfig:
    """Where runs and registered models are recorded."""

    tracking_uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db."""
    experiment: str = "dreamllm"
    """MLflow experiment of training and evaluation runs."""
    registered_model: str = "dreamllm"
    """Name of the registered model in the MLflow model registry."""
    artifact_location: str | None = None
    """Artifact root of a new experiment (e.g. s3://bucket/mlflow); default: MLflow's."""
    sample_images: int = 2
    """Generated sample images logged per evaluation interval."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """The tracking URI, with a relative sqlite path made absolute (Ray workers have another cwd)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


def client(cfg: TrackingConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg))


def _experiment_id(cfg: TrackingConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)


def start_or_resume_run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any] | None = None,
                        tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the newest run of the experiment tagged with `run_name`, else a new one.

    Params are logged only on a new run (MLflow params are immutable).
    """
    c = client(cfg)
    exp_id = _experiment_id(cfg)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    if params:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, False


def end_run(cfg: TrackingConfig, run_id: str, status: str) -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    client(cfg).set_terminated(run_id, status=status)


class RunLogger:
    """Logs into an existing run by id (rank 0 of a training job, or an evaluation)."""

    def __init__(self, cfg: TrackingConfig, run_id: str):
        self.client, self.run_id = client(cfg), run_id

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def tags(self, values: Mapping[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, str(v))

    def image(self, image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def run_tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)


def resolve_model_ref(ref: str, cfg: TrackingConfig | None = None) -> str:
    """A checkpoint URI for `ref`: `models:/NAME@ALIAS` or `models:/NAME/VERSION` are looked up in
    the registry (the version's checkpoint-URI tag); any other string is already a URI."""
    if not ref.startswith("models:/"):
        return ref
    cfg = cfg or TrackingConfig()
    body = ref[len("models:/"):]
    c = client(cfg)
    if "@" in body:
        name, alias = body.split("@", 1)
        version = c.get_model_version_by_alias(name, alias)
    elif "/" in body:
        name, number = body.split("/", 1)
        version = c.get_model_version(name, number)
    else:
        raise ValueError(f"model reference {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    uri = version.tags.get(CHECKPOINT_URI_TAG)
    if not uri:
        raise ValueError(f"{ref} (version {version.version}) has no {CHECKPOINT_URI_TAG} tag")
    return uri
