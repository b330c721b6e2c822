"""The precompute pipeline: source shards -> CPU read/filter/crop tasks -> VAE actor pool -> latent store.

Owns: planning which shards are pending (the manifest says which are done),
sizing the VAE actor pool from the cluster's resources, the VAE actor, and the
driver loop that commits each shard as soon as all of its images are encoded.

Ray Data plan (one row per pending shard):
  from_items(shards) -> map_batches(read_shard, CPU tasks)  rows: one per unique image + one 'end' row per shard
                     -> map_batches(VaeEncoder, ActorPoolStrategy)  mean/logvar added, VAE pixels dropped
                     -> driver: spill image and 'end' rows by shard to local disk; commit when the
                        'end' row and all images arrived (memory: one batch and one shard, however many are open)
The 'end' row carries the shard's records and drop report, so nothing is
staged on storage and a shard is committed whole or not at all.

Deduplication across shards and runs happens at commit: pair and document
shards commit in reading order (plan order; a shard that ends early waits,
spilled, for the earlier ones), each against the images of the shards before
it and of the store's committed shards (`RunDedupe`). A pair whose image an
earlier pair has is dropped (`duplicate_image`); a document using an image an
earlier document uses is kept and counted (`shared_image_in_document`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pickle
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dreamllm.config import get_flavor

from .. import storage
from ..runtime import Resources, cluster_resources, init_ray
from ..storage import StorageConfig
from .config import SHARD_SUFFIXES, EncoderConfig, PrecomputeConfig, SourceConfig
from .filters import Report
from .readers import StorageReadError
from .shards import ShardReader
from .store import LatentStore
from .synthetic import synthetic_exists, write_synthetic

READ_TASK_MEMORY = 512 * 2**20  # bytes per read task: a worker with torch imported holds ~270 MiB already
ROWS_PER_BATCH = 32  # image rows per block out of a read task: small blocks keep the pool busy early


# ------------------------------------------------------------------ planning

@dataclass(frozen=True)
class ShardTask:
    shard_id: str
    source: str
    uri: str
    config_hash: str


def resolved_sources(cfg: PrecomputeConfig) -> dict[str, SourceConfig]:
    """Enabled sources with URIs resolved against data_root."""
    return {name: dataclasses.replace(s, uri=cfg.source_uri(s.uri), images=cfg.source_uri(s.images))
            for name, s in cfg.sources.items() if s.enabled}


def plan_shards(cfg: PrecomputeConfig) -> list[ShardTask]:
    """Every shard of every enabled source, with its store id `<source>/<path under the source, no suffix>`,
    in reading order (sources in config order, then shards sorted by URI)."""
    tasks = []
    for name, src in resolved_sources(cfg).items():
        suffixes = SHARD_SUFFIXES[src.format]
        shards = storage.list_files(src.uri, suffixes, cfg.storage)
        if not shards:
            print(f"warning: source {name!r}: no {'/'.join(suffixes)} shards under {src.uri}")
        if src.format == "mmc4" and src.images and src.images_pattern is None:
            print(f"warning: source {name!r} has no images_pattern: every task indexes every tar under "
                  f"{src.images} (set e.g. images_pattern: 'shard_{{n}}.tar' to read only each shard's own)")
        h = cfg.shard_config_hash(src)
        for uri in shards:
            src.images_tar(uri)  # a shard the naming rule cannot name fails the plan, not a task
            rel = uri[len(src.uri):].strip("/") if uri.startswith(src.uri.rstrip("/") + "/") else storage.basename(uri)
            rel = next(rel[: -len(s)] for s in suffixes if rel.endswith(s))
            tasks.append(ShardTask(f"{name}/{rel}", name, uri, h))
    return tasks


@dataclass(frozen=True)
class PoolPlan:
    """Resources of the VAE actors and read tasks (see `plan_pool`)."""

    size: int
    cpus_per_actor: float
    gpus_per_actor: float
    read_cpus: float

    @property
    def threads_per_actor(self) -> int:
        """torch intra-op threads of each actor: its CPU share, at least one."""
        return max(1, round(self.cpus_per_actor))


def plan_pool(res: Resources, enc: EncoderConfig) -> PoolPlan:
    """Size the VAE pool so that read tasks always have CPUs left.

    On a 2-CPU Ray a pool holding both CPUs starves the read tasks and the
    pipeline hangs silently (ENVIRONMENT.md). GPU clusters: one actor per GPU,
    each with a small CPU share. CPU clusters: a quarter of the CPUs become
    actors (at least one), together holding at most half of the CPUs.
    """
    read_cpus = min(enc.read_cpus, max(res.cpus / 2, 0.1))
    if res.gpus >= 1:
        size = enc.pool_size or int(res.gpus)
        gpus = 1.0
        cpus = enc.cpus_per_actor or min(1.0, res.cpus / (2 * size))
    else:
        size = enc.pool_size or max(1, int(res.cpus // 4))
        gpus = 0.0
        cpus = enc.cpus_per_actor or min(1.0, res.cpus / (2 * size))
    if size * cpus + read_cpus > res.cpus + 1e-9 or size * gpus > res.gpus + 1e-9:
        raise ValueError(f"encoder pool of {size} actors x {cpus} CPU / {gpus} GPU plus a {read_cpus}-CPU read task "
                         f"does not fit the cluster ({res.cpus} CPU, {res.gpus} GPU): lower encoder.pool_size "
                         f"or encoder.cpus_per_actor")
    return PoolPlan(size, cpus, gpus, read_cpus)


# --------------------------------------------------------------- Ray stages

def read_shard(batch: dict, cfg: PrecomputeConfig):
    """CPU task: one shard row -> blocks of image rows (VAE and CLIP crops), then the shard's 'end' row.

    A storage error (`readers.StorageReadError`) restarts the shard with a fresh reader after a
    back-off, up to `encoder.read_retries` times; images already sent are not sent again (by sha256).
    When every attempt fails the 'end' row says `failed` and the driver commits nothing for the shard.
    """
    model = get_flavor(cfg.flavor)  # crop sizes only: a trained decoder keeps the flavor's resolution
    sources = resolved_sources(cfg)
    for shard_id, source, uri in zip(batch["shard_id"], batch["source"], batch["uri"]):
        sent: set[str] = set()  # sha256 of the image rows yielded so far, over all attempts
        end: dict = {}
        for attempt in range(cfg.encoder.read_retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
            rows: list[dict] = []
            try:
                reader = ShardReader(sources[source], uri, cfg.filters, model.diffusion.resolution,
                                     model.vision.image_size, cfg.storage)
                for img in reader.images():
                    if img["sha256"] in sent:
                        continue
                    rows.append({"shard_id": shard_id, "kind": "image", "payload": b"", **img})
                    if len(rows) == ROWS_PER_BATCH:
                        sent.update(r["sha256"] for r in rows)
                        yield _columns(rows)
                        rows = []
            except StorageReadError as e:
                print(f"shard {shard_id}: attempt {attempt + 1}/{cfg.encoder.read_retries + 1}: {e}")
                end = {"failed": str(e)}
                continue
            end = {"records": reader.records, "report": reader.report.to_dict()}
            break
        if "failed" in end:
            rows = []  # the failed attempt's unsent rows
        end["num_images"] = len(sent) + len(rows)  # image rows the driver receives for this shard
        rows.append({"shard_id": shard_id, "kind": "end", "sha256": "", "vae_u8": b"", "clip_u8": b"",
                     "payload": json.dumps(end).encode()})
        yield _columns(rows)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class VaeEncoder:
    """Actor: the frozen VAE encoder, on the actor's GPU with autocast when there is one.

    Every forward runs on exactly `batch_size` images (zero-padded), so an
    image's latents do not depend on which images shared its batch: results
    are identical however Ray Data cuts blocks, on re-runs and resumed runs.
    """

    def __init__(self, flavor: str, decoder: str | None, st: StorageConfig, batch_size: int, autocast: str,
                 num_threads: int):
        import torch

        from dreamllm.components import build_vae

        from ..checkpoints import flavor_config

        torch.set_num_threads(num_threads)  # the actor owns a CPU share, not the whole machine
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        diffusion = flavor_config(flavor, decoder, st).diffusion  # the trained decoder, fetched on this node
        self.vae = build_vae(diffusion).to(self.device)
        self.batch_size = batch_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast) if self.device == "cuda" else None
        self.res = diffusion.resolution

    def __call__(self, batch: dict) -> dict:
        from dreamllm.components import encode_latent_dist

        torch = self.torch
        is_img = np.asarray([k == "image" for k in batch["kind"]])
        idx = np.flatnonzero(is_img)
        means = [b""] * len(is_img)
        logvars = [b""] * len(is_img)
        B, R = self.batch_size, self.res
        for start in range(0, len(idx), B):
            part = idx[start:start + B]
            u8 = np.stack([np.frombuffer(batch["vae_u8"][i], np.uint8).reshape(R, R, 3) for i in part])
            # The same arithmetic as dreamllm.images.vae_pixels: x / 255 * 2 - 1.
            x = torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2.0 - 1.0
            x = torch.cat([x, x.new_zeros((B - len(part), *x.shape[1:]))]).to(self.device)
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype is not None):
                mean, logvar = encode_latent_dist(self.vae, x)
            mean = mean[: len(part)].float().cpu().numpy().astype(np.float16)
            logvar = logvar[: len(part)].float().cpu().numpy().astype(np.float16)
            for j, i in enumerate(part):
                means[i], logvars[i] = mean[j].tobytes(), logvar[j].tobytes()
        out = {k: v for k, v in batch.items() if k != "vae_u8"}
        out["mean"], out["logvar"] = means, logvars
        return out


# -------------------------------------------------------------------- driver

@dataclass
class Summary:
    """What a precompute run did; `report` sums every committed shard of the plan."""

    output: str
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    images_encoded: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    """shard id -> the storage error that failed every attempt: left uncommitted for the next run."""
    seconds: float = 0.0
    report: Report = field(default_factory=Report)
    latent_shape: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images_encoded / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        return "\n".join([
            f"latent store: {self.output}",
            f"shards: {self.shards_total} ({self.shards_done} processed now, {self.shards_skipped} already complete)",
            f"images encoded now: {self.images_encoded} in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)",
            *([f"failed on storage errors, uncommitted (a rerun redoes them): {len(self.shards_failed)}"]
              + [f"  {sid}: {err}" for sid, err in sorted(self.shards_failed.items())] if self.shards_failed else []),
            "all shards:", self.report.format(),
            f"report: {storage.join(self.output, 'report.json')}"])


def build_pipeline(cfg: PrecomputeConfig, pending: list[ShardTask], plan: PoolPlan):
    """The lazy Ray Dataset of encoded image rows and 'end' rows for `pending` shards."""
    import ray

    ds = ray.data.from_items([dataclasses.asdict(t) for t in pending], override_num_blocks=len(pending))
    # The memory reservation (one shard's bytes + decoded images) also makes the read stage's
    # resources differ from the actors', which keeps Ray Data from fusing the reads into the
    # actor pool: decoding would then run inside the few (GPU) actors, one shard at a time.
    ds = ds.map_batches(read_shard, batch_size=1, fn_kwargs={"cfg": cfg}, num_cpus=plan.read_cpus,
                        memory=READ_TASK_MEMORY)
    return encoder_stage(ds, VaeEncoder, cfg, plan)


def encoder_stage(ds, encoder_cls, cfg: PrecomputeConfig, plan: PoolPlan, **map_kwargs):
    """`ds` through the encoder actor pool `plan` sizes (the precompute's and the streaming mode's)."""
    import ray

    return ds.map_batches(encoder_cls, batch_size=cfg.encoder.batch_size,
                          compute=ray.data.ActorPoolStrategy(size=plan.size),
                          num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
                          fn_constructor_kwargs={"flavor": cfg.flavor, "decoder": cfg.decoder, "st": cfg.storage,
                                                 "batch_size": cfg.encoder.batch_size,
                                                 "autocast": cfg.encoder.autocast,
                                                 "num_threads": plan.threads_per_actor},
                          **map_kwargs)


def run_precompute(cfg: PrecomputeConfig) -> Summary:
    """Run the job on `cfg`: write the synthetic set if asked and missing, encode pending shards, write the report.

    Each shard is committed to the store as soon as its last image is encoded, so a
    killed run keeps every finished shard and the next run does only the rest. Raises
    `ShardsFailed` (after committing the rest and writing the report) when storage errors
    failed some shards on every attempt.
    """
    if cfg.synthetic.enabled and not synthetic_exists(cfg.data_root, cfg.storage):
        print(f"writing the synthetic data set to {cfg.data_root}")
        write_synthetic(cfg.data_root, cfg.synthetic, cfg.storage)

    from ..checkpoints import flavor_config  # lazily: read tasks import this module and need no model code

    model = flavor_config(cfg.flavor, cfg.decoder, cfg.storage)  # a decoder that is not there fails here, early
    store = LatentStore(cfg.output, cfg.storage)
    tasks = plan_shards(cfg)
    pending = [t for t in tasks if not store.is_complete(t.shard_id, t.config_hash)]
    summary = Summary(cfg.output, shards_total=len(tasks), shards_skipped=len(tasks) - len(pending))
    t0 = time.perf_counter()
    if pending:
        init_ray(cfg.ray_num_cpus)  # only now: a run with nothing to do needs no Ray
        plan = plan_pool(cluster_resources(), cfg.encoder)
        print(f"encoding {len(pending)} shards: {plan.size} VAE actor(s) x {plan.cpus_per_actor:g} CPU "
              f"{plan.gpus_per_actor:g} GPU, read tasks {plan.read_cpus:g} CPU")
        by_id = {t.shard_id: t for t in pending}
        meta = {"flavor": cfg.flavor, "decoder": cfg.decoder, "vae_resolution": model.diffusion.resolution,
                "clip_size": model.vision.image_size}
        ds = build_pipeline(cfg, pending, plan)
        dedupe = RunDedupe.from_store(store, cfg, pending)
        # Shards of a dedupe domain commit in reading order (a later shard waits, spilled, for the
        # earlier ones), so the first pair in reading order is the one kept whatever order tasks end in.
        queues = {d: collections.deque(t.shard_id for t in pending if _domain(cfg, t) == d) for d in DOMAINS}
        expected: dict[str, int] = {}  # shard id -> image rows its 'end' row announced
        ready: set[str] = set()

        def commit(sid: str) -> None:
            t, end, lat = by_id[sid], images.pop_end(sid), images.pop(sid)
            if "failed" in end:  # storage errors on every attempt: nothing is committed
                summary.shards_failed[sid] = end["failed"]
                return
            records, lat, report = dedupe.apply(end["records"], lat, end["report"])
            shape = _latent_shape(lat, model.diffusion.latent_channels)
            store.commit(sid, source_uri=t.uri, fmt=cfg.sources[t.source].format, config_hash=t.config_hash,
                         records=records, latents=lat, report=report, meta={**meta, "latent_shape": shape})
            summary.shards_done += 1

        with _Spill() as images:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.to_pylist()
                images.add([r for r in rows if r["kind"] == "image"])
                summary.images_encoded += sum(r["kind"] == "image" for r in rows)
                for row in rows:
                    if row["kind"] == "end":
                        images.put_end(row["shard_id"], row["payload"])
                        expected[row["shard_id"]] = json.loads(row["payload"])["num_images"]
                for sid in sorted({r["shard_id"] for r in rows}):
                    if sid not in expected or images.count(sid) != expected[sid]:
                        continue
                    del expected[sid]
                    queue = queues.get(_domain(cfg, by_id[sid]))
                    if queue is None:
                        commit(sid)
                        continue
                    ready.add(sid)
                    while queue and queue[0] in ready:
                        ready.discard(queue[0])
                        commit(queue.popleft())
            left = set(expected) | images.open_shards() | {sid for q in queues.values() for sid in q}
        if left:  # cannot happen unless a stage lost rows: fail loudly, nothing committed is lost
            raise RuntimeError(f"incomplete shards after the pipeline finished: {sorted(left)}")
    summary.seconds = time.perf_counter() - t0
    manifest = store.manifest()
    planned = {t.shard_id for t in tasks}
    for sid, entry in manifest.items():
        if sid in planned:
            summary.report.merge(entry)
            summary.latent_shape = summary.latent_shape or entry.get("latent_shape") or []
    if summary.shards_done or not storage.exists(store.report_uri, cfg.storage):
        store.write_report({**summary.report.to_dict(), "shards": sorted(planned), "output": cfg.output})
    if summary.shards_failed:
        raise ShardsFailed(summary)
    return summary


class ShardsFailed(RuntimeError):
    """Some shards failed on storage errors after every retry; every other shard is committed.
    `summary` is the run's; a rerun redoes only the failed (uncommitted) shards."""

    def __init__(self, summary: Summary):
        failed = summary.shards_failed
        super().__init__(f"{len(failed)} shard(s) failed on storage errors and were left uncommitted; rerun the "
                         f"job to redo them: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
        self.summary = summary


class _Spill:
    """The encoded image rows and 'end' rows of the shards in flight, kept on local disk (one
    append-only file per shard) until their shard is committed: the driver's memory holds one batch
    and the shard being committed, however many shards are open (Ray Data interleaves the rows of
    many shards) or wait for an earlier shard of their dedupe domain."""

    def __enter__(self) -> "_Spill":
        self.dir = Path(tempfile.mkdtemp(prefix="dreamllm-precompute-"))
        self.counts: dict[str, int] = {}
        self.ends: set[str] = set()
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _file(self, sid: str) -> Path:
        return self.dir / hashlib.sha256(sid.encode()).hexdigest()

    def add(self, rows: list[dict]) -> None:
        by_shard: dict[str, list[dict]] = {}
        for r in rows:
            by_shard.setdefault(r["shard_id"], []).append(r)
        for sid, part in by_shard.items():
            with open(self._file(sid), "ab") as f:  # opened per batch: no descriptor per open shard
                pickle.dump(part, f, protocol=pickle.HIGHEST_PROTOCOL)
            self.counts[sid] = self.counts.get(sid, 0) + len(part)

    def count(self, sid: str) -> int:
        return self.counts.get(sid, 0)

    def put_end(self, sid: str, payload: bytes) -> None:
        """The shard's 'end' row (its records and report), kept on disk until the shard commits."""
        self._file(sid).with_suffix(".end").write_bytes(payload)
        self.ends.add(sid)

    def pop_end(self, sid: str) -> dict:
        path = self._file(sid).with_suffix(".end")
        end = json.loads(path.read_bytes())
        path.unlink()
        self.ends.discard(sid)
        return end

    def pop(self, sid: str) -> list[dict]:
        """The shard's rows (this driver's own file), removed from the spill."""
        rows: list[dict] = []
        path = self._file(sid)
        if self.counts.pop(sid, 0):
            with open(path, "rb") as f:
                while True:
                    try:
                        rows += pickle.load(f)
                    except EOFError:
                        break
            path.unlink()
        return rows

    def open_shards(self) -> set[str]:
        return set(self.counts) | self.ends


# ------------------------------------------------------------ deduplication

DOMAINS = ("pair", "document")
"""Record types deduplicated (pairs) or counted (documents' shared images) across shards, in reading order."""
_DOMAIN_OF_FORMAT = {"webdataset": "pair", "laion_parquet": "pair", "mmc4": "document"}


def _domain(cfg: PrecomputeConfig, task: ShardTask) -> str | None:
    return _DOMAIN_OF_FORMAT.get(cfg.sources[task.source].format)


class RunDedupe:
    """Run-wide image sets in reading order (sources in config order, shards in plan order, records in
    shard order), seeded with the images of the store's committed shards that this run keeps.

    `apply` drops a pair whose image (sha256) an earlier pair has (`duplicate_image`; with
    filters.dedupe_images) and counts a document using an image an earlier document uses
    (`shared_image_in_document`: kept, the paper's interleaved data repeats images; its latent is stored
    in its own shard too, since assembly joins records with latents per shard). The driver calls it on
    each shard of a domain in plan order, so the result does not depend on which task ends first.
    What a store already holds comes first: a shard committed by an earlier run is never rewritten.
    """

    def __init__(self, pairs: set[str], documents: set[str], dedupe_pairs: bool, sample_keys: int):
        self.seen = {"pair": pairs, "document": documents}
        self.dedupe_pairs, self.sample_keys = dedupe_pairs, sample_keys

    @classmethod
    def from_store(cls, store: LatentStore, cfg: PrecomputeConfig, pending: list[ShardTask]) -> "RunDedupe":
        redo = {t.shard_id for t in pending}
        kept = [(sid, _DOMAIN_OF_FORMAT.get(e.get("format"))) for sid, e in store.manifest().items()
                if sid not in redo]
        kept = [(sid, d) for sid, d in kept if d is not None]
        seen: dict[str, set[str]] = {d: set() for d in DOMAINS}
        with ThreadPoolExecutor(max_workers=16) as pool:  # one small column read per committed shard
            for (_, d), shas in zip(kept, pool.map(store.image_shas, [sid for sid, _ in kept])):
                seen[d].update(shas)
        return cls(seen["pair"], seen["document"], cfg.filters.dedupe_images, cfg.filters.sample_keys)

    def apply(self, records: list, latents: list[dict], report: dict) -> tuple[list, list[dict], dict]:
        """A shard's (records, latent rows, report) with later duplicates dropped and counted."""
        rep = Report(sample_keys=self.sample_keys)
        rep.merge(report)
        kept, used, dropped = [], set(), 0
        for rid, rtype, data in records:
            shas = _record_images(rtype, json.loads(data))
            if rtype == "pair":
                if self.dedupe_pairs and shas[0] in self.seen["pair"]:
                    rep.drop("duplicate_image", rid)
                    dropped += 1
                    continue
                self.seen["pair"].add(shas[0])
            elif rtype == "document":
                if not self.seen["document"].isdisjoint(shas):
                    rep.count("shared_image_in_document")
                self.seen["document"].update(shas)
            used.update(shas)
            kept.append((rid, rtype, data))
        if dropped:
            rep.count("pairs_out", -dropped)
            n = len(latents)
            latents = [r for r in latents if r["sha256"] in used]  # not the images only dropped pairs used
            if len(latents) != n:
                rep.count("images_out", len(latents) - n)
        return kept, latents, rep.to_dict()


def _record_images(rtype: str, data: dict) -> list[str]:
    """Image shas a normalised record uses (see shards.py), in order."""
    if rtype == "pair":
        return [data["image"]]
    items = data.get("items", []) + [it for t in data.get("turns", []) for it in t["items"]]
    return [it["image"] for it in items if "image" in it]


def _latent_shape(rows: list[dict], channels: int) -> list[int] | None:
    """(C, h, w) of the fp16 latents (square latents), or None for a shard without images."""
    if not rows:
        return None
    side = int(round((len(rows[0]["mean"]) // 2 // channels) ** 0.5))
    return [channels, side, side]
