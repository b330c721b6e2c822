"""Driver side of a training stage: data, resources, the MLflow run and the Ray TorchTrainer.

Owns: the stage's datasets in either data mode (store: making sure the latent
store exists, running the precompute on the embedded defaults; streaming:
the encode-while-training pipeline of `data.streaming` and the drop report it
logs at the end), the model config the data is tokenised for, sizing the
workers so that Ray Data's tasks always have CPUs left (ENVIRONMENT.md); the
MLflow run, checkpoints and restarts are `train.run.fit`'s, as for every
training job.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from dreamllm.checkpoint import read_checkpoint_info
from dreamllm.config import DreamLLMConfig, get_flavor

from .. import storage
from ..checkpoints import flavor_config, local_checkpoint
from ..config import load_config, to_flat_dict
from ..data.assembly import training_dataset
from ..data.config import PrecomputeConfig
from ..data.store import LatentStore
from ..mlflow_tags import FLAVOR_TAG, STAGE_TAG
from ..runtime import cluster_resources, init_ray
from ..tracking import tracking_uri
from .config import RESUME_MAY_CHANGE, ScalingSpec, TrainConfig
from .loop import train_loop
from .run import absolute, fit

FAIL_ENV = "DREAMLLM_FAIL_AT_STEP"


@dataclass
class StageResult:
    """Where a finished stage put everything."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str | None
    export_uri: str
    metrics: dict


def model_config_for_data(cfg: TrainConfig) -> DreamLLMConfig:
    """The config the examples are tokenised and the latents sized for.

    A random-init flavor's tokenizer is rebuilt identically from the bundled
    corpus, so the flavor's own tokenizer config serves a checkpoint of it too.
    """
    if not cfg.model.init_from:
        return flavor_config(cfg.model.flavor, cfg.model.decoder, cfg.storage)
    info = read_checkpoint_info(local_checkpoint(cfg.model.init_from, cfg.tracking))
    model_cfg = DreamLLMConfig.from_dict(info["config"])
    model_cfg.tokenizer = get_flavor(model_cfg.flavor).tokenizer
    return model_cfg


def precompute_config(cfg: TrainConfig, model_cfg: DreamLLMConfig) -> PrecomputeConfig:
    """The precompute config (sources, filters, encoder) of the stage's data, for this model's VAE."""
    decoder = None if cfg.model.init_from else cfg.model.decoder
    return load_config(PrecomputeConfig, cfg.data.precompute_config,
                       [f"flavor={model_cfg.flavor}", f"output={cfg.data.store}", f"decoder={decoder or 'null'}"])


def ensure_store(cfg: TrainConfig, model_cfg: DreamLLMConfig) -> None:
    """Run the latent precompute when the store has no committed shards and `data.prepare` is on."""
    if LatentStore(cfg.data.store, cfg.storage).manifest():
        return
    if not cfg.data.prepare:
        raise ValueError(f"the latent store {cfg.data.store} is empty: run jobs/precompute_latents.py first")
    from ..data.latents import run_precompute

    print(f"[train] the latent store {cfg.data.store} is empty: precomputing it first")
    run_precompute(precompute_config(cfg, model_cfg))


def store_datasets(cfg: TrainConfig, model_cfg: DreamLLMConfig) -> tuple[dict, float, None]:
    """Store mode: one dataset per source of the mix, from the latent store (precomputed first if need be);
    with the CPUs each source's assembly task takes."""
    ensure_store(cfg, model_cfg)
    return ({name: training_dataset(cfg.data.store, model_cfg, dataclasses.replace(cfg.data.assembly, sources=(name,)),
                                    cfg.storage, num_cpus=cfg.data.data_cpus)
             for name in cfg.data.mix}, cfg.data.data_cpus, None)


def streaming_datasets(cfg: TrainConfig, model_cfg: DreamLLMConfig) -> tuple[dict, float, object]:
    """Streaming mode: one encode-while-training dataset per source of the mix (no store); with the CPUs
    each source's read task and encoder pool take, and the actor collecting their drop reports."""
    from ..data import streaming
    from ..data.synthetic import synthetic_exists, write_synthetic

    pre = precompute_config(cfg, model_cfg)
    pre = dataclasses.replace(pre, data_root=absolute(pre.data_root))  # read tasks may run in another directory
    if cfg.data.prepare and pre.synthetic.enabled and not synthetic_exists(pre.data_root, pre.storage):
        print(f"[train] writing the synthetic data set to {pre.data_root}")
        write_synthetic(pre.data_root, pre.synthetic, pre.storage)
    res = cluster_resources()
    trainer_gpus = cfg.scaling.num_workers if _use_gpu(cfg.scaling, res.gpus) else 0
    plan = streaming.plan_streaming_pool(res, pre, trainer_gpus, len(cfg.data.mix))
    print(f"[train] streaming: per source {plan.size} VAE actor(s) x {plan.cpus_per_actor:g} CPU "
          f"{plan.gpus_per_actor:g} GPU, read tasks {plan.read_cpus:g} CPU; no latent store", flush=True)
    reports = streaming.start_reports()
    datasets = {name: streaming.streaming_dataset(pre, name, model_cfg, cfg.data.assembly, plan, reports)
                for name in cfg.data.mix}
    return datasets, plan.read_cpus + plan.size * plan.cpus_per_actor, reports


def log_stream_report(cfg: TrainConfig, run_id: str, reports, step: int) -> dict:
    """Streaming mode: the drop report of the shards read, summed, logged to the MLflow run (metrics
    `data.*` and the artifact data_report.json, with the sample keys of each reason) and written to
    <run dir>/data_report.json: what the store mode keeps in the store's report.json."""
    import json

    import ray

    from ..data.streaming import report_metrics
    from ..tracking import RunLogger, client

    summary = ray.get(reports.summary.remote())
    text = json.dumps(summary, indent=1, sort_keys=True)
    storage.write_bytes(storage.join(cfg.checkpoint.storage_path, cfg.run_name, "data_report.json"), text.encode(),
                        cfg.storage)
    RunLogger(cfg.tracking, run_id).metrics(report_metrics(summary), step)
    client(cfg.tracking).log_text(run_id, text, "data_report.json")
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    print(f"[train] streaming data report: {len(summary['shards_read'])} shards read, "
          f"{len(summary['shards_failed'])} failed on storage errors; dropped: {dropped}", flush=True)
    return summary


def _use_gpu(s: ScalingSpec, gpus: float) -> bool:
    return gpus >= s.num_workers if s.use_gpu is None else s.use_gpu


def scaling_config(s: ScalingSpec, data_cpus: float, data_tasks: int = 1):
    """Workers with one GPU each on GPU clusters; on CPUs, what Ray Data's tasks leave free.

    `data_cpus` is what one Ray Data task takes; `data_tasks` of them should find CPUs beside the workers.
    """
    from ray.train import ScalingConfig

    res = cluster_resources()
    use_gpu = _use_gpu(s, res.gpus)
    cpus = s.cpus_per_worker
    if cpus is None:
        free = res.cpus - data_cpus * data_tasks
        cpus = 1.0 if use_gpu else max(0.25, min(4.0, free / s.num_workers))
    if not use_gpu and cpus * s.num_workers + data_cpus > res.cpus:
        raise ValueError(f"{s.num_workers} workers x {cpus} CPUs + {data_cpus} for Ray Data needs more "
                         f"than the cluster's {res.cpus:g} CPUs: lower scaling.cpus_per_worker or num_workers")
    return ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus})


def run_stage(cfg: TrainConfig) -> StageResult:
    """Train one stage to `optim.max_steps` (resuming the run of the same name) and export it."""
    init_ray()
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, storage_path=absolute(cfg.checkpoint.storage_path),
        export_uri=absolute(cfg.checkpoint.export_uri)),
        data=dataclasses.replace(cfg.data, store=absolute(cfg.data.store)),
        model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from),
                                  decoder=absolute(cfg.model.decoder)),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri(cfg.tracking)))

    model_cfg = model_config_for_data(cfg)
    build = streaming_datasets if cfg.data.mode == "streaming" else store_datasets
    datasets, data_cpus, reports = build(cfg, model_cfg)
    fail_at = int(os.environ[FAIL_ENV]) if os.environ.get(FAIL_ENV) else None
    c = cfg.checkpoint
    fitted = fit(train_loop, {"cfg": cfg, "fail_at_step": fail_at}, run_name=cfg.run_name,
                 storage_path=c.storage_path, max_failures=c.max_failures, num_to_keep=c.num_to_keep,
                 scaling=scaling_config(cfg.scaling, data_cpus, len(cfg.data.mix)), datasets=datasets,
                 tracking_cfg=cfg.tracking, params=to_flat_dict(cfg), may_change=RESUME_MAY_CHANGE,
                 tags={STAGE_TAG: cfg.stage, FLAVOR_TAG: model_cfg.flavor})
    result = fitted.result
    if reports is not None:
        log_stream_report(cfg, fitted.run_id, reports, int((result.metrics or {}).get("step", 0)))
    export = c.export_uri or storage.join(c.storage_path, cfg.run_name, "export")
    return StageResult(run_name=cfg.run_name, mlflow_run_id=fitted.run_id, tracking_uri=cfg.tracking.tracking_uri,
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       export_uri=export, metrics=dict(result.metrics or {}))
