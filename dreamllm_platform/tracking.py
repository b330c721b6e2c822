"""Experiment tracking in MLflow: the only module of the project that talks to MLflow.

Owns: the tracking URI (config, else MLFLOW_TRACKING_URI, else a local sqlite
file), creating or resuming a run by its Ray run name (a resubmitted job keeps
logging into the same run), logging params/metrics/tags/images from rank 0,
closing runs FINISHED or FAILED, and resolving `models:/NAME@ALIAS` references
to the checkpoint URI a registered version points at.

Also the model registry's reads and writes: a checkpoint registered as a
version through an MLflow 3 logged model (pyfunc flavor, the checkpoint
referenced by URI, never copied), looking versions up by number or alias,
moving aliases, version tags, and evaluation metrics logged on a version's
logged model. The policy on top (what to register, the promotion gate, move
records) is `dreamllm_platform.registry`; the pyfunc class MLflow loads is
`dreamllm_platform.pyfunc_model`.

Nothing here runs at import time; mlflow is imported inside functions so that
importing the platform touches no tracking server.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

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

    uri = tracking_uri(cfg)
    # The registry lives in the same store; left unset, MlflowClient takes a global registry URI if one was set.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


# ------------------------------------------------------------------ registry
# Plain reads and writes of the MLflow model registry; the policy is in
# dreamllm_platform.registry. A version is named by its number ("3"), an alias
# ("@champion") or a reference (models:/NAME/3, models:/NAME@champion).

def _is_missing(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _version_numbers(c, name: str) -> list[str]:
    return sorted((str(v.version) for v in c.search_model_versions(f"name = '{name}'")), key=int)


def get_version(cfg: TrackingConfig, ref: str):
    """The `ModelVersion` that `ref` names; ValueError naming the model and what exists when there is none."""
    from mlflow.exceptions import MlflowException

    name, ref = cfg.registered_model, str(ref)
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, ref = body.split("@", 1)[0], "@" + body.split("@", 1)[1]
        elif "/" in body:
            name, ref = body.rsplit("/", 1)
        else:
            raise ValueError(f"model reference {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    c = client(cfg)
    if not ref.startswith("@") and not ref.isdigit():
        raise ValueError(f"model version {ref!r}: expected a number, @ALIAS or models:/NAME@ALIAS")
    try:
        mv = c.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else c.get_model_version(name, ref)
        mv._version = str(mv.version)  # the sqlite store gives ints, a server strings: strings everywhere here
        if mv.model_id is None and str(mv.source).startswith("models:/m-"):
            mv._model_id = mv.source[len("models:/"):]  # the sqlite store does not return model_id; source has it
        return mv
    except MlflowException as e:
        if not _is_missing(e):
            raise
    try:
        c.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"registered model {name!r} does not exist in {tracking_uri(cfg)}") from None
    if ref.startswith("@"):
        aliases = sorted(c.get_registered_model(name).aliases)
        raise ValueError(f"registered model {name!r} has no alias {ref[1:]!r} "
                         f"(aliases: {', '.join(aliases) or 'none'})")
    raise ValueError(f"registered model {name!r} has no version {ref} "
                     f"(versions: {', '.join(_version_numbers(c, name)) or 'none'})")


def list_versions(cfg: TrackingConfig) -> list:
    """Every version of the registered model, oldest first ([] when it does not exist)."""
    return [get_version(cfg, n) for n in _version_numbers(client(cfg), cfg.registered_model)]


def alias_version(cfg: TrackingConfig, alias: str) -> str | None:
    """The version number `alias` points at, or None."""
    try:
        return get_version(cfg, "@" + alias).version
    except ValueError:
        return None


def set_alias(cfg: TrackingConfig, alias: str, version: str) -> None:
    client(cfg).set_registered_model_alias(cfg.registered_model, alias, str(version))


def set_version_tags(cfg: TrackingConfig, version: str, tags: Mapping[str, Any]) -> None:
    c = client(cfg)
    for k, v in tags.items():
        c.set_model_version_tag(cfg.registered_model, str(version), k, str(v))


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


def register_checkpoint_version(cfg: TrackingConfig, checkpoint_uri: str, run_id: str | None = None,
                                tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                                description: str | None = None):
    """Register `checkpoint_uri` as a new version of `cfg.registered_model`; returns the `ModelVersion`.

    The version is backed by an MLflow 3 logged model whose `pyfunc` flavor
    (`dreamllm_platform.pyfunc_model`) holds only the checkpoint URI in its
    model config: weights in object storage are referenced, not copied. The
    version and the logged model carry the checkpoint-URI tag (serving and
    `resolve_model_ref` read it) and are linked to `run_id` when given.
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from .pyfunc_model import PIP_REQUIREMENTS, DreamLLMPyfunc

    c = client(cfg)
    name = cfg.registered_model
    exp_id = c.get_run(run_id).info.experiment_id if run_id else _experiment_id(cfg)
    all_tags = {CHECKPOINT_URI_TAG: checkpoint_uri, **(tags or {})}
    model = c.create_logged_model(exp_id, name=name, source_run_id=run_id, tags=all_tags, model_type="dreamllm",
                                  params={k: str(v) for k, v in (params or {}).items()})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # save_model (not the fluent log_model): no active run, no global tracking URI, and explicit
            # requirements, so MLflow neither infers them by loading the model nor runs an input example.
            mlflow.pyfunc.save_model(f"{tmp}/model", python_model=DreamLLMPyfunc(),
                                     model_config={"checkpoint_uri": checkpoint_uri},
                                     pip_requirements=PIP_REQUIREMENTS)
            c.log_model_artifacts(model.model_id, f"{tmp}/model")
    except BaseException:
        c.finalize_logged_model(model.model_id, "FAILED")
        raise
    c.finalize_logged_model(model.model_id, "READY")
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    with _global_tracking_uri(tracking_uri(cfg)):
        mv = c.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id, tags=all_tags,
                                    description=description, model_id=model.model_id)
    return get_version(cfg, str(mv.version))


@contextmanager
def _global_tracking_uri(uri: str):
    """Point MLflow's global tracking URI at `uri` for one call, then put back the global and the
    MLFLOW_TRACKING_URI variable. MLflow 3.17's registry store looks up a version's logged model with
    the global URI rather than the client's (a TODO in its sqlalchemy store)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def log_version_evaluation(cfg: TrackingConfig, version: str, metrics: Mapping[str, float],
                           params: Mapping[str, Any], tags: Mapping[str, str], tag_prefix: str) -> str:
    """Record an evaluation of a version; returns the evaluation run's id.

    A run `evaluate-<name>-v<version>` gets the params and the metrics, the
    metrics linked to the version's logged model (MLflow 3 `model_id`); the
    version gets `<tag_prefix><metric>` tags plus `tags`, which is what the
    promotion gate reads.
    """
    mv = get_version(cfg, version)
    run_id, _ = start_or_resume_run(cfg, f"evaluate-{cfg.registered_model}-v{mv.version}-{int(_now_ms())}",
                                    params=params, tags={"dreamllm.model_version": mv.version})
    c = client(cfg)
    try:
        for k, v in metrics.items():
            c.log_metric(run_id, k, float(v), model_id=mv.model_id)
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id, "FINISHED")
    set_version_tags(cfg, mv.version, {**{f"{tag_prefix}{k}": repr(float(v)) for k, v in metrics.items()},
                                       **tags, f"{tag_prefix}run_id": run_id})
    return run_id


def _now_ms() -> float:
    import time

    return time.time() * 1000
