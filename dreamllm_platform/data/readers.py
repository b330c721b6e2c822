"""Readers of the formats users have, yielding raw records and counting what cannot be read.

Owns: parsing one shard of each format into (key, record) pairs, and finding
images by name in an images location (a folder, or tar shards of files named
by `image_name`, as MMC4 images are usually kept), with optional download from
`raw_url`. Bad input never raises out of a reader: a malformed or too deeply
nested JSON line is counted and skipped; a shard whose bytes do not parse (a
damaged zip, a zip member inflating past `filters.max_inflated_bytes`) is
counted and yields nothing; a truncated tar keeps the samples before the cut.

Storage failing is not bad input: an error raised by the storage while opening
or reading a shard, an images tar or an image file (a refused or timed-out
request, a permission error, an I/O error) raises `StorageReadError`, so the
shard's task retries and a shard that never reads stays uncommitted for the
next run instead of being committed empty. The readers tell the two apart by
where the error comes from (the storage call, or parsing bytes already read),
not by its type: `gzip`, PIL and pyarrow raise OSError for bad bytes too.

Formats:
  mmc4          `docs_*_shard_{N}_v2.jsonl.zip` (zip holding one .jsonl) or `.jsonl`; one document a line
  webdataset    img2dataset tars: KEY.jpg (or .png/.webp), KEY.txt caption, KEY.json metadata
  laion_parquet parquet with image bytes (`jpg`/`image`/`png`/`webp`, or a {bytes, path} struct) and `caption`
  llava         JSON list of {id, image, conversations: [{from: human|gpt, value}]}
  instruct_doc  JSON list of {id, instruction, document: an MMC4 document}
"""
from __future__ import annotations

import errno
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
from .config import safe_relative
from .filters import Report

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


DEFAULT_MAX_INFLATED_BYTES = 2**30


class StorageReadError(Exception):
    """The storage failed while `uri` was opened or read (the data may be fine): retry the shard."""

    def __init__(self, uri: str, cause: BaseException):
        super().__init__(f"reading {uri} failed in storage: {type(cause).__name__}: {cause}")
        self.uri = uri


class _StorageFile:
    """A file object whose read/seek errors raise StorageReadError: tarfile and pyarrow pass
    Python exceptions through unchanged, so their own parse errors stay distinguishable."""

    def __init__(self, f, uri: str):
        self.f, self.uri = f, uri

    def _call(self, name: str, *args):
        try:
            return getattr(self.f, name)(*args)
        except Exception as e:
            raise StorageReadError(self.uri, e) from e

    def read(self, *args):
        return self._call("read", *args)

    def seek(self, *args):
        return self._call("seek", *args)

    def tell(self):
        return self._call("tell")

    def readable(self):
        return True

    def seekable(self):
        return True

    @property
    def closed(self):
        return self.f.closed

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open(uri: str, st: StorageConfig | None) -> _StorageFile:
    fs, path = storage.fsspec_fs(uri, st)
    try:
        return _StorageFile(fs.open(path, "rb"), uri)
    except Exception as e:  # missing (listed a moment ago), refused, timed out: storage, not data
        raise StorageReadError(uri, e) from e


def _read_shard_bytes(uri: str, st: StorageConfig | None) -> bytes:
    try:
        return storage.read_bytes(uri, st)
    except Exception as e:
        raise StorageReadError(uri, e) from e


safe_image_name = safe_relative
"""A relative name that stays inside the images location: not absolute, no `..`, no NUL, no scheme."""


def _loads(data: bytes | str, key: str, report: Report):
    """Parsed JSON, or None with the drop counted (malformed, or nested past the recursion limit)."""
    try:
        return json.loads(data)
    except RecursionError:  # a hostile record of thousands of nested brackets
        report.drop("deeply_nested_json", key)
    except ValueError:
        report.drop("malformed_json", key)
    return None


def _json_lines(data: bytes, uri: str, report: Report) -> Iterator[tuple[str, dict]]:
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        key = f"{storage.basename(uri)}:{i}"
        rec = _loads(line, key, report)
        if rec is None:
            continue
        if not isinstance(rec, dict):
            report.drop("malformed_record", key)
            continue
        yield key, rec


def _unzip_one(data: bytes, uri: str, report: Report, max_bytes: int) -> bytes | None:
    """The one .jsonl member of a zip, or None with the drop counted (damaged zip, or a member that
    inflates past `max_bytes`: a decompression bomb is never inflated)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = [i for i in z.infolist() if i.filename.endswith(".jsonl")]
            if len(infos) != 1:
                raise zipfile.BadZipFile(f"expected one .jsonl inside, found {[i.filename for i in infos]}")
            # The declared size bounds what zipfile returns (it stops there and checks the CRC), and
            # the capped read bounds it again if the header lies.
            if infos[0].file_size > max_bytes:
                report.drop("oversized_member", uri)
                return None
            with z.open(infos[0]) as m:
                out = m.read(max_bytes + 1)  # reading to the end checks the CRC: a damaged member raises
            if len(out) > max_bytes:
                report.drop("oversized_member", uri)
                return None
            return out
    except Exception:  # BadZipFile, zlib.error, EOFError, NotImplementedError (compression)...: bad bytes
        report.drop("unreadable_shard", uri)
        return None


def iter_mmc4(uri: str, report: Report, st: StorageConfig | None = None,
              max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> Iterator[tuple[str, dict]]:
    """Documents of an MMC4 shard (.jsonl.zip or .jsonl)."""
    data = _read_shard_bytes(uri, st)
    if uri.endswith(".zip"):
        data = _unzip_one(data, uri, report, max_inflated_bytes)
        if data is None:
            return
    yield from _json_lines(data, uri, report)


def iter_json_list(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Records of a JSON file holding a list (LLaVA and instruction-document JSON)."""
    data = _read_shard_bytes(uri, st)
    try:
        records = json.loads(data)
        if not isinstance(records, list):
            raise ValueError("not a list")
    except RecursionError:  # one record nested too deeply: the file does not parse, its records are lost
        report.drop("deeply_nested_json", uri)
        return
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
    f = _open(uri, st)
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
    except StorageReadError:
        raise
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
    except (ValueError, RecursionError):  # the metadata is informational: the sample is kept without it
        meta = {}
    return {"caption": caption, "image": image, "meta": meta}


def iter_laion_parquet(uri: str, report: Report, st: StorageConfig | None = None) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet shard with image bytes + caption: {'caption', 'image', 'meta'}."""
    f = _open(uri, st)  # ranged reads through fsspec; pyarrow passes the wrapper's errors through
    try:
        pf = pq.ParquetFile(f)
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
    except StorageReadError:
        raise
    except Exception:
        report.drop("unreadable_shard", uri)
    finally:
        f.close()


class ImageLocation:
    """Finds image bytes by file name in a folder, or in tar shards of files named by image_name.

    With `tar` (one tar's path relative to `uri`, a shard's by its source's `images_pattern`) only
    that tar is indexed, and nothing else under `uri` is listed or opened; when it is not there, the
    names are looked up as loose files under `uri`. Without it, every tar under `uri` is indexed
    (the whole images corpus, once per process), or, when there are none, names are loose files.
    The tar index (name -> tar, offset, size) is built from the tar headers on the first `get`;
    images are then read with ranged reads, so s3:// tars are never downloaded whole. Names must
    pass `safe_image_name`: nothing outside the location is ever read. Storage errors raise
    `StorageReadError`; a name that is simply not there gives None (counted as missing_image).
    """

    def __init__(self, uri: str, st: StorageConfig | None = None, download: bool = False,
                 timeout_s: float = 10.0, retries: int = 2, tar: str | None = None):
        self.uri, self.st, self.tar = uri, st, tar
        self.download, self.timeout_s, self.retries = download, timeout_s, retries
        self._index: dict[str, tuple[str, int, int]] | None = None
        self._tar_mode = False

    @property
    def index(self) -> dict[str, tuple[str, int, int]]:
        """image name -> (tar URI, data offset, size); empty when the location holds loose files."""
        if self._index is None:  # stays None when indexing raised: the next get tries again
            if self.tar is not None:
                tars, named = (storage.join(self.uri, self.tar),), True
            else:
                try:
                    tars, named = tuple(storage.list_files(self.uri, (".tar",), self.st)), False
                except Exception as e:
                    raise StorageReadError(self.uri, e) from e
            self._index, found = _tar_index(self.uri, tars, self.st, named) if tars else ({}, 0)
            self._tar_mode = found > 0
        return self._index

    def get(self, name: str, raw_url: str | None = None) -> bytes | None:
        """The image's bytes, or None when it is nowhere to be found."""
        if not safe_image_name(name):
            raise ValueError(f"unsafe image name {name!r}: it must be relative, without '..'")
        data = None
        index = self.index
        if self._tar_mode:
            hit = index.get(name)
            if hit is not None:
                tar_uri, offset, size = hit
                fs, path = storage.fsspec_fs(tar_uri, self.st)
                try:
                    data = fs.cat_file(path, start=offset, end=offset + size)
                except Exception as e:
                    raise StorageReadError(tar_uri, e) from e
        else:
            uri = storage.join(self.uri, name)
            try:
                data = storage.read_bytes(uri, self.st)
            except OSError as e:
                if not (isinstance(e, FileNotFoundError) or e.errno in _NOT_THERE):
                    raise StorageReadError(uri, e) from e
            except Exception as e:
                raise StorageReadError(uri, e) from e
        if data is None and self.download and raw_url:
            data = _download(raw_url, self.timeout_s, self.retries)
        return data


# Errors that say the name names no image file (the record's fault), not that the storage failed.
_NOT_THERE = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP}


@functools.lru_cache(maxsize=8)
def _tar_index(uri: str, tars: tuple[str, ...], st: StorageConfig | None,
               named: bool = False) -> tuple[dict[str, tuple[str, int, int]], int]:
    """(name -> (tar, offset, size), how many of `tars` exist). A `named` tar (a shard's, by its
    source's images_pattern) may be absent; a listed one vanishing is a storage error. Not cached
    when it raises: an images tar the storage failed to read is indexed on the retry."""
    index: dict[str, tuple[str, int, int]] = {}
    found = 0
    for tar_uri in tars:
        fs, path = storage.fsspec_fs(tar_uri, st)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            if named:
                continue
            raise StorageReadError(tar_uri, FileNotFoundError(tar_uri)) from None
        except Exception as e:
            raise StorageReadError(tar_uri, e) from e
        found += 1
        try:
            with _open(tar_uri, st) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:  # seekable mode: reads headers, skips data
                    if m.isfile() and m.offset_data + m.size <= size:
                        index.setdefault(m.name.rsplit("/", 1)[-1], (tar_uri, m.offset_data, m.size))
        except StorageReadError:
            raise
        except Exception:
            # A damaged images tar: its images count as missing_image where referenced.
            continue
    return index, found


def _download(url: str, timeout_s: float, retries: int) -> bytes | None:
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return None  # urllib also opens file:// and ftp://: a record must not make us read local files
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 10.0))  # back off before each retry
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return r.read()
        except Exception:  # HTTP errors, timeouts, refused connections: the image counts as missing
            continue
    return None
