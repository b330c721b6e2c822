"""The towers job's data: image-caption shards -> a Ray Dataset of decoded, resized images and their captions.

Owns: the read plan: one row per shard (`from_items`), then a
CPU map step that reads the shard with the platform's own readers
(`data.readers`: img2dataset webdataset tars, parquet with image bytes +
caption), checks and decodes each image as the latent precompute does
(`data.filters.decode_image`: bombs, too small, bad aspect ratio,
undecodable) and resizes + centre-crops it to the flavor's resolution.

Nothing bad fails the job: a bad image, a truncated or unreadable shard
becomes a row with `skip` set to the drop reason, which the training loop
counts and drops. (Ray 2.60's `read_parquet` plans a file-listing task that
asks for a whole CPU whatever `num_cpus` says, which never schedules while a
Train worker holds most of a 2-CPU machine; and `read_webdataset` fails on a
truncated tar instead of keeping the samples before the cut.)

Rows: {"pixels": uint8 (R, R, 3), "caption": str, "skip": "" or a drop reason, "id": "<shard>/<key>"}
(the id names what a step trained on, for `record_ids`; "" on a row of an unreadable record).
What a worker draws from this dataset is `towers.streams`' (kept apart so
that read tasks import neither torch nor the model library).
"""
from __future__ import annotations

import numpy as np

from dreamllm.images import resize_center_crop

from .. import storage
from ..data import readers
from ..data.config import SHARD_SUFFIXES, FilterConfig
from ..data.filters import Report, decode_image
from ..storage import StorageConfig
from .config import TowersConfig

ROWS_PER_BLOCK = 64
READERS = {"webdataset": readers.iter_webdataset, "laion_parquet": readers.iter_laion_parquet}


def _columns(rows: list[tuple[np.ndarray, str, str, str]]) -> dict:
    return {"pixels": np.stack([r[0] for r in rows]), "caption": np.asarray([r[1] for r in rows], dtype=object),
            "skip": np.asarray([r[2] for r in rows], dtype=object), "id": np.asarray([r[3] for r in rows], dtype=object)}


def read_pairs(batch: dict, resolution: int, st: StorageConfig | None):
    """CPU task: shard rows {uri, format} -> blocks of decoded pairs (see the module docstring)."""
    filters = FilterConfig()  # the precompute's default image checks
    blank = np.zeros((resolution, resolution, 3), np.uint8)
    for uri, fmt in zip(batch["uri"], batch["format"]):
        report = Report()
        rows = []
        shard = uri.rstrip("/").rsplit("/", 1)[-1]
        for key, rec in READERS[fmt](uri, report, st):
            data = rec.get("image")
            img, reason = (decode_image(data, filters) if isinstance(data, (bytes, bytearray))
                           else (None, "missing_image"))
            pixels = blank if img is None else np.asarray(resize_center_crop(img, resolution), np.uint8)
            rows.append((pixels, (rec.get("caption") or "").strip(), reason or "", f"{shard}/{key}"))
            if len(rows) == ROWS_PER_BLOCK:
                yield _columns(rows)
                rows = []
        rows += [(blank, "", reason, "") for reason, n in report.dropped.items() for _ in range(n)]
        if rows:
            yield _columns(rows)


def image_caption_dataset(cfg: TowersConfig, resolution: int):
    """The lazy Ray Dataset of every enabled source's pairs, decoded at `resolution`.

    Raises ValueError naming the source when it has no shards.
    """
    import ray

    shards = []
    for name, src in cfg.source_uris().items():
        suffixes = SHARD_SUFFIXES[src.format]
        uris = storage.list_files(src.uri, suffixes, cfg.storage)
        if not uris:
            raise ValueError(f"source {name!r}: no {'/'.join(suffixes)} shards under {src.uri}")
        shards += [{"uri": u, "format": src.format} for u in uris]
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    return ds.map_batches(read_pairs, batch_size=1, num_cpus=cfg.data_cpus,
                          fn_kwargs={"resolution": resolution, "st": cfg.storage})
