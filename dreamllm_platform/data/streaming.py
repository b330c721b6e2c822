"""Streaming mode (`data.mode: streaming`): source shards -> VAE actor pool -> Ray Train, with no latent store.

Owns: the Ray Data plan that feeds the encoder pool's output straight into a training stage's dataset
shards, sizing that pool beside the trainer, and the drop report of the shards it read (`start_reports`:
an actor each read task sends its shard's report to; the driver logs the sum at the end, as the store
mode keeps it in the store's report.json).

Ray Data plan (one dataset per source of the stage's mix, one input row per shard, in shard-id order):
  from_items(shards) -> map_batches(read_examples, CPU tasks)
        the precompute's own reader (`latents.read_shard`, its retries and drop counts), collected per
        shard, then the shard's records joined with its images (`assembly.shard_record_examples`, as
        from a store): one row per example, with the CLIP crops of its image inputs and the VAE crops of
        its dream slots
  -> map_batches(ExampleEncoder, ActorPoolStrategy)   `latents.VaeEncoder` on the dream crops
  rows: the schema of `assembly.training_dataset` (fp16 mean + logvar per dream slot), same bytes

Every epoch reads and encodes the sources again: GPU (or CPU) time instead of a stored pass. What it gives
up against the store is in the README ("Streaming mode"): a read task holds one shard's crops until the
shard's records are known; a resume replays the open epoch by encoding it again, exactly only if the
sources read the same as before; the encoder needs resources beside the training workers.
"""
from __future__ import annotations

import dataclasses
import json

from dreamllm.config import DreamLLMConfig

from ..runtime import Resources
from .assembly import ROWS_PER_BATCH, _builder, example_schema, shard_record_examples
from .config import AssemblyConfig, PrecomputeConfig
from .filters import Report
from .latents import READ_TASK_MEMORY, PoolPlan, VaeEncoder, encoder_stage, plan_pool, plan_shards, read_shard


def plan_streaming_pool(res: Resources, cfg: PrecomputeConfig, trainer_gpus: float, num_sources: int) -> PoolPlan:
    """Each source's encoder pool and read tasks, beside the training workers.

    A source gets an equal part of half the cluster's CPUs (the trainer keeps the other half) and of the
    GPUs the workers leave spare: one actor per spare GPU, else CPU actors (`latents.plan_pool`'s rules).
    """
    share = Resources(cpus=res.cpus / 2 / num_sources, gpus=max(0.0, res.gpus - trainer_gpus) / num_sources)
    return plan_pool(share, cfg.encoder)


def read_examples(batch: dict, cfg: PrecomputeConfig, assembly: AssemblyConfig, model_cfg_json: str, reports):
    """CPU task: shard rows -> batches of example rows with VAE crops (`vae_u8`) still to encode.

    The shard's report (or its storage failure after every retry) goes to `reports`; a failed shard
    gives no examples this epoch (the next epoch reads it again).
    """
    import pyarrow as pa
    import ray

    builder = _builder(model_cfg_json)
    schema = example_schema(("vae_u8", pa.list_(pa.binary())))
    for shard_id, source, uri in zip(batch["shard_id"], batch["source"], batch["uri"]):
        images: dict[str, tuple[bytes, bytes]] = {}  # sha256 -> (CLIP crop, VAE crop)
        end: dict = {}
        for cols in read_shard({"shard_id": [shard_id], "source": [source], "uri": [uri]}, cfg):
            for kind, sha, clip, vae, payload in zip(cols["kind"], cols["sha256"], cols["clip_u8"], cols["vae_u8"],
                                                     cols["payload"]):
                if kind == "image":
                    images[sha] = (clip, vae)
                else:
                    end = json.loads(payload)
        ray.get(reports.add.remote(str(shard_id), end.get("report"), end.get("failed")))  # before the rows
        if "failed" in end:
            print(f"[streaming] shard {shard_id}: storage errors on every attempt, no examples this epoch: "
                  f"{end['failed']}", flush=True)
            continue
        rows = []
        for rid, ex in shard_record_examples(builder, end["records"], images, assembly, f"source shard {uri}"):
            rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "image_keys": ex.image_keys,
                         "dream_keys": ex.dream_keys, "images": [images[k][0] for k in ex.image_keys],
                         "latents": [], "vae_u8": [images[k][1] for k in ex.dream_keys],
                         "shard_id": str(shard_id), "record_id": rid})
            if len(rows) == ROWS_PER_BATCH:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema)


class ExampleEncoder:
    """Actor: `latents.VaeEncoder` (the precompute's, so the latents are the store's bytes) on the dream crops
    of a batch of example rows; fills `latents` with mean + logvar (fp16) and drops the crops."""

    def __init__(self, **encoder_kwargs):
        self.vae = VaeEncoder(**encoder_kwargs)

    def __call__(self, batch):
        import pyarrow as pa

        cols = batch.to_pydict()
        crops = [b for row in cols.pop("vae_u8") for b in row]
        if crops:
            enc = self.vae({"kind": ["image"] * len(crops), "vae_u8": crops})
            lat = iter([m + v for m, v in zip(enc["mean"], enc["logvar"])])
            cols["latents"] = [[next(lat) for _ in keys] for keys in cols["dream_keys"]]
        return pa.Table.from_pydict(cols, schema=example_schema())


def streaming_dataset(cfg: PrecomputeConfig, source: str, model_cfg: DreamLLMConfig, assembly: AssemblyConfig,
                      plan: PoolPlan, reports):
    """The lazy Ray Dataset of `source`'s example rows, encoded on the fly (the rows of
    `assembly.training_dataset` on a store precomputed with `cfg`)."""
    import ray

    if source not in cfg.sources or not cfg.sources[source].enabled:
        raise ValueError(f"data source {source!r} of the mix is not an enabled source of the precompute config "
                         f"(enabled: {sorted(n for n, s in cfg.sources.items() if s.enabled)})")
    if cfg.flavor != model_cfg.flavor:
        raise ValueError(f"streaming encodes for flavor {cfg.flavor!r} but the model is {model_cfg.flavor!r}")
    shards = sorted((t for t in plan_shards(cfg) if t.source == source), key=lambda t: t.shard_id)
    if not shards:
        raise ValueError(f"data source {source!r} has no shards under {cfg.source_uri(cfg.sources[source].uri)}")
    model_json = json.dumps(dataclasses.asdict(model_cfg))
    assembly = dataclasses.replace(assembly, sources=(source,))
    ds = ray.data.from_items([dataclasses.asdict(t) for t in shards], override_num_blocks=len(shards))
    # As in the precompute: the memory reservation keeps Ray Data from fusing the reads into the actors.
    ds = ds.map_batches(read_examples, batch_size=1, num_cpus=plan.read_cpus, memory=READ_TASK_MEMORY,
                        fn_kwargs={"cfg": cfg, "assembly": assembly, "model_cfg_json": model_json,
                                   "reports": reports})
    return encoder_stage(ds, ExampleEncoder, cfg, plan, batch_format="pyarrow")


class _Reports:
    """The drop reports of the shards a streaming run read: one per shard id (a later epoch's replaces
    the earlier, so re-reading counts nothing twice), and the shards that failed on storage errors."""

    def __init__(self):
        self.shards: dict[str, dict] = {}
        self.failed: dict[str, str] = {}

    def add(self, shard_id: str, report: dict | None, failed: str | None) -> None:
        if failed:
            self.failed.setdefault(shard_id, failed)
        else:
            self.shards[shard_id] = report
            self.failed.pop(shard_id, None)

    def summary(self) -> dict:
        total = Report()
        for r in self.shards.values():
            total.merge(r)
        return {**total.to_dict(), "shards_read": sorted(self.shards), "shards_failed": dict(self.failed)}


def start_reports():
    """The actor collecting a streaming run's drop reports (`summary()` -> the summed report)."""
    import ray

    return ray.remote(num_cpus=0)(_Reports).remote()


def report_metrics(summary: dict) -> dict[str, float]:
    """The MLflow metrics of a streaming run's drop report: `data.<count>`, `data.dropped.<reason>`, and the
    shards read and failed."""
    out = {f"data.{k}": float(v) for k, v in summary["counts"].items()}
    out.update({f"data.dropped.{k}": float(v) for k, v in summary["dropped"].items()})
    out["data.shards_read"] = float(len(summary["shards_read"]))
    out["data.shards_failed"] = float(len(summary["shards_failed"]))
    return out
