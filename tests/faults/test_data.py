"""Faults in the data path: storage errors while reading shards, hostile records, concurrent local
writers, sideways photos. Real parts throughout: the moto S3 server (behind a loopback proxy that
refuses chosen requests, as a storage outage or a credentials lapse does), a real local Ray, real
zip/tar/JSON/JPEG bytes on disk.
"""
import dataclasses
import http.client
import http.server
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import zipfile

import pytest
from PIL import Image

from dreamllm_platform import storage
from dreamllm_platform.data import latents, readers
from dreamllm_platform.data.config import EncoderConfig, FilterConfig, PrecomputeConfig, SourceConfig, SyntheticConfig
from dreamllm_platform.data.filters import decode_image
from dreamllm_platform.data.latents import ShardsFailed, read_shard, resolved_sources, run_precompute
from dreamllm_platform.data.shards import ShardReader
from dreamllm_platform.data.store import LatentStore
from dreamllm_platform.data.synthetic import Scene, jpeg, write_synthetic
from dreamllm_platform.sampling import open_image
from dreamllm_platform.storage import StorageConfig

MMC4_ONLY = SyntheticConfig(image_size=48, mmc4_shards=2, docs_per_shard=2, scenes_per_doc=2, webdataset_shards=0,
                            parquet_shards=0, pairs_per_shard=0, conversations=0, instruct_docs=0)


class FaultProxy:
    """A loopback HTTP proxy in front of the S3 server that answers 403 AccessDenied to chosen requests.

    `fail(substring, n, skip=0)`: of the requests whose path contains `substring`, let `skip` through,
    then refuse the next `n`. `injected` counts the refusals. Ray workers reach it like any endpoint.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.rules: list[list] = []  # [substring, skip, n]
        self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _refuse(self) -> bool:
                with proxy.lock:
                    for rule in proxy.rules:
                        if rule[0] in self.path:
                            if rule[1] > 0:
                                rule[1] -= 1
                            elif rule[2] > 0:
                                rule[2] -= 1
                                proxy.injected += 1
                                return True
                return False

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._refuse():
                    msg = b"<Error><Code>AccessDenied</Code><Message>injected fault</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():  # a HEAD keeps the object's Content-Length
                    if k.lower() not in ("connection", "transfer-encoding") and (
                            self.command == "HEAD" or k.lower() != "content-length"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, substring: str, n: int, skip: int = 0) -> None:
        with self.lock:
            self.rules.append([substring, skip, n])

    def pending(self) -> int:
        return sum(r[2] for r in self.rules)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def proxy(s3):
    p = FaultProxy(s3["endpoint"])
    yield p
    p.close()


def _reference(cfg: PrecomputeConfig, st: StorageConfig | None = None) -> dict[str, tuple[list[str], int, dict]]:
    """shard id -> (record ids, images, drops) read in-process straight from S3: what the store must hold."""
    out = {}
    for task in latents.plan_shards(cfg):
        r = ShardReader(resolved_sources(cfg)[task.source], task.uri, cfg.filters, 32, 32, st)
        n = len(list(r.images()))
        out[task.shard_id] = ([rid for rid, _, _ in r.records], n, r.report.dropped)
    return out


def _mmc4_cfg(root: str, proxy: FaultProxy, **encoder) -> PrecomputeConfig:
    return PrecomputeConfig(flavor="debug", data_root=f"{root}/data", output=f"{root}/store",
                            sources={"mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images")},
                            synthetic=dataclasses.replace(MMC4_ONLY, enabled=False),
                            encoder=EncoderConfig(batch_size=8, **encoder),
                            storage=StorageConfig(endpoint_url=proxy.endpoint))


# ------------------------------------------------------------ storage errors

def test_storage_errors_leave_the_shard_uncommitted_and_a_rerun_commits_it(ray_session, s3, proxy, tally):
    root = f"s3://{s3['bucket']}/faults-data/storage-errors"
    write_synthetic(f"{root}/data", MMC4_ONLY)
    cfg = _mmc4_cfg(root, proxy, read_retries=1)
    expected = _reference(cfg)
    store = LatentStore(cfg.output, cfg.storage)
    bad = "mmc4/docs_shard_0_v2"

    # 3 refusals of the shard's object, 2 attempts per run: run 1 fails it on both attempts;
    # run 2's first attempt is refused and its retry reads the shard.
    proxy.fail("docs_shard_0_v2.jsonl.zip", 3)
    with pytest.raises(ShardsFailed, match=bad) as e:
        run_precompute(cfg)
    assert set(e.value.summary.shards_failed) == {bad}
    assert not store.is_complete(bad, latents.plan_shards(cfg)[0].config_hash)
    assert set(store.manifest()) == set(expected) - {bad}  # the other shard is committed
    assert proxy.injected == 2

    summary = run_precompute(cfg)  # the resubmission
    assert proxy.injected == 3 and summary.shards_done == 1 and summary.shards_skipped == 1
    manifest = store.manifest()
    lost = 0
    for sid, (ids, n_images, dropped) in expected.items():
        got = [r["id"] for r in store.read_records(sid).to_pylist()]
        lost += len(set(ids) - set(got))
        assert got == ids and manifest[sid]["num_images"] == n_images, sid
        assert manifest[sid]["dropped"] == dropped, sid  # no unreadable_shard, no missing_image
    assert "unreadable_shard" not in summary.report.dropped
    assert lost == 0
    tally(faults_injected=proxy.injected, runs_completed=2, records_lost=lost)


def test_an_images_tar_failing_mid_shard_is_retried_without_duplicate_images(s3, proxy, tally, monkeypatch):
    """read_shard in-process: the images tar refuses a ranged read after the shard has sent an image row;
    the retry sends the remaining images once each and the same records."""
    root = f"s3://{s3['bucket']}/faults-data/tar-errors"
    write_synthetic(f"{root}/data", MMC4_ONLY)
    cfg = _mmc4_cfg(root, proxy, read_retries=2)
    task = latents.plan_shards(cfg)[0]
    ids, n_images, _ = _reference(cfg, cfg.storage)[task.shard_id]  # also builds this process's tar index
    monkeypatch.setattr(latents, "ROWS_PER_BATCH", 1)  # one image per block: rows leave before the fault
    proxy.fail("images/shard_", 1, skip=2)  # the first document's two images pass; the next read fails
    rows, before_fault = [], 0
    for block in read_shard({"shard_id": [task.shard_id], "source": [task.source], "uri": [task.uri]}, cfg):
        rows += [dict(zip(block, vals)) for vals in zip(*block.values())]
        before_fault += proxy.injected == 0
    images = [r["sha256"] for r in rows if r["kind"] == "image"]
    end = json.loads(rows[-1]["payload"])
    assert proxy.injected == 1 and "failed" not in end and before_fault == 2
    assert len(images) == len(set(images)) == n_images == end["num_images"]
    lost = len(set(ids) - {rid for rid, _, _ in end["records"]})
    assert [rid for rid, _, _ in end["records"]] == ids and lost == 0
    tally(faults_injected=1, runs_completed=1, records_lost=lost)


def test_storage_errors_raise_out_of_every_reader_instead_of_counting_the_shard_empty(s3, proxy, tally):
    root = f"s3://{s3['bucket']}/faults-data/readers"
    write_synthetic(f"{root}/data", SyntheticConfig(image_size=48, mmc4_shards=1, docs_per_shard=1, scenes_per_doc=1,
                                                    webdataset_shards=1, parquet_shards=1, pairs_per_shard=2,
                                                    conversations=1, instruct_docs=1))
    st = StorageConfig(endpoint_url=proxy.endpoint)
    cases = [(readers.iter_mmc4, "mmc4/docs_shard_0_v2.jsonl.zip"), (readers.iter_webdataset, "laion/00000.tar"),
             (readers.iter_laion_parquet, "laion_parquet/"), (readers.iter_json_list, "llava/")]
    for fn, rel in cases:
        uri = storage.list_files(f"{root}/data/{rel}", (".zip", ".tar", ".parquet", ".json"), st)[0]
        proxy.fail(uri.split("/data/", 1)[1], 1)
        report = readers.Report()
        with pytest.raises(readers.StorageReadError, match="failed in storage"):
            list(fn(uri, report, st))
        assert report.dropped == {}, fn.__name__
        assert list(fn(uri, report, st)), fn.__name__  # the storage is back: the records are there
    # An images folder that refuses a read: raised, not counted as missing_image.
    proxy.fail("llava/images/", 1)
    with pytest.raises(readers.StorageReadError):
        readers.ImageLocation(f"{root}/data/llava/images", st).get(
            storage.basename(storage.list_files(f"{root}/data/llava/images", (), st)[0]))
    assert proxy.pending() == 0
    tally(faults_injected=proxy.injected, runs_completed=len(cases), records_lost=0)


# ---------------------------------------------------------- hostile records

def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_hostile_records_are_counted_by_reason_and_never_crash_a_read(tmp_path, tally):
    images = tmp_path / "images"
    images.mkdir()
    photo = jpeg(Scene("red", "circle", "center", "large", "blue").render(48))
    (images / "ok.jpg").write_bytes(photo)
    (tmp_path / "outside.jpg").write_bytes(photo)  # a real image the records must never reach
    good = {"text_list": ["A red circle."], "image_info": [{"image_name": "ok.jpg", "matched_text_index": 0,
                                                            "matched_sim": 0.3}]}

    def doc(name):
        return {**good, "image_info": [{**good["image_info"][0], "image_name": name}]}

    deep = "[" * 100_000 + "]" * 100_000
    hostile = {  # reason -> lines of one MMC4 shard
        "deeply_nested_json": ['{"text_list": ' + deep + "}"],
        "unsafe_image_name": [json.dumps(doc("../outside.jpg")), json.dumps(doc(str(tmp_path / "outside.jpg"))),
                              json.dumps(doc("sub/../../outside.jpg"))],
        "malformed_record": [json.dumps({**good, "text_list": "a string"}),
                             json.dumps({**good, "image_info": {"image_name": "ok.jpg"}}),
                             json.dumps(doc(7))],
    }
    lines = [json.dumps(good)] + [line for ls in hostile.values() for line in ls]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/docs_0.jsonl").write_text("\n".join(lines) + "\n")
    # A zip bomb: 64 MB of spaces (64 KB zipped) against a 1 MB limit; the shard is dropped unread.
    (tmp_path / "docs/docs_bomb.jsonl.zip").write_bytes(_zip("docs_bomb.jsonl", b" " * 2**26 + b"\n"))
    filters = FilterConfig(max_inflated_bytes=2**20, min_matched_sim=0.0)
    src = SourceConfig("mmc4", str(tmp_path / "docs"), str(images))

    r = ShardReader(src, str(tmp_path / "docs/docs_0.jsonl"), filters, 32, 32)
    assert len(list(r.images())) == 1
    assert [rid for rid, _, _ in r.records] == ["docs_0.jsonl:0"]
    assert r.report.dropped == {"deeply_nested_json": 1, "unsafe_image_name": 3, "malformed_record": 3,
                                "no_images": 3}  # each unsafe reference leaves its document imageless
    bomb = ShardReader(src, str(tmp_path / "docs/docs_bomb.jsonl.zip"), filters, 32, 32)
    assert list(bomb.images()) == [] and bomb.report.dropped == {"oversized_member": 1}

    # LLaVA: an unsafe image path, wrong types, and a whole file nested too deeply.
    (tmp_path / "llava").mkdir()
    convs = [{"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "A circle."}]
    (tmp_path / "llava/a.json").write_text(json.dumps([
        {"id": "ok", "image": "ok.jpg", "conversations": convs}, {"id": "up", "image": "../outside.jpg",
                                                                  "conversations": convs},
        {"id": "str", "image": "ok.jpg", "conversations": "not a list"}]))
    (tmp_path / "llava/deep.json").write_text("[" + deep + "]")
    lsrc = SourceConfig("llava", str(tmp_path / "llava"), str(images))
    r = ShardReader(lsrc, str(tmp_path / "llava/a.json"), filters, 32, 32)
    list(r.images())
    assert [rid for rid, _, _ in r.records] == ["a.json:ok"]
    assert r.report.dropped == {"unsafe_image_name": 1, "malformed_record": 1}
    r = ShardReader(lsrc, str(tmp_path / "llava/deep.json"), filters, 32, 32)
    assert list(r.images()) == [] and r.report.dropped == {"deeply_nested_json": 1}

    # Webdataset: a sample whose metadata JSON is nested too deeply is kept (the metadata is not used).
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("k0.jpg", photo), ("k0.txt", b"A red circle."), ("k0.json", deep.encode()),
                           ("k1.jpg", jpeg(Scene("blue", "square", "center", "large", "red").render(48))),
                           ("k1.txt", b"A blue square.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (tmp_path / "wds.tar").write_bytes(buf.getvalue())
    r = ShardReader(SourceConfig("webdataset", str(tmp_path)), str(tmp_path / "wds.tar"), filters, 32, 32)
    assert len(list(r.images())) == 2 and r.report.dropped == {}

    # Never read outside: ImageLocation refuses the names itself, whoever calls it.
    for name in ("../outside.jpg", str(tmp_path / "outside.jpg")):
        with pytest.raises(ValueError, match="unsafe image name"):
            readers.ImageLocation(str(images)).get(name)
    assert readers.ImageLocation(str(images), download=True).get("x.jpg", f"file://{tmp_path}/outside.jpg") is None
    tally(bad_inputs=7 + 1 + 3 + 1 + 1 + 2 + 1)


# ----------------------------------------------------------- local writers

def test_two_writers_of_one_target_never_remove_each_others_temp_files(tmp_path, tally):
    target = tmp_path / "manifest.json"
    # Writer A has created its temp file and is still writing when writer B finishes.
    fd, a_tmp = tempfile.mkstemp(dir=tmp_path, prefix=f".{target.name}.", suffix=".tmp")
    os.write(fd, b'{"writer": "A"}')
    storage.write_bytes(str(target), b'{"writer": "B"}')
    assert os.path.exists(a_tmp), "writer B removed writer A's temp file"
    os.fsync(fd)
    os.close(fd)
    os.replace(a_tmp, target)  # A's commit still works
    assert target.read_bytes() == b'{"writer": "A"}'

    # Two real writers racing: every write succeeds, the target is always one whole payload.
    payloads = [json.dumps({"writer": w, "pad": "x" * 50_000}).encode() for w in range(2)]
    errors, seen = [], set()

    def write(w):
        try:
            for _ in range(100):
                storage.write_bytes(str(target), payloads[w])
                seen.add(target.read_bytes())
        except Exception as e:  # noqa: BLE001 - the test reports what went wrong
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and seen <= set(payloads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    tally(faults_injected=1, runs_completed=2, records_lost=len(errors))


# ----------------------------------------------------------- sideways photos

def test_images_are_turned_upright_by_their_exif_orientation(tally):
    img = Image.new("RGB", (64, 32), (250, 0, 0))
    img.paste((0, 0, 250), (32, 0, 64, 32))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned 90 degrees; viewers rotate it clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6

    served = open_image(data, "image")
    decoded, reason = decode_image(data, FilterConfig(max_aspect_ratio=3.0))
    for up in (served, decoded):
        assert up.size == (32, 64)  # portrait, as shown to a person
        top, bottom = up.getpixel((16, 8)), up.getpixel((16, 56))
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the stored left (red) is now on top
    assert reason is None
    tally(bad_inputs=1)


# ------------------------------------------------------- images naming rule

def test_bad_images_patterns_are_refused_with_the_reason_before_anything_runs(tmp_path, tally):
    cases = {"{shard_id}.tar": "must use {shard} and/or {n}", "images.tar": "must use {shard} and/or {n}",
             "{0}.tar": "must use {shard} and/or {n}", "../{shard}.tar": "inside the images location",
             "/abs/{n}.tar": "inside the images location", "{shard}.zip": "must name a .tar",
             "{shard.tar": "does not parse"}
    for pattern, reason in cases.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            SourceConfig("mmc4", "docs", "images", images_pattern=pattern)
    with pytest.raises(ValueError, match="needs the source's images location"):
        SourceConfig("mmc4", "docs", None, images_pattern="{shard}.tar")

    # {n} on a shard whose name has no shard_<N>: the plan fails naming it; nothing is written.
    (tmp_path / "data/docs").mkdir(parents=True)
    (tmp_path / "data/docs/crawl_a.jsonl").write_text("{}\n")
    cfg = PrecomputeConfig(flavor="debug", data_root=str(tmp_path / "data"), output=str(tmp_path / "store"),
                           sources={"mmc4": SourceConfig("mmc4", "docs", "images", "shard_{n}.tar")},
                           synthetic=dataclasses.replace(MMC4_ONLY, enabled=False))
    with pytest.raises(ValueError, match=r"shard .*crawl_a\.jsonl has no 'shard_<number>'.*\{shard\}"):
        run_precompute(cfg)
    assert not (tmp_path / "store").exists()
    fixed = dataclasses.replace(cfg, sources={"mmc4": SourceConfig("mmc4", "docs", "images", "{shard}.tar")})
    assert [SourceConfig.images_tar(fixed.sources["mmc4"], t.uri) for t in latents.plan_shards(fixed)] == [
        "crawl_a.tar"]
    tally(bad_inputs=len(cases) + 2)
