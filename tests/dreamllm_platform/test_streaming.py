"""Streaming mode (`data.mode: streaming`): the encoder pool's output fed straight into Ray Train, no latent
store; it must feed exactly the examples (ids, tokens, CLIP crops, latent bytes) the store mode gives on the
same data, and report the same drops."""
import hashlib
import json
import math

import pytest

from dreamllm.config import get_flavor
from dreamllm_platform.config import load_config
from dreamllm_platform.data import streaming
from dreamllm_platform.data.assembly import training_dataset
from dreamllm_platform.data.config import PrecomputeConfig
from dreamllm_platform.data.filters import Report
from dreamllm_platform.data.latents import run_precompute
from dreamllm_platform.data.store import LatentStore
from dreamllm_platform.runtime import Resources
from dreamllm_platform.tracking import client
from dreamllm_platform.train.config import STAGE_DEFAULTS, TrainConfig
from dreamllm_platform.train.trainer import run_stage

pytestmark = pytest.mark.slow

# Only the pair source (stage I's), with one of each bad input the synthetic writer makes.
PRECOMPUTE_YAML = """
flavor: debug
sources: {laion: {format: webdataset, uri: laion}}
synthetic: {mmc4_shards: 1, docs_per_shard: 2, webdataset_shards: 2, pairs_per_shard: 4, parquet_shards: 0,
            conversations: 0, instruct_docs: 0, defects: true}
"""


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("streaming")
    yaml = d / "precompute.yaml"
    yaml.write_text(PRECOMPUTE_YAML + f"data_root: {d / 'data'}\n")
    pre = load_config(PrecomputeConfig, yaml, [f"output={d / 'store'}"])
    run_precompute(pre)  # the store mode's store, and the synthetic set both modes read
    return d, yaml, pre


def ordered_rows(ds) -> list[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    was, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        return ds.take_all()
    finally:
        ctx.execution_options.preserve_order = was


def fingerprint(r: dict) -> tuple:
    digest = lambda bs: tuple(hashlib.sha256(b).hexdigest()[:16] for b in bs)  # noqa: E731
    return (f"{r['shard_id']}/{r['record_id']}", tuple(r["input_ids"]), tuple(r["labels"]), tuple(r["image_keys"]),
            tuple(r["dream_keys"]), digest(r["images"]), digest(r["latents"]))


def stage_cfg(d, yaml, mode, name, *sets) -> TrainConfig:
    base = ["model.flavor=debug", "scaling.num_workers=1", "log_every=1", "data.micro_batch_size=4",
            "data.shuffle_buffer=0", "data.record_ids=true", "tracking.sample_images=0", f"data.mode={mode}",
            f"data.precompute_config={yaml}", f"data.store={d / ('store' if mode == 'store' else 'no_store')}",
            f"checkpoint.storage_path={d / 'ray'}", f"tracking.tracking_uri=sqlite:///{d / 'mlflow.db'}",
            f"run_name={name}"]
    return load_config(TrainConfig, None, base + list(sets), STAGE_DEFAULTS["align"])


def test_streaming_trains_on_the_examples_of_the_store_and_reports_the_same_drops(data):
    d, yaml, pre = data
    model_cfg = get_flavor("debug")
    assembly = stage_cfg(d, yaml, "store", "unused").data.assembly
    store_rows = ordered_rows(training_dataset(str(d / "store"), model_cfg, assembly))
    plan = streaming.plan_streaming_pool(Resources(cpus=2, gpus=0), pre, 0, 1)
    reports = streaming.start_reports()
    stream_rows = ordered_rows(streaming.streaming_dataset(pre, "laion", model_cfg, assembly, plan, reports))
    # The same examples in the same order: ids, tokens, CLIP crops and the VAE latents byte for byte.
    assert stream_rows and [fingerprint(r) for r in stream_rows] == [fingerprint(r) for r in store_rows]
    assert sum(len(r["dream_keys"]) for r in stream_rows) > 0

    # End to end: stage I in streaming mode for one epoch and one step, through the real job path.
    B = 4
    epoch = math.ceil(len(store_rows) / B)
    cfg = stage_cfg(d, yaml, "streaming", "stream", f"optim.max_steps={epoch + 1}",
                    f"checkpoint.every_n_steps={epoch + 1}")
    r = run_stage(cfg)
    assert r.metrics["step"] == epoch + 1
    assert not (d / "no_store").exists(), "streaming mode wrote a latent store"
    seen = [json.loads((d / "ray" / "stream" / "example_ids" / f"step_{s:07d}.json").read_text())["ranks"][0]["ids"]
            for s in range(1, epoch + 2)]
    want = [f"{x['shard_id']}/{x['record_id']}" for x in store_rows]
    # Every step's batch is the store order's next micro-batch; the step after the epoch starts it again.
    assert seen == [want[i:i + B] for i in range(0, len(want), B)] + [want[:B]]

    # Bad records: counted per shard (once, though the second epoch read them again), logged to MLflow and
    # kept beside the run, equal to what the precompute committed in the store's manifest.
    expected = Report()
    for entry in LatentStore(str(d / "store")).manifest().values():
        expected.merge(entry)
    assert expected.dropped, "the synthetic defects should drop something"
    got = client(cfg.tracking).get_run(r.mlflow_run_id).data.metrics
    for reason, n in expected.dropped.items():
        assert got[f"data.dropped.{reason}"] == n, reason
    for name, n in expected.counts.items():
        assert got[f"data.{name}"] == n, name
    assert got["data.shards_failed"] == 0 and got["data.shards_read"] == len(LatentStore(str(d / "store")).manifest())
    kept = json.loads((d / "ray" / "stream" / "data_report.json").read_text())
    assert kept["dropped"] == expected.to_dict()["dropped"] and kept["samples"] == expected.to_dict()["samples"]
    assert "data_report.json" in [a.path for a in client(cfg.tracking).list_artifacts(r.mlflow_run_id)]
