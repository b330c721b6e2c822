"""The data path at corpus scale: each shard reads only its own images tar, and duplicate images are
resolved across shards and resubmissions in reading order.

Real parts: the synthetic set and hand-written tars/JSONL on local disk and on the moto S3 server,
a real local Ray for the precompute runs. Tar accesses are counted by wrapping the filesystem that
`storage.fsspec_fs` hands out (every storage call of the readers goes through it).
"""
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dreamllm_platform import storage
from dreamllm_platform.data import latents, readers
from dreamllm_platform.data.config import EncoderConfig, PrecomputeConfig, SourceConfig, SyntheticConfig
from dreamllm_platform.data.latents import resolved_sources, run_precompute
from dreamllm_platform.data.shards import ShardReader
from dreamllm_platform.data.store import LatentStore
from dreamllm_platform.data.synthetic import Scene, jpeg, write_synthetic

MMC4_3 = SyntheticConfig(image_size=48, mmc4_shards=3, docs_per_shard=2, scenes_per_doc=2, webdataset_shards=0,
                         parquet_shards=0, pairs_per_shard=0, conversations=0, instruct_docs=0)


class Recording:
    """A filesystem that logs (method, path) of every call taking a path, then does it."""

    CALLS = ("open", "cat_file", "cat", "size", "info", "exists", "isfile", "find", "ls", "glob", "walk")

    def __init__(self, fs, log):
        self._fs, self._log = fs, log

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in self.CALLS:
            return attr

        def call(path, *args, **kwargs):
            self._log.append((name, str(path)))
            return attr(path, *args, **kwargs)
        return call


@pytest.fixture
def fs_log(monkeypatch):
    log: list[tuple[str, str]] = []
    real = storage.fsspec_fs
    monkeypatch.setattr(storage, "fsspec_fs", lambda uri, cfg=None: (lambda fs, p: (Recording(fs, log), p))(
        *real(uri, cfg)))
    readers._tar_index.cache_clear()  # an index cached by an earlier test would hide the opens
    yield log
    readers._tar_index.cache_clear()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_opens_only_the_images_tar_its_name_gives(where, tmp_path, request, fs_log):
    root = f"s3://{request.getfixturevalue('s3')['bucket']}/scale-test/{tmp_path.name}" if where == "s3" \
        else str(tmp_path)
    write_synthetic(root, MMC4_3)
    cfg = PrecomputeConfig(flavor="debug", data_root=root,
                           sources={"mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images", "shard_{n}.tar")})
    src = resolved_sources(cfg)["mmc4"]
    shard = storage.join(root, "mmc4/docs_shard_1_v2.jsonl.zip")
    fs_log.clear()
    r = ShardReader(src, shard, cfg.filters, 32, 32)
    images = list(r.images())
    assert len(r.records) == 2 and len(images) == 4 and r.report.dropped == {}
    touched = {p.rsplit("/", 1)[-1] for _, p in fs_log if "/images" in p}
    assert touched == {"shard_1.tar"}, fs_log  # no other tar opened, the images folder never listed
    assert not [c for c in fs_log if c[0] in ("find", "ls", "glob", "walk") and "/images" in c[1]]

    # Without a rule (the old behaviour, kept as the fallback): every tar of the corpus is indexed.
    fs_log.clear()
    whole = ShardReader(dataclasses.replace(src, images_pattern=None), shard, cfg.filters, 32, 32)
    assert [i["sha256"] for i in whole.images()] == [i["sha256"] for i in images]
    assert {p.rsplit("/", 1)[-1] for m, p in fs_log if m == "open" and p.endswith(".tar")} == {
        "shard_0.tar", "shard_1.tar", "shard_2.tar"}


def test_the_default_config_reads_the_synthetic_set_by_its_per_shard_rule(tmp_path, fs_log):
    write_synthetic(str(tmp_path), MMC4_3)
    cfg = PrecomputeConfig(flavor="debug", data_root=str(tmp_path))
    assert cfg.sources["mmc4"].images_pattern == "shard_{n}.tar"
    for task in latents.plan_shards(cfg):
        if task.source != "mmc4":
            continue
        fs_log.clear()
        r = ShardReader(resolved_sources(cfg)["mmc4"], task.uri, cfg.filters, 32, 32)
        assert len(list(r.images())) == 4 and r.report.dropped == {}
        n = task.shard_id.split("_")[2]
        assert {p.rsplit("/", 1)[-1] for m, p in fs_log if p.endswith(".tar")} == {f"shard_{n}.tar"}


def test_a_shard_whose_named_tar_is_absent_reads_loose_files(tmp_path):
    (tmp_path / "images").mkdir()
    photo = jpeg(Scene("red", "circle", "center", "large", "blue").render(48))
    (tmp_path / "images/a.jpg").write_bytes(photo)
    loc = readers.ImageLocation(str(tmp_path / "images"), tar="shard_7.tar")
    assert loc.get("a.jpg") == photo and loc.get("b.jpg") is None


# ----------------------------------------------------------- deduplication

IMG = {k: jpeg(Scene(c, s, "center", "large", "white").render(48)) for k, c, s in (
    ("A", "red", "circle"), ("B", "blue", "square"), ("C", "green", "star"), ("D", "black", "ring"),
    ("E", "orange", "cross"), ("F", "purple", "diamond"), ("G", "brown", "triangle"))}


def _tar(path: Path, files: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def _pairs(data: Path, shard: int, pairs: list[tuple[str, str]]) -> None:
    """A webdataset tar of (key, image letter) samples."""
    _tar(data / f"laion/{shard:05d}.tar", [f for k, img in pairs for f in (
        (f"{k}.jpg", IMG[img]), (f"{k}.txt", f"A picture {k}.".encode()))])


def _docs(data: Path, shard: int, docs: list[list[tuple[str, str]]]) -> None:
    """An MMC4 shard of documents of (image name, image letter), and its images tar shard_<N>.tar."""
    lines = [json.dumps({"text_list": ["Scenes."] + [f"Scene {n}." for n, _ in d],
                         "image_info": [{"image_name": n, "matched_text_index": i + 1, "matched_sim": 0.3}
                                        for i, (n, _) in enumerate(d)]}) for d in docs]
    (data / "mmc4").mkdir(parents=True, exist_ok=True)
    (data / f"mmc4/docs_shard_{shard}_v2.jsonl").write_text("\n".join(lines) + "\n")
    _tar(data / f"mmc4/images/shard_{shard}.tar", [(n, IMG[img]) for d in docs for n, img in d])


def _cfg(data: Path, out: Path) -> PrecomputeConfig:
    return PrecomputeConfig(flavor="debug", data_root=str(data), output=str(out),
                            sources={"mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images", "shard_{n}.tar"),
                                     "laion": SourceConfig("webdataset", "laion")},
                            synthetic=SyntheticConfig(enabled=False), encoder=EncoderConfig(batch_size=8))


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "report.json"}  # the report names its output


def _shas(store: LatentStore, sid: str) -> set[str]:
    return set(store.image_shas(sid))


def _sha(letter: str) -> str:
    import hashlib

    return hashlib.sha256(IMG[letter]).hexdigest()


@pytest.fixture(scope="module")
def dup_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("dedupe") / "data"
    _pairs(data, 0, [("k0", "A"), ("k1", "B")])
    _pairs(data, 1, [("k2", "B"), ("k3", "C")])  # k2 repeats k1's image
    _docs(data, 0, [[("d0.jpg", "D")], [("e0.jpg", "E")]])
    _docs(data, 1, [[("d1.jpg", "D"), ("f1.jpg", "F")]])  # D again, under another name, in another shard
    return data


@pytest.mark.slow
def test_duplicates_across_shards_keep_the_first_in_reading_order(ray_session, dup_data, tmp_path, monkeypatch):
    cfg = _cfg(dup_data, tmp_path / "store")
    summary = run_precompute(cfg)
    store = LatentStore(cfg.output)
    report = json.loads(storage.read_bytes(store.report_uri))
    assert report["dropped"] == {"duplicate_image": 1} and report["samples"]["duplicate_image"] == ["k2"]
    assert report["counts"]["pairs_out"] == 3 and report["counts"]["shared_image_in_document"] == 1
    assert [r["id"] for r in store.read_records("laion/00000").to_pylist()] == ["k0", "k1"]
    assert [r["id"] for r in store.read_records("laion/00001").to_pylist()] == ["k3"]
    assert _shas(store, "laion/00001") == {_sha("C")}  # the dropped pair's image is not stored again
    # The document keeps its shared image; its shard stores it (assembly joins per shard).
    assert store.read_records("mmc4/docs_shard_1_v2").num_rows == 1
    assert _shas(store, "mmc4/docs_shard_1_v2") == {_sha("D"), _sha("F")}
    m = store.manifest()
    assert m["laion/00001"]["dropped"] == {"duplicate_image": 1} and m["laion/00001"]["num_images"] == 1
    assert m["mmc4/docs_shard_1_v2"]["counts"]["shared_image_in_document"] == 1
    assert summary.report.dropped == {"duplicate_image": 1}

    # The same data with the tasks ending in reverse reading order: the same store, byte for byte.
    real = latents.build_pipeline

    def reversed_pipeline(cfg, pending, plan):
        table = pa.concat_tables(list(real(cfg, pending, plan).iter_batches(batch_size=None,
                                                                            batch_format="pyarrow")))
        return _Batches([table.filter(pc.equal(table["shard_id"], t.shard_id)) for t in reversed(pending)])

    monkeypatch.setattr(latents, "build_pipeline", reversed_pipeline)
    run_precompute(dataclasses.replace(cfg, output=str(tmp_path / "reversed")))
    assert _store_files(tmp_path / "reversed") == _store_files(tmp_path / "store") != {}
    rev = json.loads((tmp_path / "reversed/report.json").read_text())
    assert {**rev, "output": None} == {**report, "output": None}


class _Batches:
    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, **kwargs):
        return iter(self.tables)


@pytest.mark.slow
def test_a_resubmission_drops_images_the_store_already_has(ray_session, dup_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dup_data, data)
    cfg = _cfg(data, tmp_path / "store")
    run_precompute(cfg)
    _pairs(data, 2, [("k4", "A"), ("k5", "G")])  # A is stored (laion/00000)
    _docs(data, 2, [[("e2.jpg", "E")]])  # E is in a stored document (docs_shard_0)
    again = run_precompute(cfg)
    assert (again.shards_done, again.shards_skipped) == (2, 4)
    store = LatentStore(cfg.output)
    assert [r["id"] for r in store.read_records("laion/00002").to_pylist()] == ["k5"]
    assert _shas(store, "laion/00002") == {_sha("G")}
    m = store.manifest()
    assert m["laion/00002"]["dropped"] == {"duplicate_image": 1} and m["laion/00002"]["samples"] == {
        "duplicate_image": ["k4"]}
    assert m["mmc4/docs_shard_2_v2"]["counts"]["shared_image_in_document"] == 1
    report = json.loads(storage.read_bytes(store.report_uri))
    assert report["dropped"] == {"duplicate_image": 2} and report["counts"]["shared_image_in_document"] == 2
    assert report["counts"]["pairs_out"] == 4 and report["counts"]["documents_out"] == 4
