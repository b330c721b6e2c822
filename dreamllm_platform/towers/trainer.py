"""Driver side of the towers job: skip what is done, prepare the data, fit the phase loop.

Owns: skipping work that is done (an output whose decoder.json has the same
config hash), writing the synthetic set when it is missing, the image-caption
dataset (decoded once into the object store with `cache`), the workers' CPU
share, and checking that the loop wrote its output; the MLflow run,
checkpoints and restarts are `train.run.fit`'s, as for every training job.
A run of the same name resumes from its last checkpoint (after the last step
it only redoes the samples and the output).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from dreamllm.config import get_flavor

from .. import storage
from ..checkpoints import DECODER_FILE, read_decoder_info
from ..config import to_flat_dict
from ..data.synthetic import synthetic_exists, write_synthetic
from ..mlflow_tags import FLAVOR_TAG, JOB_TAG, TOWERS_CONFIG_HASH_TAG
from ..runtime import init_ray
from ..tracking import tracking_uri
from ..train.run import absolute, fit
from ..train.trainer import FAIL_ENV, scaling_config
from .config import TowersConfig
from .data import image_caption_dataset
from .loop import train_loop


@dataclass
class TowersResult:
    """What a towers run left behind."""

    output: str
    """URI of the towers folder (pass it as `decoder=` to the precompute and `model.decoder=` to the stages)."""
    mlflow_run_id: str | None
    """The MLflow run that trained it."""
    tracking_uri: str
    """Where that run is."""
    metrics: dict
    """Final metrics: recon_mse, scaling_factor, diffusion_loss, vision and LLM losses, sample accuracies."""
    skipped: bool
    """True when the output already held finished towers of the same config (nothing was trained)."""


def run_towers_pretraining(cfg: TowersConfig) -> TowersResult:
    """Train the towers of `cfg.flavor` on `cfg.sources` and write them to `cfg.output`.

    Returns at once (skipped=True) when the output already holds finished towers of the same config.
    """
    config_hash = cfg.config_hash()
    done = read_decoder_info(cfg.output, cfg.storage)
    if done and done.get("config_hash") == config_hash:
        print(f"[towers] {cfg.output} already holds finished towers of this config ({config_hash}): nothing to do")
        return TowersResult(cfg.output, done.get("mlflow_run_id"),
                            done.get("tracking_uri") or tracking_uri(cfg.tracking), done.get("metrics", {}),
                            skipped=True)
    if cfg.synthetic.enabled and not synthetic_exists(cfg.data_root, cfg.storage):
        print(f"[towers] writing the synthetic data set to {cfg.data_root}")
        write_synthetic(cfg.data_root, cfg.synthetic, cfg.storage)

    init_ray(cfg.ray_num_cpus)
    cfg = dataclasses.replace(cfg, data_root=absolute(cfg.data_root), output=absolute(cfg.output),
                              checkpoint=dataclasses.replace(cfg.checkpoint,
                                                             storage_path=absolute(cfg.checkpoint.storage_path)),
                              tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri(cfg.tracking)))
    dataset = image_caption_dataset(cfg, get_flavor(cfg.flavor).diffusion.resolution)
    if cfg.cache:
        dataset = dataset.materialize()
    if done:  # towers of another config are about to be overwritten: they must not look finished meanwhile
        storage.remove(storage.join(cfg.output, DECODER_FILE), cfg.storage)

    scaling = scaling_config(cfg.scaling, cfg.data_cpus)
    # Ray sets OMP_NUM_THREADS to the whole CPUs a worker holds (1 of 1.5): use the share it was given.
    threads = max(1, math.ceil(scaling.resources_per_worker.get("CPU", 1)))
    info: dict = {}

    def check(_result) -> None:
        info.update(read_decoder_info(cfg.output, cfg.storage) or {})
        if info.get("config_hash") != config_hash:
            raise RuntimeError(f"training finished but {storage.join(cfg.output, DECODER_FILE)} was not written")

    c = cfg.checkpoint
    fail_at = int(os.environ[FAIL_ENV]) if os.environ.get(FAIL_ENV) else None  # the fault suite's injection
    fitted = fit(train_loop, {"cfg": cfg, "config_hash": config_hash, "threads": threads, "fail_at_step": fail_at},
                 run_name=cfg.run_name,
                 storage_path=c.storage_path, max_failures=c.max_failures, num_to_keep=c.num_to_keep,
                 scaling=scaling, datasets={"train": dataset}, tracking_cfg=cfg.tracking, params=to_flat_dict(cfg),
                 tags={JOB_TAG: "towers", FLAVOR_TAG: cfg.flavor, TOWERS_CONFIG_HASH_TAG: config_hash}, label="towers", check=check)
    return TowersResult(cfg.output, fitted.run_id, cfg.tracking.tracking_uri, info["metrics"], skipped=False)
