"""The precompute pipeline on a real local Ray and a real S3 endpoint (moto), and training-set assembly.

One store is built per module (debug flavor, a tiny synthetic set with one of
each defect) and then checked: exact counts, latents equal to the VAE's,
re-runs that write nothing, a resumed run that ends byte-identical, and the
streaming training dataset read through Ray Train's `get_dataset_shard`.
"""
import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dreamllm.components import build_vae, encode_latent_dist
from dreamllm.config import get_flavor
from dreamllm.images import resize_center_crop, vae_pixels
from dreamllm.tokenizer import build_tokenizer
from dreamllm_platform import storage
from dreamllm_platform.data.assembly import ExampleCollator, training_dataset
from dreamllm_platform.data.config import AssemblyConfig, EncoderConfig, PrecomputeConfig, SyntheticConfig
from dreamllm_platform.data.latents import run_precompute
from dreamllm_platform.data.store import LatentStore
from dreamllm_platform.data.synthetic import DEFECTS

pytestmark = pytest.mark.slow

TINY = SyntheticConfig(image_size=48, mmc4_shards=2, docs_per_shard=2, scenes_per_doc=2, webdataset_shards=1,
                       parquet_shards=1, pairs_per_shard=3, conversations=2, instruct_docs=1, defects=True)
MODEL = get_flavor("debug")


@pytest.fixture(scope="module")
def run(ray_session, s3):
    root = f"s3://{s3['bucket']}/pipeline-test"
    cfg = PrecomputeConfig(flavor="debug", data_root=f"{root}/data", output=f"{root}/store", synthetic=TINY,
                           encoder=EncoderConfig(batch_size=8))
    summary = run_precompute(cfg)
    return cfg, summary


def snapshot(uri):
    """path -> (bytes) of every object of the store."""
    fs, path = storage.fsspec_fs(uri)
    return {p: fs.cat_file(p) for p in sorted(fs.find(path))}


def test_report_and_store_hold_exact_counts(run):
    cfg, summary = run
    report = json.loads(storage.read_bytes(storage.join(cfg.output, "report.json")))
    assert report["dropped"] == DEFECTS
    c = report["counts"]
    assert (c["documents_out"], c["pairs_out"], c["conversations_out"], c["instruct_docs_out"]) == (13, 8, 2, 1)
    store = LatentStore(cfg.output)
    manifest = store.manifest()
    # 3 mmc4 (one unreadable), 2 webdataset (one truncated), 1 parquet, 1 llava, 1 instruct
    assert len(manifest) == summary.shards_total == summary.shards_done == 8
    assert sum(e["num_images"] for e in manifest.values()) == c["images_out"] == summary.images_encoded
    assert sum(e["num_records"] for e in manifest.values()) == 13 + 8 + 2 + 1
    for sid, entry in manifest.items():
        lat = store.read_latents(sid)
        assert lat.num_rows == entry["num_images"] and lat.column("sha256").to_pylist() == sorted(
            lat.column("sha256").to_pylist())
        assert store.read_records(sid).num_rows == entry["num_records"]
        assert entry["config_hash"] == cfg.shard_config_hash(cfg.sources[sid.split("/")[0]])
    assert manifest["laion/00001"]["dropped"] == {"truncated_shard": 1}
    assert manifest["mmc4/docs_shard_2_v2"]["num_images"] == 0


def test_latents_are_the_vae_posterior_of_the_image(run):
    cfg, _ = run
    shard = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.data_root, "laion_parquet/00000.parquet"))))
    image_bytes = shard.column("jpg")[0].as_py()
    import hashlib

    sha = hashlib.sha256(image_bytes).hexdigest()
    lat = LatentStore(cfg.output).read_latents("laion_parquet/00000").to_pylist()
    row = next(r for r in lat if r["sha256"] == sha)
    img = Image.open(io.BytesIO(image_bytes))
    mean, logvar = encode_latent_dist(build_vae(MODEL.diffusion), vae_pixels(img, 32)[None])
    C, h = MODEL.diffusion.latent_channels, MODEL.diffusion.latent_size
    got_mean = np.frombuffer(row["mean"], np.float16).reshape(C, h, h)
    got_logvar = np.frombuffer(row["logvar"], np.float16).reshape(C, h, h)
    np.testing.assert_allclose(got_mean, mean[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got_logvar, logvar[0].numpy(), atol=2e-3, rtol=2e-3)
    clip = np.asarray(resize_center_crop(img, MODEL.vision.image_size), np.uint8).tobytes()
    assert row["clip_u8"] == clip


def test_rerun_writes_nothing(run):
    cfg, _ = run
    before = snapshot(cfg.output)
    fs, path = storage.fsspec_fs(cfg.output)
    mtimes = {p: d["LastModified"] for p, d in fs.find(path, detail=True).items()}
    again = run_precompute(cfg)
    assert (again.shards_done, again.shards_skipped, again.images_encoded) == (0, 8, 0)
    assert snapshot(cfg.output) == before
    assert {p: d["LastModified"] for p, d in fs.find(path, detail=True).items()} == mtimes


def test_interrupted_run_finishes_the_rest_identically(run):
    cfg, _ = run
    before = snapshot(cfg.output)
    store = LatentStore(cfg.output)
    # A run killed after writing mmc4 shard 0's data but before its manifest entry,
    # and one that lost a data file of a committed shard: both are redone.
    storage.remove(store.manifest_uri("mmc4/docs_shard_0_v2"))
    storage.remove(store.latents_uri("laion/00000"))
    storage.remove(store.report_uri)
    resumed = run_precompute(cfg)
    assert (resumed.shards_done, resumed.shards_skipped) == (2, 6)
    assert snapshot(cfg.output) == before


def test_settings_outside_the_config_hash_redo_nothing(run):
    cfg, _ = run
    changed = dataclasses.replace(cfg, filters=dataclasses.replace(cfg.filters, sample_keys=2))
    assert run_precompute(changed).shards_done == 0  # sample_keys does not change outputs


def test_training_dataset_streams_collatable_examples(run):
    cfg, _ = run
    ds = training_dataset(cfg.output, MODEL)
    rows = ds.take_all()
    # documents 13 + pairs 8 x (comprehension, creation) + conversations 2 + instruction documents 1
    assert len(rows) == 13 + 16 + 2 + 1
    tok = build_tokenizer(MODEL.tokenizer)
    for r in rows:
        assert len(r["latents"]) == len(r["dream_keys"]) and len(r["images"]) == len(r["image_keys"])
        assert len(r["input_ids"]) == len(r["labels"]) <= MODEL.llm.context_length
    text = tok.decode([i for i in rows[0]["input_ids"] if i < len(tok) - 6])
    assert "scene" in text or "A " in text
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=ExampleCollator(MODEL))))
    S, C, h = MODEL.vision.image_size, MODEL.diffusion.latent_channels, MODEL.diffusion.latent_size
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape == batch["labels"].shape
    n_img, n_dream = batch["pixel_values"].shape[0], batch["latent_mean"].shape[0]
    assert batch["pixel_values"].shape == (n_img, 3, S, S) and batch["latent_logvar"].shape == (n_dream, C, h, h)
    assert batch["latent_mean"].dtype == torch.float32 and torch.isfinite(batch["latent_mean"]).all()

    np_batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    packed = ExampleCollator(MODEL, pack=True)(np_batch)
    n_tokens = sum(len(ids) for ids in np_batch["input_ids"])
    assert packed["input_ids"].shape[1] == MODEL.llm.context_length and packed["input_ids"].shape[0] < 8
    assert int((packed["position_ids"][:, 1:] == 0).sum()) >= 8 - packed["input_ids"].shape[0]  # restarts
    assert int((packed["labels"] != -100).sum()) == sum(int((np.asarray(lab) != -100).sum())
                                                       for lab in np_batch["labels"])
    assert n_tokens <= packed["input_ids"].numel()

    only_pairs = training_dataset(cfg.output, MODEL, AssemblyConfig(record_types=("pair",), pair_tasks=("creation",)))
    assert only_pairs.count() == 8
    with pytest.raises(ValueError, match="was built for"):
        training_dataset(cfg.output, get_flavor("small"))


def test_two_workers_split_the_stream_as_get_dataset_shard_does(run):
    """Ray Train's get_dataset_shard hands each worker one iterator of `streaming_split`; consume two
    concurrently (as two workers would) and check every example arrives exactly once."""
    import threading

    cfg, _ = run
    ds = training_dataset(cfg.output, MODEL)
    expected = sorted((r["shard_id"], r["record_id"], len(r["input_ids"])) for r in ds.take_all())
    seen = [[], []]
    collate = ExampleCollator(MODEL)

    def consume(rank, it):
        for b in it.iter_batches(batch_size=4, batch_format="numpy"):
            collate(b)  # every batch collates
            seen[rank] += [(s, r, len(i)) for s, r, i in zip(b["shard_id"], b["record_id"], b["input_ids"])]

    threads = [threading.Thread(target=consume, args=(k, it)) for k, it in enumerate(ds.streaming_split(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(seen[0] + seen[1]) == expected
