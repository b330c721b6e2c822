"""Model references to models, and DreamLLM checkpoints to and from storage URIs.

Owns: turning a reference (a local path, `file://`, `s3://`, or a registry
`models:/NAME@ALIAS`) into a local checkpoint directory and a loaded
`DreamLLM`, exporting a model to a URI, and the model config of a fresh
flavor whose image decoder was trained by jobs/pretrain_towers.py
(`flavor_config`: the decoder directory, local or remote, becomes a local
directory the diffusers loaders read). Training (a stage's start and end),
the latent precompute, evaluation, the registry and serving all go through
here; the checkpoint format itself is `dreamllm.checkpoint`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dreamllm.checkpoint import load_checkpoint, save_checkpoint
from dreamllm.config import DreamLLMConfig, get_flavor

from . import storage
from .model_registry import resolve_checkpoint
from .storage import StorageConfig
from .tracking import TrackingConfig

CACHE_DIR = storage.CHECKPOINT_CACHE_DIR
DECODER_CACHE_DIR = Path(tempfile.gettempdir()) / "dreamllm-decoders"
DECODER_FILE = "decoder.json"
"""Written last into a decoder directory by jobs/pretrain_towers.py: without it the directory is unfinished."""


def cache_key(ref: str, tracking: TrackingConfig | None = None) -> tuple[str, str | None]:
    """(checkpoint URI, key of its download cache) for `ref`. The key names the content, never the path
    alone: `sha256-<digest>` of a registered version, else (remote URIs) the objects' ETags and sizes
    (`storage.listing_key`), so weights rewritten at a reused path are downloaded again. Local
    checkpoints are read in place (key None)."""
    uri, digest = resolve_checkpoint(ref, tracking)
    if digest:
        return uri, f"sha256-{digest}"
    return uri, storage.listing_key(uri) if storage.is_remote(uri) else None


def local_checkpoint(ref: str, tracking: TrackingConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local directory with the checkpoint `ref` names (remote ones are downloaded once per node and content)."""
    uri, key = cache_key(ref, tracking)
    return storage.download_dir(uri, cache_dir or CACHE_DIR, key=key)


def load_model(ref: str, device="cpu", dtype=None, tracking: TrackingConfig | None = None):
    """The `DreamLLM` that `ref` names, in eval mode."""
    return load_checkpoint(local_checkpoint(ref, tracking), device=device, dtype=dtype)


def export_checkpoint(model, uri: str, metadata: dict | None = None) -> str:
    """Write `model` as a DreamLLM checkpoint at `uri` (local dir or s3://); returns the URI."""
    if not storage.is_remote(uri):
        save_checkpoint(model, storage.local_path(uri), metadata)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tmp, metadata)
        storage.upload_dir(tmp, uri)
    return uri


def read_decoder_info(uri: str, st: StorageConfig | None = None) -> dict | None:
    """The `decoder.json` of the decoder directory at `uri` (export id, flavor, config hash, metrics, MLflow
    run), or None when it has none: not a decoder, or its training has not finished."""
    try:
        return json.loads(storage.read_bytes(storage.join(uri, DECODER_FILE), st))
    except FileNotFoundError:
        return None


def flavor_config(flavor: str, decoder: str | None = None, st: StorageConfig | None = None,
                  cache_dir: str | Path | None = None) -> DreamLLMConfig:
    """The model config of a fresh `flavor`, with the towers trained by jobs/pretrain_towers.py at `decoder`
    (local or s3://) in place of the flavor's own: the image decoder, and the CLIP vision tower and LLM it
    trained too (its `vision/` and `llm/`, when there are); None keeps the flavor's.

    `diffusion.name_or_path` becomes a local directory: remote decoders are downloaded once per node
    and export (the id in decoder.json), so a decoder retrained at the same URI is fetched again.
    """
    cfg = get_flavor(flavor)
    if not decoder:
        return cfg
    info = read_decoder_info(decoder, st)
    if info is None:
        raise ValueError(f"{decoder} is not a finished decoder: {DECODER_FILE} is missing "
                         f"(run jobs/pretrain_towers.py with output={decoder} first)")
    if info.get("flavor") != flavor:
        raise ValueError(f"the decoder at {decoder} was trained for flavor {info.get('flavor')!r}, not {flavor!r}")
    cache = Path(cache_dir or DECODER_CACHE_DIR) / str(info["id"])
    cfg.diffusion.name_or_path = str(storage.download_dir(decoder, cache, st))
    towers = Path(cfg.diffusion.name_or_path)
    if (towers / "vision" / "config.json").is_file():  # the job also pretrained the flavor's CLIP vision tower
        cfg.vision.name_or_path = str(towers / "vision")
    if (towers / "llm" / "config.json").is_file():  # and its LLM, on text
        cfg.llm.name_or_path = str(towers / "llm")
        cfg.llm.copy_into_checkpoints = True  # the node's cache is not where a checkpoint is loaded
    return cfg
