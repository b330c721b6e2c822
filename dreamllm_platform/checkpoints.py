"""Model references to models, and DreamLLM checkpoints to and from storage URIs.

Owns: turning a reference (a local path, `file://`, `s3://`, or a registry
`models:/NAME@ALIAS`) into a local checkpoint directory and a loaded
`DreamLLM`, and exporting a model to a URI. Training (a stage's start and
end), evaluation, the registry and serving all go through here; the format
itself is `dreamllm.checkpoint`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from dreamllm.checkpoint import load_checkpoint, save_checkpoint

from . import storage
from .tracking import TrackingConfig, resolve_model_ref

CACHE_DIR = Path(tempfile.gettempdir()) / "dreamllm-checkpoints"


def local_checkpoint(ref: str, tracking: TrackingConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local directory with the checkpoint `ref` names (remote ones are downloaded once per node)."""
    uri = resolve_model_ref(ref, tracking)
    return storage.download_dir(uri, cache_dir or CACHE_DIR)


def load_model(ref: str, device="cpu", dtype=None, tracking: TrackingConfig | None = None):
    """The `DreamLLM` that `ref` names, in eval mode."""
    return load_checkpoint(local_checkpoint(ref, tracking), device=device, dtype=dtype)


def export_checkpoint(model, uri: str, metadata: dict | None = None) -> str:
    """Write `model` as a DreamLLM checkpoint at `uri` (local dir or s3://); returns the URI."""
    if not storage.is_remote(uri):
        save_checkpoint(model, Path(uri.removeprefix("file://")), metadata)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tmp, metadata)
        fs, path = storage.fsspec_fs(uri)
        fs.put(f"{tmp}/", path, recursive=True)
    return uri
