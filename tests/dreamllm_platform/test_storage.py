"""Storage URIs through a real S3 endpoint (moto on loopback) and the local disk."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamllm_platform import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3['bucket']}/storage-test/{request.node.name.replace('[', '-').rstrip(']')}"


def test_bytes_round_trip_listing_and_remove(root):
    storage.write_bytes(storage.join(root, "a/x.json"), b"{}")
    storage.write_bytes(storage.join(root, "a/b/y.tar"), b"tar")
    storage.write_bytes(storage.join(root, "z.json"), b"[1]")
    assert storage.read_bytes(storage.join(root, "a/b/y.tar")) == b"tar"
    assert storage.list_files(root, (".json",)) == [storage.join(root, "a/x.json"), storage.join(root, "z.json")]
    assert storage.list_files(storage.join(root, "z.json")) == [storage.join(root, "z.json")]
    assert storage.list_files(storage.join(root, "nothing-here")) == []
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a/x.json"))
    with pytest.raises(FileNotFoundError, match="not found: .*missing.bin"):
        storage.read_bytes(storage.join(root, "missing.bin"))


def test_arrow_filesystem_reads_what_fsspec_wrote(root):
    table = pa.table({"k": ["a", "b"], "v": [1, 2]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(root, "t.parquet"), buf.getvalue())
    fs, path = storage.arrow_fs(storage.join(root, "t.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_file_uri_and_plain_path_are_the_same_file(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/f.bin", b"1")
    assert storage.read_bytes(str(tmp_path / "f.bin")) == b"1"
    assert not storage.is_remote(f"file://{tmp_path}") and storage.is_remote("s3://b/k")


def test_local_paths_and_file_uris_become_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.local_path(f"file://{tmp_path}/ckpt") == storage.local_path("ckpt") == tmp_path / "ckpt"
    assert storage.is_local("ckpt") and storage.is_local(f"file://{tmp_path}") and not storage.is_local("s3://b/k")
    assert not storage.is_local("models:/dreamllm@champion")
    assert [storage.is_absolute(u) for u in ("s3://b/k", "file:///d", "/d", "d/e")] == [True, True, True, False]


def test_local_writes_are_atomic_and_clean_up_after_killed_writers(tmp_path):
    import os
    import time

    stale = tmp_path / ".x.json.abc123.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"half a file")
    old = time.time() - storage.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    storage.write_bytes(str(tmp_path / "x.json"), b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported storage URI 'gs://b/k'"):
        storage.fsspec_fs("gs://b/k")


def test_download_dir_caches_a_remote_tree(s3, tmp_path):
    root = f"s3://{s3['bucket']}/ckpt-test/model"
    storage.write_bytes(storage.join(root, "config.json"), b"{}")
    storage.write_bytes(storage.join(root, "vae/weights.bin"), b"w" * 10)
    local = storage.download_dir(root, tmp_path / "cache")
    assert (local / "config.json").read_bytes() == b"{}" and (local / "vae/weights.bin").read_bytes() == b"w" * 10
    storage.write_bytes(storage.join(root, "config.json"), b"changed")
    assert storage.download_dir(root, tmp_path / "cache") == local  # complete: reused, not fetched again
    assert (local / "config.json").read_bytes() == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.download_dir(f"s3://{s3['bucket']}/no/such/dir", tmp_path / "cache")


def test_ray_data_reads_and_writes_s3(ray_session, s3):
    import ray

    uri = f"s3://{s3['bucket']}/ray-data-test"
    fs, path = storage.arrow_fs(uri)
    ray.data.from_items([{"i": i} for i in range(10)]).write_parquet(path, filesystem=fs)
    assert sorted(r["i"] for r in ray.data.read_parquet(path, filesystem=fs).take_all()) == list(range(10))
    assert storage.list_files(uri, (".parquet",))
