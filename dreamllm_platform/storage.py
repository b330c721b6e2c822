"""Storage URIs: the one place that turns `s3://`, `file://` and local paths into filesystems.

Owns: telling remote from local URIs and turning local ones (paths and
`file://`) into local paths (`local_path`), parsing a URI into (filesystem, path) for fsspec (s3fs / local), for
pyarrow and Ray Data (`filesystem=` argument), small whole-object reads and
writes (atomic and durable on local disks, per writer), listing, uploading a local directory, and
downloading a remote directory to a local cache (model loading resolves
`s3://` checkpoints and decoders through it), and a directory's content:
its digest, a copy that verifies it, and a cache key from its listing.
Nothing else in the project opens object storage by hand.

S3 settings come from the standard AWS environment (`AWS_ENDPOINT_URL` or
`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`) unless a `StorageConfig` overrides them. Filesystem objects are
never created at import time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage connection settings; empty fields fall back to the AWS environment variables."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:5000 for MinIO/moto (default: AWS_ENDPOINT_URL[_S3] or AWS)."""
    region: str | None = None
    """S3 region (default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1)."""
    anonymous: bool = False
    """Unsigned requests (public buckets)."""


_DEFAULT = StorageConfig()
CHECKPOINT_CACHE_DIR = Path(tempfile.gettempdir()) / "dreamllm-checkpoints"
"""Where remote DreamLLM checkpoints are downloaded on a node (`checkpoints` and the pyfunc model share it)."""


def is_remote(uri: str) -> bool:
    """True for object-storage URIs (s3://), False for local paths and file://."""
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def is_local(uri: str) -> bool:
    """True for local paths and file:// URIs (no scheme or `file`)."""
    return urlparse(str(uri)).scheme in ("", "file")


def is_absolute(uri: str) -> bool:
    """True for URIs that name the same place from any working directory: s3://, file:// and absolute paths."""
    return is_remote(uri) or str(uri).startswith("file://") or Path(str(uri)).is_absolute()


def local_path(uri: str) -> Path:
    """The absolute local path that a local path (relative to the cwd, `~` expanded) or a file:// URI names.

    The one place that takes `file://` apart: everything else passes URIs through here or through the
    filesystem helpers below.
    """
    uri = str(uri)
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    return Path(uri).expanduser().resolve()


def _local_path(uri: str) -> str:
    return str(local_path(uri))


def _s3_settings(cfg: StorageConfig) -> tuple[str | None, str]:
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def _check_scheme(uri: str) -> None:
    scheme = urlparse(str(uri)).scheme
    if scheme not in ("", "file", "s3", "s3a") and not (len(scheme) == 1 and os.name == "nt"):
        raise ValueError(f"unsupported storage URI {uri!r}: expected s3://bucket/prefix, file:///path or a local path")


def fsspec_fs(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for `uri`; the path has no scheme."""
    _check_scheme(uri)
    cfg = cfg or _DEFAULT
    if not is_remote(uri):
        return fsspec.filesystem("file"), _local_path(uri)
    import s3fs  # lazy: local runs never need it

    endpoint, region = _s3_settings(cfg)
    # Listing caches are off: several processes write the same prefix (tasks,
    # the driver, re-runs) and a stale listing would hide committed shards.
    fs = s3fs.S3FileSystem(anon=cfg.anonymous, use_listings_cache=False,
                           client_kwargs={"endpoint_url": endpoint, "region_name": region})
    p = urlparse(str(uri))
    return fs, f"{p.netloc}{p.path}".rstrip("/")


def arrow_fs(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for `uri`: pass both to pyarrow or Ray Data's `filesystem=`."""
    _check_scheme(uri)
    cfg = cfg or _DEFAULT
    if not is_remote(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    endpoint, region = _s3_settings(cfg)
    kwargs: dict = {"region": region, "anonymous": cfg.anonymous}
    if endpoint:
        e = urlparse(endpoint)
        kwargs.update(endpoint_override=e.netloc or e.path, scheme=e.scheme or "https")
    p = urlparse(str(uri))
    return pafs.S3FileSystem(**kwargs), f"{p.netloc}{p.path}".rstrip("/")


def absolute(uri: str) -> str:
    """`uri` usable from any process of the cluster: s3:// as is, local paths (and file://) made absolute."""
    return uri if is_remote(uri) else _local_path(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (keeps the scheme)."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def _to_uri(path: str, like: str) -> str:
    """Back from an fsspec path to a URI of the same kind as `like` (s3:// or local)."""
    return f"s3://{path}" if is_remote(like) else path


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = fsspec_fs(uri, cfg)
    return fs.exists(path)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    """The whole object; raises FileNotFoundError naming the URI when it is missing."""
    fs, path = fsspec_fs(uri, cfg)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {uri}") from None


STALE_TEMP_S = 3600.0
"""A local write's temp file older than this was left by a killed writer and may be removed."""


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole object. Local files: a temp file unique to this writer, fsync, rename, fsync of
    the folder, so that neither a killed process nor a crash leaves a half-written file and several
    writers of one target each replace it whole; an S3 PUT is atomic already."""
    fs, path = fsspec_fs(uri, cfg)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    # Temp files of writers killed mid-write. Only old ones: a young one may be another writer's,
    # still writing, whose rename would fail if it were removed.
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_S:
                stale.unlink(missing_ok=True)
        except FileNotFoundError:  # renamed or removed meanwhile
            pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(uri: str, cfg: StorageConfig | None = None) -> None:
    """Delete a file or a directory tree; missing is fine."""
    fs, path = fsspec_fs(uri, cfg)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(uri: str, suffixes: tuple[str, ...] = (), cfg: StorageConfig | None = None) -> list[str]:
    """Sorted URIs of the files under a directory (recursive) whose names end with one of `suffixes`.

    A `uri` that is itself a file is returned alone; a missing directory gives [].
    """
    fs, path = fsspec_fs(uri, cfg)
    if fs.isfile(path):
        return [uri]
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if not suffixes or p.endswith(suffixes))
    return [_to_uri(p, uri) for p in found]


def upload_dir(local: str | Path, uri: str, cfg: StorageConfig | None = None) -> str:
    """Copy the tree under local directory `local` to `uri` (merged into what is there); returns `uri`."""
    fs, path = fsspec_fs(uri, cfg)
    if is_remote(uri):
        fs.put(f"{local}/", path, recursive=True)
    else:
        shutil.copytree(local, path, dirs_exist_ok=True)
    return uri


_CHUNK = 8 << 20


def _content_files(uri: str, cfg: StorageConfig | None) -> tuple[fsspec.AbstractFileSystem, str, list[dict]]:
    """(fs, path, [{"path": relative, "size", **listing}]) of a directory's content files, sorted by path.
    Hidden names (temp files of writers, `.complete` and other markers) are not content."""
    fs, path = fsspec_fs(uri, cfg)
    if not fs.isdir(path):
        raise FileNotFoundError(f"not a directory: {uri}")
    files = []
    for p, info in sorted(fs.find(path, detail=True).items()):
        rel = p[len(path):].strip("/")
        if info.get("type", "file") == "file" and not any(part.startswith(".") for part in rel.split("/")):
            files.append({**info, "path": rel, "size": int(info.get("size") or 0)})
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    return fs, path, files


def _digest(manifest: list[dict]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _stream(fs, path: str, sink=None) -> str:
    """sha256 of one file's bytes, read in chunks (and written to `sink` when given)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if sink is not None:
                sink.write(chunk)
    return h.hexdigest()


def dir_digest(uri: str, cfg: StorageConfig | None = None) -> tuple[str, list[dict]]:
    """(digest, manifest) of a directory's content: the manifest lists every content file by relative
    path (sorted) with its size and sha256; the digest is the sha256 of that manifest, so it names the
    bytes and the layout, whatever the directory is called."""
    fs, path, files = _content_files(uri, cfg)
    manifest = [{"path": f["path"], "size": f["size"], "sha256": _stream(fs, f"{path}/{f['path']}")} for f in files]
    return _digest(manifest), manifest


def copy_dir(src: str, dst: str, cfg: StorageConfig | None = None) -> tuple[str, list[dict]]:
    """Copy the content files of directory `src` to `dst` (any two kinds of URI), streaming; returns
    (digest, manifest) of the bytes actually copied (as `dir_digest`), so a caller can tell whether
    `src` changed while it was read."""
    fs, path, files = _content_files(src, cfg)
    out_fs, out = fsspec_fs(dst, cfg)
    manifest = []
    for f in files:
        target = f"{out}/{f['path']}"
        if not is_remote(dst):
            out_fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with out_fs.open(target, "wb") as sink:
            manifest.append({"path": f["path"], "size": f["size"], "sha256": _stream(fs, f"{path}/{f['path']}", sink)})
    return _digest(manifest), manifest


def listing_key(uri: str, cfg: StorageConfig | None = None) -> str:
    """A cache key for the content of remote directory `uri` from one listing, without reading it:
    every content file's path, size and ETag (S3's hash of the object's bytes). Rewritten objects
    get another key, so a cache keyed on it never serves old bytes for a reused path."""
    _, _, files = _content_files(uri, cfg)
    listing = [[f["path"], f["size"], str(f.get("ETag") or f.get("etag") or f.get("LastModified", ""))]
               for f in files]
    return "etag-" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


def download_dir(uri: str, cache_dir: str | Path, cfg: StorageConfig | None = None, key: str | None = None) -> Path:
    """A local directory holding the tree at `uri`: local URIs are returned as is; remote ones are
    copied under `cache_dir/<key>` (default key: `<bucket>/<prefix>`) once (a `.complete` marker makes
    re-use safe after a crash mid-download). Pass a content key (`listing_key`, a registered version's
    digest) where the objects at `uri` may be rewritten."""
    if not is_remote(uri):
        local = Path(_local_path(uri))
        if not local.is_dir():
            raise FileNotFoundError(f"not a directory: {uri}")
        return local
    fs, path = fsspec_fs(uri, cfg)
    target = Path(cache_dir) / (key or path)
    if (target / ".complete").exists():
        return target
    if not fs.isdir(path):
        raise FileNotFoundError(f"not a directory: {uri}")
    # A private temp dir per download and one rename as the commit point: concurrent
    # downloads (several replicas on a node) never see or clobber a half-written tree.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        for remote in fs.find(path):
            local = tmp / Path(remote).relative_to(path)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        (tmp / ".complete").touch()
        if target.exists() and not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)  # left by a crash of the old layout
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").exists():  # not someone else's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
