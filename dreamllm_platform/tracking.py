"""Experiment tracking in MLflow: runs and their params, metrics, tags and artifacts.

Owns: the tracking URI (config, else MLFLOW_TRACKING_URI, else a local sqlite
file), the MLflow client, creating or resuming a run by its Ray run name (a
resubmitted job keeps logging into the same run), logging
params/metrics/tags/images from rank 0 (params with credentials redacted: `redact`; a training
worker's logger outlives a tracking-server outage: `RunLogger(resilient=True)`), and closing runs FINISHED, FAILED or
KILLED (`run`, a context manager). Registered models, versions and aliases are
`dreamllm_platform.model_registry`, which builds on this module; the two are
the only modules of the project that talk to a tracking server.

Nothing here runs at import time; mlflow is imported inside functions so that
importing the platform touches no tracking server.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .mlflow_tags import RUN_NAME_TAG, TRACKING_OUTAGE_TAG

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


def tracking_uri(cfg: TrackingConfig, create: bool = True) -> str:
    """The tracking URI, with a relative sqlite path made absolute (Ray workers have another cwd) and, with
    `create`, its folder made (a reader such as the UI job creates nothing)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        if create:
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


def find_run(cfg: TrackingConfig, run_name: str):
    """The newest run of the experiment tagged with `run_name`, or None."""
    found = client(cfg).search_runs([experiment_id(cfg)], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (credentials redacted, strings of at most 6000 characters): what is
    logged and what a resubmission's params are compared with, so a secret is never logged nor put in
    the config-changes tag."""
    return {k: str(v)[:6000] for k, v in redact(params).items()}


def run_params(cfg: TrackingConfig, run_name: str) -> dict[str, str] | None:
    """The params logged on the run of `run_name`, or None when there is no such run."""
    run = find_run(cfg, run_name)
    return None if run is None else dict(run.data.params)


def start_or_resume_run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any] | None = None,
                        tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run_id, resumed): the newest run of the experiment tagged with `run_name`, else a new one.

    Params are logged only on a new run (MLflow params are immutable).
    """
    c = client(cfg)
    found = find_run(cfg, run_name)
    if found:
        run_id = found.info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(experiment_id(cfg), run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    if params:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in param_values(params).items()]
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


MAX_BUFFERED_METRICS = 20_000
"""Metric values a training worker's logger keeps while the tracking server is unreachable; older ones are
dropped beyond (about 1000 progress lines of a stage)."""


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client without its retries (about 2 minutes of back-off) and with a 10 s time-out, for
    the calls of a resilient logger: a training step should not wait on an absent server; the logger keeps
    what failed and sends it with the next call instead."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """Logs into an existing run by id (rank 0 of a training job, or an evaluation).

    With `resilient=True` (training workers) metrics and tags never raise: the worker group must not die
    because the tracking server is away. What fails is kept (at most `max_buffered` metric values, the
    oldest dropped beyond) and sent, with its own steps and times, by the next call that gets through; the
    first failure of an outage prints one warning. When the server answers again the logger logs
    `tracking.failed_calls` and `tracking.dropped_metrics` (totals so far) at that step and lists the
    outages in the `dreamllm.tracking_outage` tag, so the gap shows in the run. Sample images that fail are
    skipped (counted in the outage). `close()` sends what is left, with MLflow's own retries, and raises if
    it cannot: the end of a stage needs its tags.
    """

    def __init__(self, cfg: TrackingConfig, run_id: str, resilient: bool = False,
                 max_buffered: int = MAX_BUFFERED_METRICS):
        self.client, self.run_id = client(cfg), run_id
        self.resilient, self.max_buffered = resilient, max_buffered
        self.pending: collections.deque = collections.deque()  # Metric
        self.pending_tags: dict[str, str] = {}
        self.failed_calls = self.dropped_metrics = 0
        self.outage: dict | None = None  # the current one: {"from_step", "failed_calls", "dropped_metrics", ...}
        self.outages: list[dict] = []
        self.last_step = 0

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.last_step = step
        self.pending.extend(Metric(k, float(v), now, step) for k, v in values.items())
        self._send()

    def tags(self, values: Mapping[str, str]) -> None:
        self.pending_tags.update({k: str(v) for k, v in values.items()})
        self._send()

    def _send(self, quick: bool = True) -> None:
        from mlflow.entities import RunTag

        try:
            with _quick_http() if quick and self.resilient else contextlib.nullcontext():
                while self.pending:
                    batch = list(itertools.islice(self.pending, 1000))  # MLflow's batch limit
                    self.client.log_batch(self.run_id, metrics=batch)
                    for _ in batch:
                        self.pending.popleft()
                if self.pending_tags:
                    self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.pending_tags.items()])
                    self.pending_tags.clear()
        except Exception as e:  # noqa: BLE001 - whatever the client raises (HTTP, connection, database)
            if not self.resilient:
                raise
            self._failed(e)
            return
        if self.outage:
            self._recovered()

    def _failed(self, e: Exception) -> None:
        self.failed_calls += 1
        if self.outage is None:
            self.outage = {"from_step": self.last_step, "failed_calls": 0, "dropped_metrics": 0,
                           "skipped_images": 0}
            print(f"[tracking] MLflow unreachable at step {self.last_step} ({type(e).__name__}: {str(e)[:200]}); "
                  f"training goes on, metrics are kept (up to {self.max_buffered}) and sent when it is back",
                  file=sys.stderr, flush=True)
        self.outage["failed_calls"] += 1
        over = len(self.pending) - self.max_buffered
        for _ in range(max(0, over)):
            self.pending.popleft()
        if over > 0:
            self.dropped_metrics += over
            self.outage["dropped_metrics"] += over

    def _recovered(self) -> None:
        from mlflow.entities import Metric, RunTag

        self.outages.append({**self.outage, "to_step": self.last_step})
        self.outage = None
        now = int(time.time() * 1000)
        gap = [Metric("tracking.failed_calls", float(self.failed_calls), now, self.last_step),
               Metric("tracking.dropped_metrics", float(self.dropped_metrics), now, self.last_step)]
        try:
            self.client.log_batch(self.run_id, metrics=gap,
                                  tags=[RunTag(TRACKING_OUTAGE_TAG, json.dumps(self.outages))])
        except Exception as e:  # noqa: BLE001 - gone again: the next success records it
            self.outage = self.outages.pop()
            self._failed(e)
            return
        print(f"[tracking] MLflow is back at step {self.last_step}: {self.failed_calls} calls failed, "
              f"{self.dropped_metrics} metric values dropped so far", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Send what is still kept, with MLflow's retries; raises when the server is still unreachable."""
        resilient, self.resilient = self.resilient, False
        try:
            self._send(quick=False)
        finally:
            self.resilient = resilient

    def image(self, image, artifact_file: str) -> None:
        try:
            with _quick_http() if self.resilient else contextlib.nullcontext():
                self.client.log_image(self.run_id, image, artifact_file=artifact_file)
        except Exception as e:  # noqa: BLE001
            if not self.resilient:
                raise
            self._failed(e)
            self.outage["skipped_images"] += 1

    def artifact(self, data: bytes, artifact_file: str) -> str | None:
        """Log `data` (a figure's PNG) as `artifact_file`; returns its URI, or None after one warning when it
        could not be logged (a figure is never worth a failed run; counted in an outage like an image)."""
        import tempfile

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                path.write_bytes(data)
                folder = str(Path(artifact_file).parent)
                with _quick_http() if self.resilient else contextlib.nullcontext():
                    self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
                    root = self.client.get_run(self.run_id).info.artifact_uri
            return f"{root.rstrip('/')}/{artifact_file}"
        except Exception as e:  # noqa: BLE001
            if self.resilient:
                self._failed(e)
                self.outage["skipped_images"] += 1
            print(f"[tracking] warning: {artifact_file} not logged ({type(e).__name__}: {str(e)[:200]})",
                  file=sys.stderr, flush=True)
            return None

    def metric_keys(self) -> list[str]:
        return list(self.client.get_run(self.run_id).data.metrics)

    def metric_histories(self, keys) -> dict[str, list[tuple[int, float]]]:
        """key -> [(step, value)] of every value the run logged (read back from MLflow)."""
        return {k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)] for k in keys}

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def run_tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)


def artifact_location(cfg: TrackingConfig, run_id: str, path: str) -> str:
    """Where `path` under the run's artifacts is (a folder on disk for the embedded store), for printouts."""
    return f"{client(cfg).get_run(run_id).info.artifact_uri}/{path}"


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
