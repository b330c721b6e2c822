"""Experiment tracking in MLflow: runs and their params, metrics, tags and artifacts.

Owns: the tracking URI (config, else MLFLOW_TRACKING_URI, else a local sqlite
file), the MLflow client, creating or resuming a run by its Ray run name (a
resubmitted job keeps logging into the same run), logging
params/metrics/tags/images from rank 0 (params with credentials redacted: `redact`), and closing runs FINISHED, FAILED or
KILLED (`run`, a context manager). Registered models, versions and aliases are
`dreamllm_platform.model_registry`, which builds on this module; the two are
the only modules of the project that talk to a tracking server.

Nothing here runs at import time; mlflow is imported inside functions so that
importing the platform touches no tracking server.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .mlflow_tags import RUN_NAME_TAG

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

    uri = tracking_uri(cfg)
    # The registry lives in the same store; left unset, MlflowClient takes a global registry URI if one was set.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cfg: TrackingConfig) -> str:
    """The id of `cfg.experiment`, created (with `cfg.artifact_location`) when it does not exist."""
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
    exp_id = experiment_id(cfg)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    if params:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id, False


SECRET_WORDS = frozenset({"key", "secret", "password", "passwd", "token", "credential", "credentials"})
"""Words that make a param a secret when they are one of its last name's `_`-separated parts
(`storage.secret_access_key`, `auth.api_key`; not `filters.sample_keys` nor `limits.max_tokens`)."""
REDACTED = "***"


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` fit for MLflow, whose params anyone with read access sees: secret-named values replaced
    by `***`, and the password of any URL (`http://user:pw@host`, a tracking URI) too."""
    out = {}
    for k, v in params.items():
        words = set(str(k).rsplit(".", 1)[-1].lower().replace("-", "_").split("_"))
        if words & SECRET_WORDS and v not in (None, ""):
            out[k] = REDACTED
        elif isinstance(v, str) and "@" in v:
            out[k] = _redact_url(v)
        else:
            out[k] = v
    return out


def _redact_url(value: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(value)
    except ValueError:
        return value
    if u.password is None:
        return value
    host = f"[{u.hostname}]" if ":" in (u.hostname or "") else (u.hostname or "")
    netloc = f"{u.username}:{REDACTED}@{host}" + (f":{u.port}" if u.port is not None else "")
    return urlunsplit(u._replace(netloc=netloc))


def end_run(cfg: TrackingConfig, run_id: str, status: str) -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    client(cfg).set_terminated(run_id, status=status)


@contextmanager
def run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None) -> Iterator[tuple[str, bool]]:
    """`with run(cfg, name) as (run_id, resumed):` the run of `start_or_resume_run`, always closed: FINISHED
    when the block ends, KILLED on Ctrl-C or `ray job stop` (KeyboardInterrupt, SystemExit), FAILED on any
    other exception (which is re-raised)."""
    run_id, resumed = start_or_resume_run(cfg, run_name, params=params, tags=tags)
    try:
        yield run_id, resumed
    except (KeyboardInterrupt, SystemExit):
        end_run(cfg, run_id, "KILLED")
        raise
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id, "FINISHED")


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


def run_exists(cfg: TrackingConfig, run_id: str | None) -> bool:
    """Whether `run_id` is a run of this tracking store (a checkpoint may come from another store)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client(cfg).get_run(run_id)
        return True
    except MlflowException:
        return False
