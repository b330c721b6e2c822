"""Readers of the formats users have, yielding raw records and counting what cannot be read.

Owns: parsing one shard of each format into (key, record) pairs, and finding
images by name in an images location (a folder, or tar shards of files named
by `image_name`, as MMC4 images are usually kept), with optional download from
`raw_url`. Bad input never raises out of a reader: a malformed JSON line is
counted and skipped; an unreadable shard is counted and yields nothing; a
truncated tar keeps the samples before the cut.

Formats:
  mmc4          `docs_*_shard_{N}_v2.jsonl.zip` (zip holding one .jsonl) or `.jsonl`; one document a line
  webdataset    img2dataset tars: KEY.jpg (or .png/.webp), KEY.txt caption, KEY.json metadata
  laion_parquet parquet with image bytes (`jpg`/`image`/`png`/`webp`, or a {bytes, path} struct) and `caption`
  llava         JSON list of {id, image, conversations: [{from: human|gpt, value}]}
  instruct_doc  JSON list of {id, instruction, document: an MMC4 document}
"""
from __future__ import annotations

import functools
import io
import json
import tarfile
import time
import urllib.request
import zipfile
from typing import Iterator

import pyarrow.parquet as pq

from .. import storage
from ..storage import StorageConfig
from .filters import Report

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _read_shard_bytes(uri: str, report: Report, st: StorageConfig | None) -> bytes | None:
    try:
        return storage.read_bytes(uri, st)
    except Exception:  # missing, permission, network: the shard is unreadable, the job goes on
        report.drop("unreadable_shard", uri)
        return None


def _json_lines(data: bytes, uri: str, report: Report) -> Iterator[tuple[str, dict]]:
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        key = f"{storage.basename(uri)}:{i}"
        try:
            rec = json.loads(line)
        except ValueError:
            report.drop("malformed_json", key)
            continue
        if not isinstance(rec, dict):
            report.drop("malformed_record", key)
            continue
        yield key, rec


def iter_mmc4(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Documents of an MMC4 shard (.jsonl.zip or .jsonl)."""
    data = _read_shard_bytes(uri, report, st)
    if data is None:
        return
    if uri.endswith(".zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = [n for n in z.namelist() if n.endswith(".jsonl")]
                if len(names) != 1:
                    raise zipfile.BadZipFile(f"expected one .jsonl inside, found {names}")
                data = z.read(names[0])  # checks the CRC: a damaged member raises
        except Exception:
            report.drop("unreadable_shard", uri)
            return
    yield from _json_lines(data, uri, report)


def iter_json_list(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Records of a JSON file holding a list (LLaVA and instruction-document JSON)."""
    data = _read_shard_bytes(uri, report, st)
    if data is None:
        return
    try:
        records = json.loads(data)
        if not isinstance(records, list):
            raise ValueError("not a list")
    except ValueError:
        report.drop("unreadable_shard", uri)
        return
    for i, rec in enumerate(records):
        key = f"{storage.basename(uri)}:{rec.get('id', i) if isinstance(rec, dict) else i}"
        if not isinstance(rec, dict):
            report.drop("malformed_record", key)
            continue
        yield key, rec


def iter_webdataset(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Samples of an img2dataset tar: {'caption': str | None, 'image': bytes | None, 'meta': dict}.

    Members of one sample are consecutive (webdataset's rule); a sample is
    complete when the next key starts or the tar ends cleanly, so a tar cut
    short loses only the sample it was cut in.
    """
    fs, path = storage.fsspec_fs(uri, st)
    try:
        f = fs.open(path, "rb")
    except Exception:
        report.drop("unreadable_shard", uri)
        return
    current_key, sample = None, {}
    try:
        with f, tarfile.open(fileobj=f, mode="r|") as tar:  # streaming: never seeks back
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if key != current_key:  # the previous sample is complete
                    if current_key is not None:
                        yield current_key, _wds_sample(sample)
                    current_key, sample = key, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError("member cut short")
                sample[ext.lower()] = data
    except Exception:  # tarfile raises ReadError/EOFError/OSError on truncated or garbage input
        report.drop("truncated_shard" if current_key is not None else "unreadable_shard", uri)
        return
    if current_key is not None:
        yield current_key, _wds_sample(sample)


def _wds_sample(sample: dict[str, bytes]) -> dict:
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    return {"caption": caption, "image": image, "meta": meta}


def iter_laion_parquet(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet shard with image bytes + caption: {'caption', 'image', 'meta'}."""
    fs, path = storage.arrow_fs(uri, st)
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
        names = pf.schema_arrow.names
        img_col = next((c for c in ("jpg", "image", "png", "webp", "jpeg") if c in names), None)
        cap_col = next((c for c in ("caption", "txt", "text") if c in names), None)
        if img_col is None or cap_col is None:
            raise ValueError(f"needs an image bytes column and a caption column, has {names}")
        stem = storage.basename(uri).rsplit(".", 1)[0]
        i = 0
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                key = str(row.get("key") or f"{stem}:{i}")
                i += 1
                image = row[img_col]
                if isinstance(image, dict):  # HF datasets' Image feature: {bytes, path}
                    image = image.get("bytes")
                yield key, {"caption": row[cap_col], "image": image, "meta": {}}
    except Exception:
        report.drop("unreadable_shard", uri)


class ImageLocation:
    """Finds image bytes by file name in a folder, or in tar shards of files named by image_name.

    The tar index (name -> tar, offset, size) is built once per process from
    the tar headers; images are then read with ranged reads, so s3:// tars are
    never downloaded whole.
    """

    def __init__(self, uri: str, st: StorageConfig | None = None, download: bool = False,
                 timeout_s: float = 10.0, retries: int = 2):
        self.uri, self.st = uri, st
        self.download, self.timeout_s, self.retries = download, timeout_s, retries
        self.tars = storage.list_files(uri, (".tar",), st)
        self.index = _tar_index(uri, tuple(self.tars), st) if self.tars else {}

    def get(self, name: str, raw_url: str | None = None) -> bytes | None:
        """The image's bytes, or None when it is nowhere to be found."""
        data = None
        if self.tars:
            hit = self.index.get(name)
            if hit is not None:
                tar_uri, offset, size = hit
                fs, path = storage.fsspec_fs(tar_uri, self.st)
                data = fs.cat_file(path, start=offset, end=offset + size)
        else:
            try:
                data = storage.read_bytes(storage.join(self.uri, name), self.st)
            except (FileNotFoundError, OSError):
                data = None
        if data is None and self.download and raw_url:
            data = _download(raw_url, self.timeout_s, self.retries)
        return data


@functools.lru_cache(maxsize=8)
def _tar_index(uri: str, tars: tuple[str, ...], st: StorageConfig | None) -> dict[str, tuple[str, int, int]]:
    index: dict[str, tuple[str, int, int]] = {}
    for tar_uri in tars:
        fs, path = storage.fsspec_fs(tar_uri, st)
        try:
            size = fs.size(path)
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:  # seekable mode: reads headers, skips data
                    if m.isfile() and m.offset_data + m.size <= size:
                        index.setdefault(m.name.rsplit("/", 1)[-1], (tar_uri, m.offset_data, m.size))
        except Exception:
            # A damaged images tar: its images count as missing_image where referenced.
            continue
    return index


def _download(url: str, timeout_s: float, retries: int) -> bytes | None:
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 10.0))  # back off before each retry
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return r.read()
        except Exception:  # HTTP errors, timeouts, refused connections: the image counts as missing
            continue
    return None
