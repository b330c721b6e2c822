"""A small learnable data set (coloured shapes on plain backgrounds) written in the real formats.

Owns: scene rendering and captions (the vocabulary of dreamllm's bundled
tokenizer corpus), and writing them as MMC4 `.jsonl.zip` shards + image tars,
img2dataset webdataset tars (+ their .parquet), parquet with image bytes,
LLaVA conversation JSON and instruction-document JSON, so the real readers are
always on the path. With `defects=True` it also writes one of each kind of bad
input (the tests assert their exact counts); see `DEFECTS`.

The same seed writes the same bytes; `_SUCCESS` is written last, so a set
interrupted while being written is rewritten on the next run.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .. import storage
from ..storage import StorageConfig
from .config import SyntheticConfig

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
          "white": (250, 250, 250), "black": (10, 10, 10), "cyan": (30, 220, 230), "magenta": (220, 40, 200),
          "orange": (250, 140, 20), "purple": (120, 40, 170), "gray": (128, 128, 128), "pink": (250, 160, 190),
          "brown": (120, 70, 30)}
SHAPES = ("circle", "square", "triangle", "ring", "diamond", "star", "cross")
POSITIONS = {"upper left": (0.3, 0.3), "top": (0.5, 0.3), "upper right": (0.7, 0.3), "left": (0.3, 0.5),
             "center": (0.5, 0.5), "right": (0.7, 0.5), "lower left": (0.3, 0.7), "bottom": (0.5, 0.7),
             "lower right": (0.7, 0.7)}
SIZES = {"small": 0.14, "medium": 0.19, "large": 0.24}

SUCCESS = "_SUCCESS"

# What `defects=True` adds, as drop reason -> count with the default FilterConfig
# (drop_url_duplicates=True adds url_duplicate: 1). Tests assert these exactly.
DEFECTS = {"malformed_json": 1, "malformed_record": 1, "missing_image": 2, "low_similarity": 2,
           "undecodable_image": 2, "too_small": 1, "bad_aspect_ratio": 1, "oversized_image": 1,
           "duplicate_image": 2, "too_many_images": 2, "no_images": 1, "unreadable_shard": 1, "truncated_shard": 1}


@dataclass(frozen=True)
class Scene:
    """One shape of one colour at one position on a plain background."""

    color: str
    shape: str
    position: str
    size: str
    background: str

    @staticmethod
    def random(rng: random.Random) -> "Scene":
        color, background = rng.sample(sorted(COLORS), 2)
        return Scene(color, rng.choice(SHAPES), rng.choice(sorted(POSITIONS)), rng.choice(sorted(SIZES)), background)

    def caption(self) -> str:
        return f"A {self.size} {self.color} {self.shape} in the {self.position} of the image."

    def sentence(self) -> str:
        return f"This scene shows a {self.color} {self.shape} at the {self.position}. The background is {self.background}."

    def qa(self) -> list[tuple[str, str]]:
        return [(f"What color is the {self.shape}?", self.color), ("What shape is in the image?", self.shape),
                (f"Where is the {self.color} {self.shape}?", self.position)]

    def render(self, px: int) -> Image.Image:
        img = Image.new("RGB", (px, px), COLORS[self.background])
        cx, cy = (v * px for v in POSITIONS[self.position])
        draw_shape(ImageDraw.Draw(img), self.shape, cx, cy, SIZES[self.size] * px, COLORS[self.color])
        return img


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one of SHAPES centred at (cx, cy) with half-size r pixels: the one drawing of scenes and of the
    templates `dreamllm_platform.evaluation.scenes` matches created images against."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        d.regular_polygon((cx, cy, r), 5, fill=fill)  # drawn as a pentagon star-ish marker
        d.polygon([(cx, cy - r * 1.2), (cx - r * 0.3, cy), (cx + r * 0.3, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_bomb_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height with a few bytes of data: a decompression bomb's shape."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: same seed, same bytes
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_jsonl(name: str, lines: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo(name, date_time=(2023, 1, 1, 0, 0, 0)), "\n".join(lines) + "\n")
    return buf.getvalue()


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class _Writer:
    def __init__(self, root: str, cfg: SyntheticConfig, st: StorageConfig | None):
        self.root, self.cfg, self.st = root, cfg, st
        self.rng = random.Random(cfg.seed)
        self.n_images = 0

    def put(self, rel: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.root, rel), data, self.st)

    def image(self, size: int | None = None) -> tuple[Scene, bytes, str]:
        """A fresh scene, its JPEG and an MMC4-style image_name (hash of its URL)."""
        scene = Scene.random(self.rng)
        self.n_images += 1
        name = hashlib.md5(f"img-{self.cfg.seed}-{self.n_images}".encode()).hexdigest()[:16] + ".jpg"
        return scene, jpeg(scene.render(size or self.cfg.image_size)), name

    def document(self, doc_id: str, scenes: list[tuple[Scene, str]], sims: list[float] | None = None) -> dict:
        text = ["This document describes several scenes."] + [s.sentence() for s, _ in scenes]
        infos = [{"image_name": name, "raw_url": f"https://example.com/images/{name}", "matched_text_index": i + 1,
                  "matched_sim": (sims[i] if sims else round(self.rng.uniform(0.26, 0.4), 4)),
                  "face_detections": None} for i, (_, name) in enumerate(scenes)]
        return {"url": f"https://example.com/docs/{doc_id}", "text_list": text, "image_info": infos,
                "similarity_matrix": [[info["matched_sim"] if j == info["matched_text_index"] else 0.1
                                       for j in range(len(text))] for info in infos],
                "could_have_url_duplicate": 0}

    # ------------------------------------------------------------------ formats
    def mmc4(self) -> None:
        c = self.cfg
        for shard in range(c.mmc4_shards):
            lines, files = [], []
            for d in range(c.docs_per_shard):
                scenes = []
                for _ in range(c.scenes_per_doc):
                    scene, data, name = self.image()
                    files.append((name, data))
                    scenes.append((scene, name))
                lines.append(json.dumps(self.document(f"{shard}-{d}", scenes)))
            if c.defects and shard == 0:
                lines += self._mmc4_defects(files)
            self.put(f"mmc4/images/shard_{shard}.tar", _tar(files))
            self.put(f"mmc4/docs_shard_{shard}_v2.jsonl.zip", _zip_jsonl(f"docs_shard_{shard}_v2.jsonl", lines))
        if c.defects:  # a shard that is not a zip at all
            self.put(f"mmc4/docs_shard_{c.mmc4_shards}_v2.jsonl.zip", b"this is not a zip file")

    def _mmc4_defects(self, files: list[tuple[str, bytes]]) -> list[str]:
        def good():
            scene, data, name = self.image()
            files.append((name, data))
            return scene, name

        def bad(data: bytes):
            scene, _, name = self.image()
            files.append((name, data))
            return scene, name

        corrupt = jpeg(Scene.random(self.rng).render(self.cfg.image_size))
        docs = {
            "missing": [good(), (Scene.random(self.rng), "not-in-any-tar.jpg")],
            "corrupt": [good(), bad(corrupt[: len(corrupt) // 2]), bad(b"\xff\xd8\xff garbage, not a jpeg")],
            "tiny": [good(), bad(jpeg(Scene.random(self.rng).render(8)))],
            "wide": [good(), bad(jpeg(Scene.random(self.rng).render(self.cfg.image_size).resize((200, 40))))],
            "bomb": [good(), bad(png_bomb_header(100_000, 100_000))],
            "many": [good() for _ in range(8)],
            "urldup": [good()],
        }
        lines = [json.dumps(self.document(f"defect-{k}", v)) for k, v in docs.items()]
        g = good()
        dup = self.document("defect-dup", [g, g])  # the same image twice in one document
        lowsim = self.document("defect-lowsim", [good(), good()], sims=[0.3, 0.1])
        noimg = self.document("defect-noimg", [good()], sims=[0.05])  # loses its only image
        url = json.loads(lines[-1])
        url["could_have_url_duplicate"] = 1
        lines[-1] = json.dumps(url)
        return lines + [json.dumps(d) for d in (dup, lowsim, noimg)] + [
            '{"text_list": ["an unterminated line"', json.dumps({"text_list": "not a list", "image_info": []})]

    def _pair_rows(self, shard: int) -> list[dict]:
        rows = []
        for j in range(self.cfg.pairs_per_shard):
            scene, data, _ = self.image()
            rows.append({"key": f"{shard:05d}{j:04d}", "caption": scene.caption(), "jpg": data,
                         "url": f"https://example.com/pairs/{shard}/{j}.jpg",
                         "width": self.cfg.image_size, "height": self.cfg.image_size, "status": "success"})
        return rows

    def webdataset(self) -> None:
        c = self.cfg
        for shard in range(c.webdataset_shards + (1 if c.defects else 0)):
            rows = self._pair_rows(shard) if shard < c.webdataset_shards else self._pair_rows(shard)[:4]
            if c.defects and shard == 0 and rows:  # the same image again under a new key
                rows.append({**rows[0], "key": f"{shard:05d}9999"})
            files = []
            for r in rows:
                meta = {k: v for k, v in r.items() if k != "jpg"}
                files += [(f"{r['key']}.jpg", r["jpg"]), (f"{r['key']}.txt", r["caption"].encode()),
                          (f"{r['key']}.json", json.dumps(meta).encode())]
            data = _tar(files)
            if shard == c.webdataset_shards:  # cut inside the third sample's image: two samples survive
                with tarfile.open(fileobj=io.BytesIO(data)) as t:
                    m = t.getmembers()[6]
                data = data[: m.offset_data + m.size // 2]
            else:
                meta_rows = [{k: v for k, v in r.items() if k != "jpg"} for r in rows]
                self.put(f"laion/{shard:05d}.parquet", _parquet(pa.Table.from_pylist(meta_rows)))
            self.put(f"laion/{shard:05d}.tar", data)

    def laion_parquet(self) -> None:
        for shard in range(self.cfg.parquet_shards):
            self.put(f"laion_parquet/{shard:05d}.parquet", _parquet(pa.Table.from_pylist(self._pair_rows(100 + shard))))

    def llava(self) -> None:
        records = []
        for i in range(self.cfg.conversations):
            scene, data, name = self.image()
            self.put(f"llava/images/{name}", data)
            qa = self.rng.sample(scene.qa(), 2)
            convs = [{"from": "human", "value": f"<image>\n{qa[0][0]}"}, {"from": "gpt", "value": qa[0][1]},
                     {"from": "human", "value": qa[1][0]}, {"from": "gpt", "value": qa[1][1]}]
            records.append({"id": f"synthetic-{i}", "image": name, "conversations": convs})
        if self.cfg.defects:
            records.append({"id": "defect-missing", "image": "missing.jpg",
                            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                              {"from": "gpt", "value": "a shape"}]})
        self.put("llava/synthetic_llava.json", json.dumps(records, indent=1).encode())

    def instruct(self) -> None:
        records = []
        for i in range(self.cfg.instruct_docs):
            scenes = []
            for _ in range(self.cfg.scenes_per_doc):
                scene, data, name = self.image()
                self.put(f"instruct/images/{name}", data)
                scenes.append((scene, name))
            records.append({"id": f"instruct-{i}", "document": self.document(f"instruct-{i}", scenes),
                            "instruction": f"Write a short story with pictures about {len(scenes)} scenes."})
        self.put("instruct/instruct_docs.json", json.dumps(records, indent=1).encode())


def synthetic_exists(root: str, st: StorageConfig | None = None) -> bool:
    return storage.exists(storage.join(root, SUCCESS), st)


def write_synthetic(root: str, cfg: SyntheticConfig | None = None, st: StorageConfig | None = None) -> str:
    """Write the whole set under `root` (s3:// or local); returns `root`."""
    w = _Writer(root, cfg or SyntheticConfig(), st)
    w.mmc4()
    w.webdataset()
    w.laion_parquet()
    w.llava()
    w.instruct()
    w.put(SUCCESS, json.dumps({"images": w.n_images, "seed": w.cfg.seed}).encode())
    return root
