"""Typed configs of the data layer: sources, filters, the encoder pool, the synthetic set, assembly.

Owns: the dataclasses `jobs/precompute_latents.py` loads with
`dreamllm_platform.config.load_config` (YAML + `--set`), one docstring per
field, checks in `__post_init__`, and the hash of the settings that change a
shard's output (the manifest compares it to decide what to redo).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from dataclasses import dataclass, field

from dreamllm.config import check, get_flavor

from ..storage import StorageConfig, is_absolute, join

FORMATS = ("mmc4", "webdataset", "laion_parquet", "llava", "instruct_doc")
"""Source formats: MMC4 v1.1 docs shards; img2dataset webdataset tars; parquet with image bytes +
caption; LLaVA conversation JSON; instruction-following document JSON."""

SHARD_SUFFIXES = {
    "mmc4": (".jsonl.zip", ".jsonl"),
    "webdataset": (".tar",),
    "laion_parquet": (".parquet",),
    "llava": (".json",),
    "instruct_doc": (".json",),
}


@dataclass
class SourceConfig:
    """One input data set: where its shards are and how to read them."""

    format: str
    """One of mmc4, webdataset, laion_parquet, llava, instruct_doc (no default: a source says what it holds)."""
    uri: str = ""
    """Shard file or directory (searched recursively for the format's suffixes); relative = under data_root."""
    images: str | None = None
    """mmc4/llava/instruct_doc: folder of images, or folder of tar shards of files named by image_name."""
    images_pattern: str | None = None
    """The images tar of a shard, relative to `images`: {shard} is the shard's file name without its suffix,
    {n} the number after `shard_` in it (MMC4 pairs docs shard N with images shard N). Only that tar is
    indexed (its images are loose files under `images` when it is absent); None: every tar under `images`."""
    enabled: bool = True
    """Set false to skip this source."""

    def __post_init__(self) -> None:
        check(self.format in FORMATS, f"source format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        check(bool(self.uri), "source uri must be set")
        if self.images_pattern is not None:
            check(self.images is not None, "source images_pattern needs the source's images location")
            try:
                names = _fields(self.images_pattern)
            except ValueError as e:
                raise ValueError(f"source images_pattern {self.images_pattern!r} does not parse: {e}") from None
            check(names <= {"shard", "n"} and bool(names),
                  f"source images_pattern {self.images_pattern!r} must use {{shard}} and/or {{n}}, "
                  f"and nothing else (has {sorted(names)})")
            check(self.images_pattern.endswith(".tar"), f"source images_pattern {self.images_pattern!r} must name a .tar")
            check(safe_relative(self.images_pattern.format(shard="x", n=0)),
                  f"source images_pattern {self.images_pattern!r} must stay inside the images location")

    def shard_stem(self, shard_uri: str) -> str:
        """The shard's file name without its format's suffix: `docs_shard_3_v2` of `.../docs_shard_3_v2.jsonl.zip`."""
        name = shard_uri.rstrip("/").rsplit("/", 1)[-1]
        return next((name[: -len(s)] for s in SHARD_SUFFIXES[self.format] if name.endswith(s)), name)

    def images_tar(self, shard_uri: str) -> str | None:
        """The images tar of a shard by `images_pattern` (relative to `images`), or None without a rule.

        Raises ValueError when the pattern uses {n} and the shard's name has no `shard_<number>`.
        """
        if self.images_pattern is None or self.images is None:
            return None
        stem = self.shard_stem(shard_uri)
        m = _SHARD_NUMBER.search(stem)
        if m is None and "n" in _fields(self.images_pattern):
            raise ValueError(f"images_pattern {self.images_pattern!r} uses {{n}}, but shard {shard_uri} has no "
                             f"'shard_<number>' in its name: use {{shard}} (the name, {stem!r}) instead")
        return self.images_pattern.format(shard=stem, n=int(m.group(1)) if m else 0)


_SHARD_NUMBER = re.compile(r"shard_(\d+)")


def _fields(pattern: str) -> set[str]:
    """The placeholder names of a str.format pattern ({n:05d} -> n)."""
    return {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}


def safe_relative(name: str) -> bool:
    """A relative name that stays inside a location: not absolute, no `..`, no NUL, no scheme."""
    if not name or "\0" in name or "://" in name or name.startswith(("/", "\\", "~")):
        return False
    if len(name) > 1 and name[1] == ":":  # a Windows drive, C:...
        return False
    return ".." not in name.replace("\\", "/").split("/")


@dataclass
class FilterConfig:
    """What a record or image must satisfy to be kept; every drop is counted by reason."""

    min_matched_sim: float = 0.25
    """MMC4 image kept only if its CLIP matched_sim >= this (the paper's MMC4-core rule)."""
    drop_url_duplicates: bool = False
    """Drop MMC4 documents flagged could_have_url_duplicate."""
    min_image_side: int = 32
    """Images with a shorter side (pixels) are dropped."""
    max_aspect_ratio: float = 3.0
    """Images with long side / short side above this are dropped."""
    max_image_pixels: int = 50_000_000
    """Images declaring more pixels are dropped before decoding (decompression bombs)."""
    max_inflated_bytes: int = 2**30
    """A zipped shard whose member inflates past this many bytes is dropped unread (zip bombs)."""
    max_images_per_doc: int = 6
    """Images of a document beyond this many are dropped (a 2048-token 7b sequence holds about six)."""
    min_images_per_doc: int = 1
    """Documents left with fewer images are dropped."""
    dedupe_images: bool = True
    """Drop pairs whose image (sha256) an earlier pair of the run (in reading order: sources, shards, records)
    or a pair already in the store has, and repeated images inside a document."""
    download_missing: bool = False
    """MMC4: fetch images missing from the images location from raw_url (off: MMC4 images are not redistributed)."""
    download_timeout_s: float = 10.0
    """Timeout of one download attempt."""
    download_retries: int = 2
    """Extra attempts after a failed download."""
    sample_keys: int = 5
    """Offending keys kept per drop reason in the report."""

    def __post_init__(self) -> None:
        check(0.0 <= self.min_matched_sim <= 1.0, "filters.min_matched_sim must be in [0, 1]")
        check(self.min_image_side >= 1, "filters.min_image_side must be >= 1")
        check(self.max_aspect_ratio >= 1.0, "filters.max_aspect_ratio must be >= 1")
        check(self.max_image_pixels > 0, "filters.max_image_pixels must be > 0")
        check(self.max_inflated_bytes > 0, "filters.max_inflated_bytes must be > 0")
        check(self.max_images_per_doc >= 1, "filters.max_images_per_doc must be >= 1")
        check(0 <= self.min_images_per_doc <= self.max_images_per_doc,
               "filters.min_images_per_doc must be in [0, max_images_per_doc]")


@dataclass
class EncoderConfig:
    """The VAE actor pool and the CPU tasks around it; 0 means derived from the cluster's resources."""

    batch_size: int = 16
    """Images per VAE forward; partial batches are zero-padded so results never depend on batching."""
    pool_size: int = 0
    """VAE actors: 0 = one per GPU, or on CPU clusters a quarter of the CPUs (at least 1)."""
    cpus_per_actor: float = 0.0
    """CPUs reserved per actor: 0 = derived so that at least half the CPUs stay free for reading."""
    read_cpus: float = 1.0
    """CPUs per read/decode task."""
    read_retries: int = 3
    """Extra attempts at a shard after a storage error (backing off 1, 2, 4... s); a shard failing them all
    is left uncommitted, the run fails naming it, and the next run redoes it."""
    autocast: str = "bf16"
    """GPU autocast dtype: bf16, fp16 or none (CPU always runs fp32)."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "encoder.batch_size must be >= 1")
        check(self.pool_size >= 0 and self.cpus_per_actor >= 0, "encoder.pool_size and cpus_per_actor must be >= 0")
        check(0 < self.read_cpus <= 64, "encoder.read_cpus must be in (0, 64]")
        check(self.read_retries >= 0, "encoder.read_retries must be >= 0")
        check(self.autocast in ("bf16", "fp16", "none"), "encoder.autocast must be bf16, fp16 or none")


@dataclass
class SyntheticConfig:
    """The bundled learnable data set (coloured shapes), written in the real formats."""

    enabled: bool = True
    """Write the synthetic set into data_root first when it is not there yet."""
    image_size: int = 64
    """Side of the generated images in pixels."""
    mmc4_shards: int = 2
    """MMC4 .jsonl.zip shards (each with an image tar)."""
    docs_per_shard: int = 8
    """Documents per MMC4 shard."""
    scenes_per_doc: int = 3
    """Scenes (sentence + image) per document."""
    webdataset_shards: int = 2
    """img2dataset webdataset tar shards (each with its .parquet)."""
    parquet_shards: int = 1
    """Parquet shards with image bytes + caption."""
    pairs_per_shard: int = 16
    """Image-caption pairs per pair shard."""
    conversations: int = 16
    """LLaVA conversations (Q/A about colour, shape and position)."""
    instruct_docs: int = 4
    """Instruction-following documents."""
    seed: int = 0
    """Seed of the generator: the same seed writes the same bytes."""
    defects: bool = False
    """Also write one of each kind of bad input (tests of the filters)."""

    def __post_init__(self) -> None:
        check(self.image_size >= 16, "synthetic.image_size must be >= 16")
        check(min(self.mmc4_shards, self.docs_per_shard, self.scenes_per_doc, self.webdataset_shards,
                   self.parquet_shards, self.pairs_per_shard, self.conversations, self.instruct_docs) >= 0,
               "synthetic counts must be >= 0")


def resolve_uri(data_root: str, uri: str | None) -> str | None:
    """A source URI resolved against `data_root` (absolute paths, file:// and s3:// stay as they are)."""
    if uri is None or is_absolute(uri):
        return uri
    return join(data_root, uri)


def default_sources() -> dict[str, SourceConfig]:
    """The synthetic set's layout (relative to data_root)."""
    return {
        "mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images", images_pattern="shard_{n}.tar"),
        "laion": SourceConfig("webdataset", "laion"),
        "laion_parquet": SourceConfig("laion_parquet", "laion_parquet"),
        "llava": SourceConfig("llava", "llava", "llava/images"),
        "instruct": SourceConfig("instruct_doc", "instruct", "instruct/images"),
    }


@dataclass
class PrecomputeConfig:
    """The latent-precompute job: sources -> filters -> VAE pool -> latent store."""

    flavor: str = "small"
    """Model flavor whose VAE (and CLIP input size) the latents are for: debug, small or 7b."""
    data_root: str = "outputs/synthetic"
    """Base URI of relative source URIs (s3://bucket/prefix or a local dir)."""
    sources: dict[str, SourceConfig] = field(default_factory=default_sources)
    """Named input data sets; the name prefixes shard ids in the store."""
    output: str = "outputs/latent_store"
    """URI of the latent store (parquet shards + manifest + report)."""
    decoder: str | None = None
    """URI of the towers trained by jobs/pretrain_towers.py whose VAE encodes the latents; None: the flavor's own."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Record and image filters."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """VAE actor pool sizing."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic set written into data_root when missing."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage endpoint/region (default: the AWS environment variables)."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a local Ray started by the job (default: all cores); ignored on a cluster."""

    def __post_init__(self) -> None:
        get_flavor(self.flavor)  # raises with the valid names
        check(bool(self.sources), "at least one source is needed")
        check(all("/" not in n for n in self.sources), "source names must not contain '/'")

    def source_uri(self, uri: str | None) -> str | None:
        """A source URI resolved against data_root (absolute paths and s3:// stay as they are)."""
        return resolve_uri(self.data_root, uri)

    def shard_config_hash(self, source: SourceConfig) -> str:
        """Hash of everything that changes a shard's output: format, images location, filters, VAE, CLIP size.

        A trained decoder counts by its export id (from its decoder.json), so a store encoded with
        another VAE, or with a decoder retrained at the same URI, is redone.
        """
        model = get_flavor(self.flavor)
        relevant = {"format": source.format, "images": self.source_uri(source.images),
                    **({"images_pattern": source.images_pattern} if source.images_pattern else {}),
                    "filters": {k: v for k, v in dataclasses.asdict(self.filters).items() if k != "sample_keys"},
                    "vae": dataclasses.asdict(model.diffusion), "clip_size": model.vision.image_size}
        if self.decoder:
            from ..checkpoints import read_decoder_info

            info = read_decoder_info(self.decoder, self.storage)
            if info is None:
                raise ValueError(f"decoder {self.decoder} is not a finished decoder: "
                                 f"run jobs/pretrain_towers.py first")
            relevant["decoder"] = info["id"]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class AssemblyConfig:
    """Which records of a latent store become training examples, and how."""

    record_types: tuple[str, ...] = ("document", "pair", "conversation")
    """Record types to use: document (MMC4), pair (LAION), conversation (LLaVA and instruction docs)."""
    sources: tuple[str, ...] = ()
    """Source names to use (empty: all in the store)."""
    pair_tasks: tuple[str, ...] = ("comprehension", "creation")
    """Each pair gives one example per task: image->caption and/or caption->dream slot."""
    learn_creation_text: bool = True
    """False masks the caption of creation pairs (stage I: creation pairs carry only the diffusion loss)."""
    document_images: str = "create"
    """What a document's images are: "create" (a dream slot, then read back as input: DreamLLM's I-GPT) or
    "read" (input only, no diffusion loss: the comprehension-only ablation)."""

    def __post_init__(self) -> None:
        self.record_types, self.sources, self.pair_tasks = tuple(self.record_types), tuple(self.sources), tuple(self.pair_tasks)
        bad = set(self.record_types) - {"document", "pair", "conversation"}
        check(not bad, f"unknown record type(s) {sorted(bad)}; valid: document, pair, conversation")
        check(self.document_images in ("create", "read"), "document_images must be create or read")
        bad = set(self.pair_tasks) - {"comprehension", "creation"}
        check(not bad, f"unknown pair task(s) {sorted(bad)}; valid: comprehension, creation")
