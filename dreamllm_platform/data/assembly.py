"""Training-set assembly: latent store -> a streaming Ray Dataset of tokenised, collatable examples.

Owns: joining each shard's normalised records with its latents (records only
reference images of their own shard, so the join is per shard and streams),
turning records into `dreamllm` examples through its `SequenceBuilder`, and
`ExampleCollator`, which turns a batch of those rows into the tensors of
`dreamllm.sequence.collate` (CLIP pixels, latent mean/logvar).

Row schema of the dataset (one example per row):
  input_ids, labels     list<int64>
  image_keys            list<string>   image-input blocks in order (sha256)
  dream_keys            list<string>   dream slots in order (sha256)
  images                list<binary>   CLIP crops, uint8 (S, S, 3), aligned with image_keys
  latents               list<binary>   fp16 (2, C, h, w) = [mean, logvar], aligned with dream_keys
  shard_id, record_id   string

Use in a Ray Train loop:
  ds = training_dataset(store_uri, model_cfg)                 # driver
  trainer = TorchTrainer(..., datasets={"train": ds})
  collate = ExampleCollator(model_cfg)                        # in the train function
  for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=B, collate_fn=collate): ...
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from dreamllm.config import DreamLLMConfig, from_dict

from ..storage import StorageConfig
from .config import AssemblyConfig
from .shards import iter_items
from .store import LatentStore

ROWS_PER_BATCH = 64


@functools.lru_cache(maxsize=2)
def _builder(model_cfg_json: str):
    """SequenceBuilder of a model config, built once per worker process (the BPE trains in ~30 ms)."""
    from dreamllm.sequence import SequenceBuilder
    from dreamllm.tokenizer import build_tokenizer

    cfg = from_dict(DreamLLMConfig, json.loads(model_cfg_json))
    return SequenceBuilder(build_tokenizer(cfg.tokenizer), cfg)


def record_examples(builder, rtype: str, data: dict, cfg: AssemblyConfig) -> list:
    """One normalised record -> its `dreamllm.sequence.Example`s (a pair gives one per pair task)."""
    from dreamllm.sequence import Turn

    if rtype == "document":
        return [builder.document(iter_items(data["items"]), create_images=cfg.document_images == "create")]
    if rtype == "pair":
        return [builder.pair(data["caption"], data["image"], task,
                             learn_text=cfg.learn_creation_text if task == "creation" else True)
                for task in cfg.pair_tasks]
    turns = [Turn(t["role"], tuple(iter_items(t["items"]))) for t in data["turns"]]
    return [builder.conversation(turns)]


def shard_examples(batch: dict, store_uri: str, model_cfg_json: str, cfg: AssemblyConfig,
                   st: StorageConfig | None):
    """Ray Data UDF: shard ids -> batches of example rows (see the module docstring)."""
    builder = _builder(model_cfg_json)
    store = LatentStore(store_uri, st)
    for shard_id in batch["shard_id"]:
        lat = store.read_latents(shard_id).to_pydict()
        by_sha = {s: (c, m + v) for s, c, m, v in zip(lat["sha256"], lat["clip_u8"], lat["mean"], lat["logvar"])}
        rec = store.read_records(shard_id).to_pydict()
        rows = []
        for rid, ex in shard_record_examples(builder, zip(rec["id"], rec["type"], rec["data"]), by_sha, cfg,
                                             f"latent store {store_uri}: shard {shard_id}"):
            rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "image_keys": ex.image_keys,
                         "dream_keys": ex.dream_keys, "images": [by_sha[k][0] for k in ex.image_keys],
                         "latents": [by_sha[k][1] for k in ex.dream_keys],
                         "shard_id": shard_id, "record_id": rid})
            if len(rows) == ROWS_PER_BATCH:
                yield _to_arrow(rows)
                rows = []
        if rows:
            yield _to_arrow(rows)


def shard_record_examples(builder, records, images, cfg: AssemblyConfig, where: str):
    """(record id, Example) of a shard's records, in shard order: the one join of records with their images.

    `records`: (id, type, normalised JSON) in shard order; `images`: the shard's image keys (sha256), a set
    or a mapping. Both data paths use it: the latent store (`shard_examples`) and the streaming feed
    (`streaming.py`). An example referencing an image the shard lacks is corruption (the reader keeps a
    record only with its images): ValueError naming `where` and the record.
    """
    for rid, rtype, data in records:
        if rtype not in cfg.record_types:
            continue
        for ex in record_examples(builder, rtype, json.loads(data), cfg):
            missing = [k for k in ex.image_keys + ex.dream_keys if k not in images]
            if missing:
                raise ValueError(f"{where} record {rid} references images without latents: {missing[:3]}")
            yield rid, ex


def _to_arrow(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=example_schema())


def example_schema(*extra):
    """The example rows' arrow schema (module docstring), plus `extra` (name, type) fields."""
    import pyarrow as pa

    # An explicit schema: empty key lists must still be list<string>, not list<null>.
    return pa.schema([("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64())),
                      ("image_keys", pa.list_(pa.string())), ("dream_keys", pa.list_(pa.string())),
                      ("images", pa.list_(pa.binary())), ("latents", pa.list_(pa.binary())),
                      ("shard_id", pa.string()), ("record_id", pa.string()), *extra])


def training_dataset(store_uri: str, model_cfg: DreamLLMConfig, cfg: AssemblyConfig | None = None,
                     st: StorageConfig | None = None, num_cpus: float = 0.5):
    """A lazy, streaming Ray Dataset of example rows from the committed shards of a latent store.

    Checks that the store was built for this model's VAE resolution, latent shape and CLIP size (two
    flavors can share image sizes but not their VAE's downsampling).
    `num_cpus` per assembly task: keep it below what the trainer leaves free, or
    the tasks never schedule (ENVIRONMENT.md). Shuffle with
    `iter_torch_batches(local_shuffle_buffer_size=...)` or `ds.random_shuffle()`.
    """
    import ray

    cfg = cfg or AssemblyConfig()
    manifest = LatentStore(store_uri, st).manifest()
    shards = [sid for sid in manifest if not cfg.sources or sid.split("/", 1)[0] in cfg.sources]
    if not shards:
        raise ValueError(f"latent store {store_uri} has no committed shards"
                         + (f" of sources {list(cfg.sources)}" if cfg.sources else "")
                         + ": run jobs/precompute_latents.py first")
    d = model_cfg.diffusion
    want = {"vae_resolution": d.resolution, "clip_size": model_cfg.vision.image_size,
            "latent_shape": [d.latent_channels, d.latent_size, d.latent_size]}
    for sid in shards:
        got = {k: manifest[sid].get(k) for k in want}
        if not got["latent_shape"]:  # a shard without images records no shape
            got["latent_shape"] = want["latent_shape"]
        if got != want:
            raise ValueError(f"latent store {store_uri} shard {sid} was built for {got}, but the model needs "
                             f"{want}: rerun precompute with this model's flavor")
    model_json = json.dumps(dataclasses.asdict(model_cfg))
    ds = ray.data.from_items([{"shard_id": s} for s in shards], override_num_blocks=len(shards))
    return ds.map_batches(shard_examples, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                          fn_kwargs={"store_uri": store_uri, "model_cfg_json": model_json, "cfg": cfg, "st": st})


class ExampleCollator(NumpyBatchCollateFn):
    """`collate_fn` for `iter_torch_batches`: a batch of example rows -> `dreamllm.sequence.collate` output.

    Returns input_ids, labels, position_ids (B, L); pixel_values (N_img, 3, S, S)
    CLIP-normalised; latent_mean and latent_logvar (N_dream, C, h, w) float32.
    `length` pads every batch to a fixed L (default: the longest row). With `pack`,
    the batch's examples are first-fit packed into rows of `length` (default: the
    context length), positions restarting per example, so B is the number of rows.
    """

    def __init__(self, model_cfg: DreamLLMConfig, length: int | None = None, pack: bool = False):
        from dreamllm.tokenizer import build_tokenizer, special_ids

        self.pad_id = special_ids(build_tokenizer(model_cfg.tokenizer), model_cfg.tokenizer).pad
        self.clip_size = model_cfg.vision.image_size
        self.channels = model_cfg.diffusion.latent_channels
        self.length = length or (model_cfg.llm.context_length if pack else None)
        self.pack = pack

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        import torch
        from PIL import Image

        from dreamllm.images import clip_pixels
        from dreamllm.sequence import Example, collate, pack

        S, C = self.clip_size, self.channels
        rows, pixels, latents = [], {}, {}
        for i in range(len(batch["input_ids"])):
            ik, dk = list(batch["image_keys"][i]), list(batch["dream_keys"][i])
            rows.append([Example(list(map(int, batch["input_ids"][i])), list(map(int, batch["labels"][i])), ik, dk)])
            for k, b in zip(ik, batch["images"][i]):
                if k not in pixels:
                    pixels[k] = clip_pixels(Image.fromarray(np.frombuffer(b, np.uint8).reshape(S, S, 3)), S)
            for k, b in zip(dk, batch["latents"][i]):
                if k not in latents:
                    a = np.frombuffer(b, np.float16).astype(np.float32)
                    side = int(round((a.size // (2 * C)) ** 0.5))
                    latents[k] = torch.from_numpy(a.reshape(2, C, side, side))
        if self.pack:
            examples = [r[0] for r in rows]
            rows = [[examples[i] for i in sorted(b)] for b in pack([len(e) for e in examples], self.length)]
        return collate(rows, self.pad_id, self.length, pixels=pixels, latents=latents)
