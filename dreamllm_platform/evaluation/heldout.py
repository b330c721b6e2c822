"""The held-out set: written by the synthetic generator with its own seed, read back from its real formats.

Owns: making sure the set exists (the generator writes it once; `_SUCCESS`
marks it complete), reading image-caption pairs from `laion_parquet/*.parquet`
(img2dataset's parquet layout with image bytes) and question/answer pairs from
`llava/*.json` (LLaVA conversations), and a digest of exactly what was read, so
two models can be compared only when they saw the same examples.

Any set in these two formats works (e.g. real LAION and LLaVA subsets); the
generator only runs when `root` has no `_SUCCESS`.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pyarrow.parquet as pq
from PIL import Image

from .. import storage
from ..data.synthetic import synthetic_exists, write_synthetic
from ..storage import StorageConfig
from .config import HeldOutSpec


@dataclass
class HeldOut:
    """What evaluation reads: `pairs` (caption, image) and `qa` (image, question, answer)."""

    pairs: list[tuple[str, Image.Image]]
    qa: list[tuple[Image.Image, str, str]]
    digest: str
    """sha256 (first 16 hex digits) of the captions, questions, answers and image bytes read."""


def _image(data: bytes, where: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except OSError:
        raise ValueError(f"held-out image {where} cannot be decoded") from None


def load_heldout(spec: HeldOutSpec, st: StorageConfig | None = None) -> HeldOut:
    """Write the set if it is missing (and the generator is enabled), then read up to the configured counts."""
    if not synthetic_exists(spec.root, st):
        if not spec.synthetic.enabled:
            raise ValueError(f"no held-out set at {spec.root} (no _SUCCESS) and heldout.synthetic.enabled is false")
        write_synthetic(spec.root, spec.synthetic, st)
    h = hashlib.sha256()
    pairs: list[tuple[str, Image.Image]] = []
    for uri in storage.list_files(storage.join(spec.root, "laion_parquet"), (".parquet",), st):
        if len(pairs) >= spec.max_pairs:
            break
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, st)), columns=["caption", "jpg"]).to_pylist()
        for row in table[:spec.max_pairs - len(pairs)]:
            h.update(row["caption"].encode() + row["jpg"])
            pairs.append((row["caption"], _image(row["jpg"], f"in {uri}")))
    qa: list[tuple[Image.Image, str, str]] = []
    for uri in storage.list_files(storage.join(spec.root, "llava"), (".json",), st):
        for rec in json.loads(storage.read_bytes(uri, st)):
            if len(qa) >= spec.max_questions:
                break
            image_uri = storage.join(spec.root, "llava", "images", rec["image"])
            data = storage.read_bytes(image_uri, st)
            image = _image(data, image_uri)
            turns = rec["conversations"]
            # Each human question with the gpt answer after it, asked on its own about the image.
            for q, a in zip(turns[0::2], turns[1::2]):
                if len(qa) >= spec.max_questions:
                    break
                question = q["value"].replace("<image>", "").strip()
                h.update(question.encode() + a["value"].encode() + data)
                qa.append((image, question, a["value"].strip()))
    if not pairs and not qa:
        raise ValueError(f"the held-out set at {spec.root} has no laion_parquet/*.parquet pairs and no llava/*.json")
    return HeldOut(pairs, qa, h.hexdigest()[:16])
