"""The latent store: parquet shards keyed by image sha256, normalised records, a manifest, a report.

Owns the layout under the store URI (s3:// or local) and the commit protocol:

  latents/<source>/<shard>.parquet   sha256, mean, logvar (fp16 bytes, C x h x w), clip_u8 (S x S x 3 uint8)
  records/<source>/<shard>.parquet   id, type, data (normalised JSON, see shards.py), in shard order
  manifest/<source>/<shard>.json     source URI, output files (relative), counts, drops, config hash, shapes
  report.json                        counts and drops summed over the manifest (written by the job)

A shard is complete when its manifest entry exists, its config hash matches
and both output files exist. The entry is written last, after the data files,
so a job killed at any point leaves either a complete shard or one that the
next run redoes (overwriting the same bytes). One manifest file per shard means
no read-modify-write of a shared file, which object storage cannot make atomic.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..storage import StorageConfig

LATENT_SCHEMA = pa.schema([("sha256", pa.string()), ("mean", pa.binary()), ("logvar", pa.binary()),
                           ("clip_u8", pa.binary())])
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("type", pa.string()), ("data", pa.string())])


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@dataclass
class LatentStore:
    """A latent store at `uri`."""

    uri: str
    st: StorageConfig | None = None

    def _path(self, kind: str, shard_id: str, ext: str) -> str:
        return storage.join(self.uri, kind, f"{shard_id}.{ext}")

    def latents_uri(self, shard_id: str) -> str:
        return self._path("latents", shard_id, "parquet")

    def records_uri(self, shard_id: str) -> str:
        return self._path("records", shard_id, "parquet")

    def manifest_uri(self, shard_id: str) -> str:
        return self._path("manifest", shard_id, "json")

    @property
    def report_uri(self) -> str:
        return storage.join(self.uri, "report.json")

    # -------------------------------------------------------------- manifest
    def manifest(self) -> dict[str, dict]:
        """shard id -> manifest entry, for every committed shard."""
        root = storage.join(self.uri, "manifest")
        out = {}
        for uri in storage.list_files(root, (".json",), self.st):
            entry = json.loads(storage.read_bytes(uri, self.st))
            out[entry["shard_id"]] = entry
        return dict(sorted(out.items()))

    def is_complete(self, shard_id: str, config_hash: str) -> bool:
        """Committed with the same config and with both data files present."""
        try:
            entry = json.loads(storage.read_bytes(self.manifest_uri(shard_id), self.st))
        except FileNotFoundError:
            return False
        return (entry.get("config_hash") == config_hash and storage.exists(self.latents_uri(shard_id), self.st)
                and storage.exists(self.records_uri(shard_id), self.st))

    def commit(self, shard_id: str, *, source_uri: str, fmt: str, config_hash: str, records: list,
               latents: list[dict], report: dict, meta: dict) -> dict:
        """Write a shard's latents and records, then its manifest entry (the commit point).

        `records`: (id, type, json) in shard order; `latents`: rows of LATENT_SCHEMA (any order:
        they are sorted by sha256 so that the bytes do not depend on processing order).
        """
        latents = sorted(latents, key=lambda r: r["sha256"])
        lat = pa.Table.from_pylist([{k: r[k] for k in LATENT_SCHEMA.names} for r in latents], schema=LATENT_SCHEMA)
        rec = pa.Table.from_pylist([{"id": i, "type": t, "data": d} for i, t, d in records], schema=RECORD_SCHEMA)
        storage.write_bytes(self.latents_uri(shard_id), _parquet_bytes(lat), self.st)
        storage.write_bytes(self.records_uri(shard_id), _parquet_bytes(rec), self.st)
        entry = {"shard_id": shard_id, "source": source_uri, "format": fmt, "config_hash": config_hash,
                 # relative to the store root, so a store can be copied or moved (e.g. local -> s3://)
                 "latents": f"latents/{shard_id}.parquet", "records": f"records/{shard_id}.parquet",
                 "num_images": lat.num_rows, "num_records": rec.num_rows, **meta, **report}
        storage.write_bytes(self.manifest_uri(shard_id), json.dumps(entry, indent=1, sort_keys=True).encode(), self.st)
        return entry

    # ----------------------------------------------------------------- reads
    def read_latents(self, shard_id: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(self.latents_uri(shard_id), self.st)))

    def image_shas(self, shard_id: str) -> list[str]:
        """The sha256 of every image a committed shard stores (one column: ranged reads on s3://)."""
        fs, path = storage.fsspec_fs(self.latents_uri(shard_id), self.st)
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=["sha256"]).column("sha256").to_pylist()

    def read_records(self, shard_id: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(self.records_uri(shard_id), self.st)))

    def write_report(self, report: dict) -> None:
        storage.write_bytes(self.report_uri, json.dumps(report, indent=1, sort_keys=True).encode(), self.st)
