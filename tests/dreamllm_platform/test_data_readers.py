"""Readers, filters, synthetic data and configs, without Ray: real shards in every format on S3 (moto)."""
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dreamllm_platform import storage
from dreamllm_platform.config import load_config
from dreamllm_platform.data import readers
from dreamllm_platform.data.config import SHARD_SUFFIXES, EncoderConfig, FilterConfig, PrecomputeConfig, SyntheticConfig
from dreamllm_platform.data.filters import REASONS, Report, decode_image
from dreamllm_platform.data.latents import plan_pool, plan_shards, resolved_sources
from dreamllm_platform.data.shards import ShardReader
from dreamllm_platform.data.synthetic import DEFECTS, Scene, jpeg, png_bomb_header, write_synthetic
from dreamllm_platform.runtime import Resources

REPO = Path(__file__).resolve().parents[2]
TINY = SyntheticConfig(image_size=48, mmc4_shards=2, docs_per_shard=2, scenes_per_doc=2, webdataset_shards=1,
                       parquet_shards=1, pairs_per_shard=3, conversations=2, instruct_docs=1, defects=True)


@pytest.fixture(scope="module")
def s3_data(s3):
    root = f"s3://{s3['bucket']}/readers-test/data"
    write_synthetic(root, TINY)
    return root


def read_all(cfg: PrecomputeConfig):
    total, per_shard = Report(sample_keys=100), {}
    for task in plan_shards(cfg):
        src = resolved_sources(cfg)[task.source]
        r = ShardReader(src, task.uri, cfg.filters, 32, 32)
        images = list(r.images())
        per_shard[task.shard_id] = (r, images)
        total.merge(r.report)
    return total, per_shard


def test_every_defect_is_counted_exactly(s3_data):
    cfg = PrecomputeConfig(flavor="debug", data_root=s3_data)
    total, per_shard = read_all(cfg)
    assert total.dropped == DEFECTS
    assert set(DEFECTS) <= set(REASONS)
    c = total.counts
    # 2x2 docs + 9 defect documents parsed (+1 malformed record); 1 defect doc loses its only image;
    # 1 is malformed. Pairs: 3 + 1 duplicate in the tar, 2 surviving the truncated tar, 3 in parquet.
    assert (c["documents_in"], c["documents_out"]) == (4 + 11, 4 + 9)
    assert (c["pairs_in"], c["pairs_out"]) == (3 + 1 + 2 + 3, 3 + 2 + 3)
    assert (c["conversations_in"], c["conversations_out"]) == (2 + 1, 2)
    assert (c["instruct_docs_in"], c["instruct_docs_out"]) == (1, 1)
    # every emitted image is unique in its shard and has the sizes asked for
    for shard_id, (r, images) in per_shard.items():
        shas = [i["sha256"] for i in images]
        assert len(shas) == len(set(shas)) == r.report.counts.get("images_out", 0), shard_id
        assert all(len(i["vae_u8"]) == 32 * 32 * 3 and len(i["clip_u8"]) == 32 * 32 * 3 for i in images)
        # every image a kept record references was emitted, and nothing else
        used = set()
        for _, _, data in r.records:
            used |= {it["image"] for it in _all_items(json.loads(data)) if "image" in it}
        assert used == set(shas), shard_id
    docs = [json.loads(d) for r, _ in per_shard.values() for _, t, d in r.records if t == "document"]
    many = max(docs, key=lambda d: sum("image" in it for it in d["items"]))
    assert sum("image" in it for it in many["items"]) == FilterConfig().max_images_per_doc


def _all_items(data):
    return data.get("items", []) + [it for t in data.get("turns", []) for it in t["items"]] + (
        [{"image": data["image"]}] if "image" in data else [])


def test_optional_filters_change_the_counts(s3_data):
    cfg = PrecomputeConfig(flavor="debug", data_root=s3_data,
                           filters=FilterConfig(drop_url_duplicates=True, min_matched_sim=0.0, dedupe_images=False))
    total, _ = read_all(cfg)
    assert total.dropped["url_duplicate"] == 1
    assert "low_similarity" not in total.dropped and "no_images" not in total.dropped
    assert "duplicate_image" not in total.dropped


def test_records_of_unexpected_shapes_are_counted_not_fatal(tmp_path, s3_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = next(readers.iter_mmc4(storage.join(s3_data, "mmc4/docs_shard_0_v2.jsonl.zip"), Report()))[1]
    weird = [dict(good, image_info=[dict(good["image_info"][0], matched_text_index="first")]),
             dict(good, image_info=["not a dict"]), [1, 2], dict(good, text_list=None)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(w) for w in weird + [good]) + "\n")
    cfg = PrecomputeConfig(flavor="debug", data_root=s3_data)
    # docs.jsonl is outside the shard_<N> layout: its images come from the whole images location
    src = dataclasses.replace(resolved_sources(cfg)["mmc4"], uri=str(tmp_path), images_pattern=None)
    r = ShardReader(src, str(tmp_path / "docs.jsonl"), cfg.filters, 32, 32)
    images = list(r.images())
    assert r.report.dropped == {"malformed_record": 4}
    assert len(r.records) == 1 and len(images) == len(good["image_info"])

    llava = [{"id": "a", "conversations": [1, 2]}, {"id": "b", "conversations": [{"from": "robot", "value": "x"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "<image> hi"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    r = ShardReader(dataclasses.replace(src, format="llava"), str(tmp_path / "llava.json"), cfg.filters, 32, 32)
    assert list(r.images()) == [] and r.report.dropped == {"malformed_record": 3}

    pq.write_table(pa.table({"caption": ["x", ""], "jpg": ["a string, not bytes", None]}), tmp_path / "p.parquet")
    r = ShardReader(dataclasses.replace(src, format="laion_parquet"), str(tmp_path / "p.parquet"), cfg.filters, 32, 32)
    assert list(r.images()) == [] and r.report.dropped == {"undecodable_image": 1, "malformed_record": 1}


def test_truncated_webdataset_tar_keeps_the_samples_before_the_cut(s3_data):
    report = Report()
    samples = list(readers.iter_webdataset(storage.join(s3_data, "laion/00001.tar"), report))
    assert [k for k, _ in samples] == ["000010000", "000010001"]
    assert all(s["caption"].startswith("A ") and s["image"][:2] == b"\xff\xd8" for _, s in samples)
    assert report.dropped == {"truncated_shard": 1}


def test_images_are_found_in_tar_shards_with_ranged_reads(s3_data):
    loc = readers.ImageLocation(storage.join(s3_data, "mmc4/images"))
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(s3_data, "mmc4/images/shard_1.tar")))) as t:
        member = t.getmembers()[1]
        expected = t.extractfile(member).read()
    assert loc.get(member.name) == expected
    assert loc.get("no-such-image.jpg") is None


def test_missing_images_can_be_downloaded_from_raw_url(tmp_path):
    """A real HTTP server on loopback stands in for the web; download is off unless asked for."""
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "images").mkdir()
    data = jpeg(Scene("red", "circle", "center", "large", "blue").render(48))
    (tmp_path / "www/a.jpg").write_bytes(data)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        loc = readers.ImageLocation(str(tmp_path / "images"), download=True, timeout_s=2, retries=1)
        assert loc.get("a.jpg", f"{url}/a.jpg") == data
        assert loc.get("b.jpg", f"{url}/b.jpg") is None  # 404 after a retry
        assert readers.ImageLocation(str(tmp_path / "images")).get("a.jpg", f"{url}/a.jpg") is None
    finally:
        server.shutdown()


def test_decode_image_reasons():
    f = FilterConfig(min_image_side=16, max_aspect_ratio=2.0, max_image_pixels=10_000)
    good = jpeg(Scene("red", "circle", "center", "large", "blue").render(64))
    img, reason = decode_image(good, f)
    assert reason is None and img.size == (64, 64) and img.mode == "RGB"
    assert decode_image(good[: len(good) // 2], f) == (None, "undecodable_image")
    assert decode_image(b"not an image", f) == (None, "undecodable_image")
    assert decode_image(png_bomb_header(1000, 1000), f) == (None, "oversized_image")
    assert decode_image(jpeg(Image.new("RGB", (8, 40))), f) == (None, "too_small")
    assert decode_image(jpeg(Image.new("RGB", (90, 30))), f) == (None, "bad_aspect_ratio")


def test_synthetic_set_is_deterministic_and_in_the_real_formats(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    small = dataclasses.replace(TINY, defects=False)
    write_synthetic(str(a), small)
    write_synthetic(str(b), small)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    names = {str(f) for f in files}
    assert {"mmc4/docs_shard_0_v2.jsonl.zip", "mmc4/images/shard_0.tar", "laion/00000.tar", "laion/00000.parquet",
            "laion_parquet/00000.parquet", "llava/synthetic_llava.json", "instruct/instruct_docs.json"} <= names
    doc = next(readers.iter_mmc4(str(a / "mmc4/docs_shard_0_v2.jsonl.zip"), Report()))[1]
    assert set(doc) >= {"text_list", "url", "could_have_url_duplicate", "similarity_matrix", "image_info"}
    assert set(doc["image_info"][0]) >= {"image_name", "raw_url", "matched_text_index", "matched_sim",
                                         "face_detections"}


def test_plan_pool_never_starves_reads():
    two = plan_pool(Resources(cpus=2, gpus=0), EncoderConfig())
    assert two.size == 1 and two.gpus_per_actor == 0
    assert two.size * two.cpus_per_actor + two.read_cpus <= 2
    gpu = plan_pool(Resources(cpus=16, gpus=4), EncoderConfig())
    assert (gpu.size, gpu.gpus_per_actor) == (4, 1.0) and gpu.size * gpu.cpus_per_actor + gpu.read_cpus <= 16
    with pytest.raises(ValueError, match="does not fit the cluster"):
        plan_pool(Resources(cpus=2, gpus=0), EncoderConfig(pool_size=2, cpus_per_actor=1.0))


def test_configs_validate_and_shipped_yaml_parses():
    with pytest.raises(ValueError, match="valid keys"):
        load_config(PrecomputeConfig, overrides=["filters.min_sim=0.3"])
    with pytest.raises(ValueError, match="source format must be one of"):
        load_config(PrecomputeConfig, overrides=["sources.x.format=tiff", "sources.x.uri=d"])
    with pytest.raises(ValueError, match="unknown flavor"):
        load_config(PrecomputeConfig, overrides=["flavor=huge"])
    for path in sorted((REPO / "configs").glob("precompute*.yaml")):
        cfg = load_config(PrecomputeConfig, path)
        assert cfg.sources and all(s.format in SHARD_SUFFIXES for s in cfg.sources.values()), path
    assert load_config(PrecomputeConfig, REPO / "configs/precompute.yaml") == PrecomputeConfig()


def test_config_hash_follows_the_settings_that_change_outputs():
    base = PrecomputeConfig(flavor="debug")
    src = base.sources["mmc4"]
    h = base.shard_config_hash(src)
    assert h == PrecomputeConfig(flavor="debug").shard_config_hash(src)
    assert h == PrecomputeConfig(flavor="debug", filters=FilterConfig(sample_keys=9)).shard_config_hash(src)
    assert h != PrecomputeConfig(flavor="small").shard_config_hash(src)
    assert h != PrecomputeConfig(flavor="debug", filters=FilterConfig(min_image_side=8)).shard_config_hash(src)
