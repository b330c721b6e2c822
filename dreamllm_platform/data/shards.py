"""One source shard -> normalised records + the unique images to encode, with every drop counted.

Owns: applying the filters to the records of each format, the normalised record
form the store keeps and assembly reads, and the CPU side of image
preparation (decode, resize + centre-crop to the VAE and CLIP sizes, as uint8).

Normalised records (JSON in the store's records parquet; images by sha256):
  document      {"items": [{"text": s} | {"image": sha}, ...]}          MMC4
  pair          {"caption": s, "image": sha}                            LAION
  conversation  {"turns": [{"role": user|assistant, "items": [...]}]}   LLaVA, instruction documents
Duplicates are detected here within the shard (a shard's images are sent to
the VAE once); duplicates across shards and runs are resolved by the driver at
commit time, in reading order (`latents.RunDedupe`), so shards still run in
parallel, in any order, and re-runs give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterator

import numpy as np

from dreamllm.images import resize_center_crop
from dreamllm.sequence import Image as ImageItem
from dreamllm.sequence import Text, document_from_mmc4, turns_from_llava

from ..storage import StorageConfig
from . import readers
from .config import SourceConfig, FilterConfig
from .filters import Report, decode_image


_Kept = tuple[tuple[str, str, str], list[str]]  # (record id, type, json), image shas it uses


def _items_json(items) -> list[dict]:
    return [{"text": it.text} if isinstance(it, Text) else {"image": it.key} for it in items]


class ShardReader:
    """Reads one shard. Iterate `images()` to get the images to encode; afterwards `records` holds
    (record_id, type, json) in shard order and `report` the counts. A storage failure (of the shard,
    the images location or an image) raises `readers.StorageReadError` out of `images()` or the
    constructor: the reader is then spent, and the caller retries with a new one."""

    def __init__(self, source: SourceConfig, uri: str, filters: FilterConfig, vae_size: int, clip_size: int,
                 st: StorageConfig | None = None):
        self.source, self.uri, self.f, self.st = source, uri, filters, st
        self.vae_size, self.clip_size = vae_size, clip_size
        self.report = Report(sample_keys=filters.sample_keys)
        self.records: list[tuple[str, str, str]] = []
        # Only the shard's own images tar when the source has a naming rule (images_pattern):
        # indexing every tar of the images location is the whole corpus per task at MMC4's scale.
        self.location = (readers.ImageLocation(source.images, st, filters.download_missing,
                                               filters.download_timeout_s, filters.download_retries,
                                               tar=source.images_tar(uri))
                         if source.images else None)
        self._by_name: dict[str, tuple[str | None, str | None]] = {}  # image name -> (sha, drop reason)
        self._crops: dict[str, dict] = {}  # sha -> image row, for the record being read
        self._emitted: set[str] = set()
        self._pair_shas: set[str] = set()  # images of kept pairs, for pair de-duplication

    # ----------------------------------------------------------------- images
    def _prepare(self, data: bytes | None) -> tuple[str | None, str | None]:
        """Bytes -> (sha256, None) with its crops staged for emission, or (None, drop reason)."""
        if data is None:
            return None, "missing_image"
        if not isinstance(data, (bytes, bytearray)):
            return None, "undecodable_image"
        sha = hashlib.sha256(data).hexdigest()
        if sha in self._emitted or sha in self._crops:
            return sha, None
        img, reason = decode_image(data, self.f)
        if reason:
            return None, reason
        vae = np.asarray(resize_center_crop(img, self.vae_size), dtype=np.uint8)
        clip = np.asarray(resize_center_crop(img, self.clip_size), dtype=np.uint8)
        self._crops[sha] = {"sha256": sha, "vae_u8": vae.tobytes(), "clip_u8": clip.tobytes()}
        return sha, None

    def _image(self, data: bytes | None, key: str) -> str | None:
        """Inline image bytes -> sha256, or None with the drop counted under `key`."""
        sha, reason = self._prepare(data)
        if reason:
            self.report.drop(reason, key)
        return sha

    def _by_file(self, name: str, key: str, raw_url: str | None = None) -> str | None:
        """An image referenced by file name in the images location -> sha256, or None with the drop counted.

        Results are cached per name, so an image shared by many records is fetched once,
        unless it was first seen only in a dropped record (its crops were not kept).
        """
        if not readers.safe_image_name(name):  # `..` or an absolute path: never read, whatever it names
            self.report.drop("unsafe_image_name", key)
            return None
        sha, reason = self._by_name.get(name, (None, None))
        if reason is None and not (sha and (sha in self._emitted or sha in self._crops)):
            data = self.location.get(name, raw_url) if self.location else None
            sha, reason = self._prepare(data)
            self._by_name[name] = (sha, reason)
        if reason:
            self.report.drop(reason, key)
        return sha

    def _flush(self, keep: list[str]) -> Iterator[dict]:
        """Emit the staged crops of images a kept record uses; forget the rest."""
        for sha in keep:
            if sha not in self._emitted and sha in self._crops:
                self._emitted.add(sha)
                self.report.count("images_out")
                yield self._crops[sha]
        self._crops.clear()

    # ---------------------------------------------------------------- records
    def _document_images(self, doc: dict, key: str) -> list[dict] | None:
        """Filtered image_info entries of an MMC4 document (with 'sha256' added), or None if dropped."""
        texts, infos = doc.get("text_list"), doc.get("image_info", [])
        if (not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list)
                or not all(isinstance(i, dict) and isinstance(i.get("image_name"), str) for i in infos)):
            self.report.drop("malformed_record", key)
            return None
        if self.f.drop_url_duplicates and doc.get("could_have_url_duplicate"):
            self.report.drop("url_duplicate", key)
            return None
        kept, seen = [], set()
        for info in infos:
            self.report.count("images_in")
            ikey = f"{key}/{info['image_name']}"
            sim = info.get("matched_sim")
            if isinstance(sim, (int, float)) and sim < self.f.min_matched_sim:
                self.report.drop("low_similarity", ikey)
                continue
            sha = self._by_file(info["image_name"], ikey, info.get("raw_url"))
            if sha is None:
                continue
            if self.f.dedupe_images and sha in seen:
                self.report.drop("duplicate_image", ikey)
                continue
            if len(kept) >= self.f.max_images_per_doc:
                self.report.drop("too_many_images", ikey)
                continue
            seen.add(sha)
            kept.append({**info, "sha256": sha})
        if len(kept) < self.f.min_images_per_doc:
            self.report.drop("no_images", key)
            return None
        return kept

    # Each _<type>(key, rec) returns ((id, type, json), image shas) for a kept record, or None
    # with the drop counted. `images()` runs them under one guard, so a record of an
    # unforeseen shape is counted as malformed instead of failing the shard.
    def _document(self, key: str, rec: dict, instruct: bool) -> _Kept | None:
        doc = rec.get("document") if instruct else rec
        if not isinstance(doc, dict) or (instruct and not isinstance(rec.get("instruction"), str)):
            self.report.drop("malformed_record", key)
            return None
        kept = self._document_images(doc, key)
        if kept is None:
            return None
        items = _items_json(document_from_mmc4({"text_list": doc["text_list"], "image_info": kept},
                                               image_key=lambda info: info["sha256"]))
        if instruct:  # the instruction is the user turn; the document is the assistant's answer
            data = {"turns": [{"role": "user", "items": [{"text": rec["instruction"]}]},
                              {"role": "assistant", "items": items}]}
            return (key, "conversation", json.dumps(data)), [k["sha256"] for k in kept]
        return (key, "document", json.dumps({"items": items})), [k["sha256"] for k in kept]

    def _pair(self, key: str, rec: dict) -> _Kept | None:
        self.report.count("images_in")
        caption = rec["caption"]
        if not isinstance(caption, str) or not caption.strip():
            self.report.drop("malformed_record", key)
            return None
        sha = self._image(rec["image"], key)
        if sha is None:
            return None
        if self.f.dedupe_images and sha in self._pair_shas:
            self.report.drop("duplicate_image", key)
            return None
        self._pair_shas.add(sha)
        return (key, "pair", json.dumps({"caption": caption.strip(), "image": sha})), [sha]

    def _conversation(self, key: str, rec: dict) -> _Kept | None:
        convs, image = rec.get("conversations"), rec.get("image")
        if not isinstance(convs, list) or not all(isinstance(t, dict) for t in convs) or (
                image is not None and not isinstance(image, str)):
            self.report.drop("malformed_record", key)
            return None
        sha = None
        if image is not None:
            self.report.count("images_in")
            sha = self._by_file(image, f"{key}/{image}")
            if sha is None:
                return None
        try:
            turns = turns_from_llava(convs, sha)
        except (ValueError, KeyError):
            self.report.drop("malformed_record", key)
            return None
        data = {"turns": [{"role": t.role, "items": _items_json(t.items)} for t in turns]}
        return (key, "conversation", json.dumps(data)), [sha] if sha else []

    def images(self) -> Iterator[dict]:
        """Unique images of the kept records, in first-use order: {sha256, vae_u8 (R,R,3), clip_u8 (S,S,3)}."""
        fmt = self.source.format
        if fmt in ("mmc4", "instruct_doc"):
            kind = "instruct_docs" if fmt == "instruct_doc" else "documents"
            it = (readers.iter_json_list(self.uri, self.report, self.st) if fmt == "instruct_doc"
                  else readers.iter_mmc4(self.uri, self.report, self.st, self.f.max_inflated_bytes))
            handle = lambda key, rec: self._document(key, rec, fmt == "instruct_doc")  # noqa: E731
        elif fmt in ("webdataset", "laion_parquet"):
            kind = "pairs"
            it = (readers.iter_webdataset if fmt == "webdataset" else readers.iter_laion_parquet)(
                self.uri, self.report, self.st)
            handle = self._pair
        else:
            kind, it, handle = "conversations", readers.iter_json_list(self.uri, self.report, self.st), self._conversation
        for key, rec in it:
            self.report.count(f"{kind}_in")
            try:
                kept = handle(key, rec)
            except readers.StorageReadError:  # the storage failed, not the record: the shard is retried
                raise
            except Exception:  # e.g. a matched_text_index that is not a number, nesting past the stack
                self.report.drop("malformed_record", key)
                kept = None
            if kept is None:
                self._crops.clear()
                continue
            record, shas = kept
            self.records.append(record)
            self.report.count(f"{kind}_out")
            yield from self._flush(shas)


def iter_items(items_json: list[dict]):
    """Normalised JSON items back to dreamllm's sequence items."""
    return [Text(i["text"]) if "text" in i else ImageItem(i["image"]) for i in items_json]
