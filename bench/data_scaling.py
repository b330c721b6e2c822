"""How the latent precompute scales with the corpus: Ray Data pipeline vs a naive loop, sizes growing 10x.

For each size (images) it writes a corpus in the real formats with the synthetic generator (half MMC4
documents with their image tars, half img2dataset webdataset pairs, `--per-shard` images a shard, so
1k / 10k / 100k images are 10 / 100 / 1000 shards), then, side by side on the same files:

- the naive loop: one process reads, filters, crops, encodes and commits to a latent store of its own
  (the job's output: latents, CLIP crops, records, manifest) shard after shard, with torch's
  intra-op threads set to the pipeline's encoder threads (actors x threads each: the fair baseline),
  or to `--naive-threads` (e.g. all the cores, the strict one);
- the Ray Data pipeline (`run_precompute`: read tasks + VAE actor pool) on a local Ray of `--cpus`
  CPUs, from a cold store (its actor start-up included, Ray's own start excluded).

It prints images/s of both and their ratio, wall time, and the driver's and the Ray workers' peak
resident memory (sampled every second; workers: the sum over `ray::` processes), and at the end the
fit wall = start-up + per-shard cost x shards over the sizes (linear growth = a constant per-shard
cost). `--storage s3` reads the same corpus from a loopback S3 server (moto) instead of local disk.
Writes `scaling.json` into the work folder. A measurement, not a test: no pass/fail.

    python bench/data_scaling.py --sizes 1000,10000 --storage local,s3
    python bench/data_scaling.py --sizes 100000 --storage local
"""
import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from bench.data_pipeline import naive_loop  # noqa: E402
from dreamllm_platform.data.config import (EncoderConfig, FilterConfig, PrecomputeConfig, SourceConfig,  # noqa: E402
                                           SyntheticConfig)
from dreamllm_platform.data.latents import plan_pool, plan_shards, run_precompute  # noqa: E402
from dreamllm_platform.data.store import LatentStore  # noqa: E402
from dreamllm_platform.data.synthetic import write_synthetic  # noqa: E402
from dreamllm_platform.runtime import Resources, init_ray  # noqa: E402

MIB = 2**20


class PeakRss:
    """Samples the driver's RSS and the summed RSS of this machine's `ray::` worker processes."""

    def __init__(self):
        self.driver = self.workers = 0
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.driver = max(self.driver, self._me.memory_info().rss)
            total = 0
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"] is not None:
                    total += p.info["memory_info"].rss
            self.workers = max(self.workers, total)
            time.sleep(1.0)  # more often costs the measured processes CPU (and the naive loop its GIL)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def corpus(size: int, per_shard: int) -> SyntheticConfig:
    """Half the images in MMC4 documents (4 scenes each), half in webdataset pairs, `per_shard` a shard."""
    shards = max(1, size // (2 * per_shard))
    return SyntheticConfig(image_size=48, mmc4_shards=shards, docs_per_shard=per_shard // 4, scenes_per_doc=4,
                           webdataset_shards=shards, parquet_shards=0, pairs_per_shard=per_shard,
                           conversations=0, instruct_docs=0)


def s3_server():
    """A loopback S3 endpoint (moto) with a bucket; the AWS variables point every process at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def measure(size: int, storage: str, args, work: Path) -> dict:
    syn = corpus(size, args.per_shard)
    local = work / f"data_{size}"
    if not (local / "_SUCCESS").exists():
        shutil.rmtree(local, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthetic(str(local), syn)
        print(f"  wrote the {size}-image corpus in {time.perf_counter() - t0:.0f} s")
    root = str(local)
    if storage == "s3":
        import s3fs

        root = f"s3://bench/data_{size}"
        fs = s3fs.S3FileSystem()
        if not fs.exists(f"{root}/_SUCCESS"):
            fs.put(str(local) + "/", root, recursive=True)
    sources = {"mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images", images_pattern="shard_{n}.tar"),
               "laion": SourceConfig("webdataset", "laion")}
    out = work / f"store_{size}_{storage}"
    shutil.rmtree(out, ignore_errors=True)
    # Global dedupe off: the naive loop dedupes within a shard only, so both sides encode the same images.
    cfg = PrecomputeConfig(flavor=args.flavor, data_root=root, output=str(out), sources=sources, synthetic=syn,
                           filters=FilterConfig(dedupe_images=False),
                           encoder=EncoderConfig(batch_size=16, pool_size=args.pool_size,
                                                 cpus_per_actor=args.cpus_per_actor),
                           ray_num_cpus=args.cpus)
    shards = len(plan_shards(cfg))
    plan = plan_pool(Resources(args.cpus, 0), cfg.encoder)
    encoder_threads = plan.size * plan.threads_per_actor
    naive_threads = args.naive_threads or encoder_threads
    torch.set_num_threads(naive_threads)
    naive_out = work / f"naive_store_{size}_{storage}"
    shutil.rmtree(naive_out, ignore_errors=True)
    with PeakRss() as naive_mem:
        n_naive, s_naive = naive_loop(cfg, LatentStore(str(naive_out)))
    with PeakRss() as ray_mem:
        summary = run_precompute(cfg)
    n_ray, s_ray = summary.images_encoded, summary.seconds
    stored = [sum(e["num_images"] for e in LatentStore(str(d)).manifest().values()) for d in (naive_out, out)]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(naive_out, ignore_errors=True)
    row = dict(size=size, storage=storage, shards=shards, actors=plan.size, encoder_threads=encoder_threads,
               naive_threads=naive_threads, naive_images=n_naive, naive_stored=stored[0], ray_stored=stored[1], naive_s=round(s_naive, 2),
               naive_ips=round(n_naive / s_naive, 1), ray_images=n_ray, ray_s=round(s_ray, 2),
               ray_ips=round(n_ray / s_ray, 1), ratio=round(s_naive / s_ray * n_ray / max(n_naive, 1), 3),
               driver_peak_mib=round(ray_mem.driver / MIB), workers_peak_mib=round(ray_mem.workers / MIB),
               naive_peak_mib=round(naive_mem.driver / MIB))
    if n_ray != n_naive:
        print(f"  note: the two sides encoded different counts ({n_ray} vs {n_naive})")
    print(f"  {size} images, {storage}, {shards} shards, {plan.size} actor(s) / {encoder_threads} encoder "
          f"thread(s) vs naive {naive_threads} thread(s): naive {row['naive_ips']} images/s ({s_naive:.1f} s), "
          f"Ray {row['ray_ips']} images/s ({s_ray:.1f} s), ratio x{row['ratio']:.2f}; peak RSS driver "
          f"{row['driver_peak_mib']} MiB, Ray workers {row['workers_peak_mib']} MiB (naive process "
          f"{row['naive_peak_mib']} MiB)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated corpus sizes in images")
    ap.add_argument("--storage", default="local", help="comma-separated: local, s3")
    ap.add_argument("--per-shard", type=int, default=100, help="images per shard")
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's CPUs and the naive loop's threads")
    ap.add_argument("--pool-size", type=int, default=0, help="VAE actors (0: the job's own sizing)")
    ap.add_argument("--cpus-per-actor", type=float, default=0.0, help="0: the job's own sizing")
    ap.add_argument("--naive-threads", type=int, default=0, help="0: the pipeline's encoder threads")
    ap.add_argument("--work", default=".tmp/bench_data_scaling")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    storages = args.storage.split(",")
    server = s3_server() if "s3" in storages else None  # before Ray starts: its workers inherit the variables
    init_ray(num_cpus=args.cpus)
    print(f"== latent precompute scaling, flavor {args.flavor}, {args.cpus} CPUs, {args.per_shard} images/shard ==")
    rows = []
    for storage in storages:
        for size in [int(s) for s in args.sizes.split(",")]:
            rows.append(measure(size, storage, args, work))
            (work / "scaling.json").write_text(json.dumps(rows, indent=1))
    for storage in storages:
        r = [x for x in rows if x["storage"] == storage]
        if len(r) >= 2:  # wall = start-up + per-shard cost x shards, least squares over the sizes
            per_shard, start = np.polyfit([x["shards"] for x in r], [x["ray_s"] for x in r], 1)
            n_per_shard, n_start = np.polyfit([x["shards"] for x in r], [x["naive_s"] for x in r], 1)
            print(f"{storage}: Ray wall = {start:.1f} s + {per_shard:.3f} s/shard; naive = {n_start:.1f} s + "
                  f"{n_per_shard:.3f} s/shard")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
