"""The MLflow model registry's store: registered models, their versions and aliases.

Owns: registering a checkpoint as a version through an MLflow 3 logged model
(pyfunc flavor, the checkpoint referenced by URI: the registry's immutable copy), looking
versions up by number, alias or `models:/` reference, resolving a reference to
the checkpoint URI a version points at, moving aliases, version tags, and
evaluation metrics logged on a version's logged model. The policy on top (what
to register, the promotion gate, move records) is `dreamllm_platform.registry`;
runs and the MLflow client are `dreamllm_platform.tracking`; the pyfunc class
MLflow loads is `dreamllm_platform.pyfunc_model`.

A version is named by its number ("3"), an alias ("@champion") or a reference
(models:/NAME/3, models:/NAME@champion). Nothing here runs at import time;
mlflow is imported inside functions.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Mapping

from . import tracking
from .mlflow_tags import CHECKPOINT_URI_TAG, CONTENT_DIGEST_TAG, MODEL_VERSION_TAG
from .tracking import TrackingConfig, client, tracking_uri

MODELS_PREFIX = "models:/"


def is_model_ref(ref: str) -> bool:
    """Whether `ref` names a registered version (`models:/...`) rather than a storage URI."""
    return str(ref).startswith(MODELS_PREFIX)


def parse_model_ref(ref: str) -> tuple[str, str]:
    """(NAME, VERSION) of `models:/NAME/VERSION` and (NAME, "@ALIAS") of `models:/NAME@ALIAS`: the one
    parser of registry references. ValueError naming `ref` and the expected forms for anything else."""
    body = str(ref)[len(MODELS_PREFIX):] if is_model_ref(ref) else ""
    if "@" in body:
        name, alias = body.split("@", 1)
        version = "@" + alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
    else:
        name = version = ""
    if not name or version in ("", "@"):
        raise ValueError(f"model reference {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version


def version_ref(name: str, version: str) -> str:
    """The reference `models:/NAME/VERSION` of one version (pinned: an alias may move, a number does not)."""
    return f"{MODELS_PREFIX}{name}/{version}"


def resolve_model_ref(ref: str, cfg: TrackingConfig | None = None) -> str:
    """A checkpoint URI for `ref`: `models:/NAME@ALIAS` or `models:/NAME/VERSION` are looked up in
    the registry (the version's checkpoint-URI tag); any other string is already a URI."""
    return resolve_checkpoint(ref, cfg)[0]


def resolve_checkpoint(ref: str, cfg: TrackingConfig | None = None) -> tuple[str, str | None]:
    """(checkpoint URI, content digest) for `ref`: a registered version's copy and the sha256 of its
    files (None for versions registered before copies were made); (ref, None) for a URI."""
    if not is_model_ref(ref):
        return ref, None
    version = get_version(cfg or TrackingConfig(), ref)
    uri = version.tags.get(CHECKPOINT_URI_TAG)
    if not uri:
        raise ValueError(f"{ref} (version {version.version}) has no {CHECKPOINT_URI_TAG} tag")
    return uri, version.tags.get(CONTENT_DIGEST_TAG)


def _is_missing(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _version_numbers(c, name: str) -> list[str]:
    return sorted((str(v.version) for v in c.search_model_versions(f"name = '{name}'")), key=int)


def get_version(cfg: TrackingConfig, ref: str):
    """The `ModelVersion` that `ref` names; ValueError naming the model and what exists when there is none."""
    from mlflow.exceptions import MlflowException

    name, ref = parse_model_ref(ref) if is_model_ref(ref) else (cfg.registered_model, str(ref))
    c = client(cfg)
    if not ref.startswith("@") and not ref.isdigit():
        raise ValueError(f"model version {ref!r}: expected a number, @ALIAS or models:/NAME@ALIAS")
    try:
        mv = c.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else c.get_model_version(name, ref)
        mv._version = str(mv.version)  # the sqlite store gives ints, a server strings: strings everywhere here
        if mv.model_id is None and str(mv.source).startswith(MODELS_PREFIX + "m-"):
            mv._model_id = mv.source[len(MODELS_PREFIX):]  # the sqlite store does not return model_id; source has it
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


def register_checkpoint_version(cfg: TrackingConfig, checkpoint_uri: str, run_id: str | None = None,
                                tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                                description: str | None = None):
    """Register `checkpoint_uri` as a new version of `cfg.registered_model`; returns the `ModelVersion`.

    The version is backed by an MLflow 3 logged model whose `pyfunc` flavor
    (`dreamllm_platform.pyfunc_model`) holds only the checkpoint URI in its
    model config (`dreamllm_platform.registry` passes its immutable copy). The
    version and the logged model carry the checkpoint-URI tag (serving and
    `resolve_model_ref` read it) and are linked to `run_id` when given.
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from .pyfunc_model import PIP_REQUIREMENTS, DreamLLMPyfunc

    c = client(cfg)
    name = cfg.registered_model
    exp_id = c.get_run(run_id).info.experiment_id if run_id else tracking.experiment_id(cfg)
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
        mv = c.create_model_version(name, source=f"{MODELS_PREFIX}{model.model_id}", run_id=run_id, tags=all_tags,
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
                           params: Mapping[str, Any], tags: Mapping[str, str], tag_prefix: str,
                           figures: Mapping[str, bytes] | None = None) -> tuple[str, dict[str, str]]:
    """Record an evaluation of a version; returns the evaluation run's id and {file: URI} of the figures
    logged on it.

    A run `evaluate-<name>-v<version>` gets the params, the metrics, the
    metrics linked to the version's logged model (MLflow 3 `model_id`), and
    `figures` ({artifact file: PNG}) as artifacts (one that fails is a warning:
    the gate does not read them); the version gets `<tag_prefix><metric>`
    tags plus `tags`, which is what the promotion gate reads.
    """
    mv = get_version(cfg, version)
    c = client(cfg)
    logged = {}
    with tracking.run(cfg, f"evaluate-{cfg.registered_model}-v{mv.version}-{int(_now_ms())}",
                      params=params, tags={MODEL_VERSION_TAG: mv.version}) as (run_id, _):
        for k, v in metrics.items():
            c.log_metric(run_id, k, float(v), model_id=mv.model_id)
        log = tracking.RunLogger(cfg, run_id)
        for path, png in (figures or {}).items():
            uri = log.artifact(png, path)
            if uri:
                logged[path] = uri
    set_version_tags(cfg, mv.version, {**{f"{tag_prefix}{k}": repr(float(v)) for k, v in metrics.items()},
                                       **tags, f"{tag_prefix}run_id": run_id})
    return run_id, logged


def _now_ms() -> float:
    import time

    return time.time() * 1000
