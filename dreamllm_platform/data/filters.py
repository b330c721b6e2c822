"""Filters and the drop report.

Owns: the `Report` that counts records in/out and every dropped record or image
by reason (with a sample of offending keys), and the image checks (decode,
truncation, decompression bombs, size, aspect ratio) that turn raw bytes into a
loaded RGB image or a drop reason. Record-level rules (similarity, URL
duplicates, images per document, duplicates) are applied by `shards.py` with
the reasons below.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image

from dreamllm.images import upright_rgb

from .config import FilterConfig

REASONS = {
    # per image reference
    "low_similarity": "MMC4 image with matched_sim below filters.min_matched_sim",
    "missing_image": "image file not found in the images location (or download failed)",
    "unsafe_image_name": "image name that is absolute or has '..' (never read: it points outside the images location)",
    "undecodable_image": "image bytes that do not decode, or a truncated image",
    "oversized_image": "image declaring more than filters.max_image_pixels (decompression bomb)",
    "too_small": "image with a side below filters.min_image_side",
    "bad_aspect_ratio": "image with aspect ratio above filters.max_aspect_ratio",
    "duplicate_image": "pair whose image (sha256) an earlier pair of the run or the store has (reading order), "
                       "or an image repeated inside one document",
    "too_many_images": "document image beyond filters.max_images_per_doc",
    # per record
    "malformed_json": "a JSON line or file that does not parse",
    "deeply_nested_json": "a JSON line (or a JSON list file) nested past the parser's recursion limit",
    "malformed_record": "a record missing required fields or with wrong types",
    "url_duplicate": "MMC4 document flagged could_have_url_duplicate",
    "no_images": "document left with fewer than filters.min_images_per_doc images",
    # per shard
    "unreadable_shard": "a shard whose bytes do not parse (records lost: unknown); storage errors are retried instead",
    "oversized_member": "a zipped shard whose member inflates past filters.max_inflated_bytes (decompression bomb)",
    "truncated_shard": "a shard cut short; the records before the cut are kept",
}


@dataclass
class Report:
    """Counts of one shard or a whole run: `counts` (records/images in and out, and
    `shared_image_in_document`: kept documents using an image an earlier document of the run or the
    store uses) and `dropped` by reason."""

    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)
    sample_keys: int = 5

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def drop(self, reason: str, key: str) -> None:
        assert reason in REASONS, reason  # a typo here would silently split counts
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        keys = self.samples.setdefault(reason, [])
        if len(keys) < self.sample_keys:
            keys.append(str(key))

    def merge(self, other: "Report | dict") -> None:
        o = other if isinstance(other, dict) else other.to_dict()
        for k, v in o.get("counts", {}).items():
            self.count(k, v)
        for k, v in o.get("dropped", {}).items():
            self.dropped[k] = self.dropped.get(k, 0) + v
        for k, keys in o.get("samples", {}).items():
            mine = self.samples.setdefault(k, [])
            mine.extend(keys[: max(0, self.sample_keys - len(mine))])

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "dropped": dict(sorted(self.dropped.items())),
                "samples": dict(sorted(self.samples.items()))}

    def format(self) -> str:
        lines = ["  " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))]
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {reason}: {n}  (e.g. {', '.join(self.samples.get(reason, [])[:3])})")
        if not self.dropped:
            lines.append("  dropped: none")
        return "\n".join(lines)


def decode_image(data: bytes, f: FilterConfig) -> tuple[Image.Image | None, str | None]:
    """Raw image bytes -> (loaded RGB image, upright by its EXIF orientation, None) or (None, drop reason).

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing; `load()` forces a full decode, which is
    what detects truncated files (PIL only reads headers in `open`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > f.max_image_pixels:
                return None, "oversized_image"
            img.load()
    except Image.DecompressionBombError:
        return None, "oversized_image"
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error... on bad bytes
        return None, "undecodable_image"
    if min(w, h) < f.min_image_side:
        return None, "too_small"
    if max(w, h) / min(w, h) > f.max_aspect_ratio:
        return None, "bad_aspect_ratio"
    return upright_rgb(img), None
