"""Faults of the streaming mode: a shard failing in storage is reported and read again next epoch, nothing of
the other shards is lost; bad streaming settings are refused with a clear message."""
import pytest

from dreamllm.config import get_flavor
from dreamllm_platform.config import load_config
from dreamllm_platform.data import streaming
from dreamllm_platform.data.config import AssemblyConfig
from dreamllm_platform.data.synthetic import write_synthetic
from dreamllm_platform.runtime import Resources
from dreamllm_platform.train.config import TrainConfig

from .test_data import MMC4_ONLY, _mmc4_cfg, _reference, proxy  # noqa: F401 - proxy is a fixture


pytestmark = pytest.mark.slow


def test_a_shard_failing_in_storage_is_reported_and_the_next_epoch_reads_it(ray_session, s3, proxy, tally):  # noqa: F811
    root = f"s3://{s3['bucket']}/faults-streaming/storage-errors"
    write_synthetic(f"{root}/data", MMC4_ONLY)
    cfg = _mmc4_cfg(root, proxy, read_retries=0)
    expected = {sid: ids for sid, (ids, _, _) in _reference(cfg).items()}
    bad = "mmc4/docs_shard_0_v2"
    plan = streaming.plan_streaming_pool(Resources(cpus=2, gpus=0), cfg, 0, 1)
    reports = streaming.start_reports()
    ds = streaming.streaming_dataset(cfg, "mmc4", get_flavor("debug"), AssemblyConfig(record_types=("document",)),
                                     plan, reports)

    proxy.fail("docs_shard_0_v2.jsonl.zip", 1)  # the one attempt of epoch 1 at this shard
    first = ds.take_all()
    summary = ray_session.get(reports.summary.remote())
    assert proxy.injected == 1 and set(summary["shards_failed"]) == {bad}
    assert summary["shards_read"] == sorted(set(expected) - {bad})
    assert {r["shard_id"] for r in first} == set(expected) - {bad}  # the others streamed

    second = ds.take_all()  # the next epoch reads the shard again
    summary = ray_session.get(reports.summary.remote())
    assert summary["shards_failed"] == {} and summary["shards_read"] == sorted(expected)
    got = {(r["shard_id"], r["record_id"]) for r in second}
    lost = sum(len({(sid, i) for i in ids} - got) for sid, ids in expected.items())
    assert lost == 0
    tally(faults_injected=1, runs_completed=1, records_lost=lost)


def test_bad_streaming_settings_are_refused(tally):
    with pytest.raises(ValueError, match="data.mode must be store or streaming, got 'stream'"):
        load_config(TrainConfig, None, ["data.mode=stream"])
    cfg = _mmc4_cfg("/nonexistent", type("P", (), {"endpoint": None})())
    plan = streaming.plan_streaming_pool(Resources(cpus=2, gpus=0), cfg, 0, 1)
    with pytest.raises(ValueError, match=r"data source 'laion' of the mix is not an enabled source .*\['mmc4'\]"):
        streaming.streaming_dataset(cfg, "laion", get_flavor("debug"), AssemblyConfig(), plan, None)
    tally(bad_inputs=2)
