"""Driver memory of the precompute job over many small shards (a measurement, not a test).

    python bench/precompute_memory.py [--shards 300] [--work outputs/bench_precompute_memory]

Writes `--shards` tiny MMC4 shards (the synthetic generator, debug flavor), runs the job on a local
Ray and samples the driver's resident memory every 0.2 s; prints the RSS before the pipeline, the
peak, and the RSS at each quarter of the shards committed (flat = bounded by shards in flight).
"""
import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from dreamllm_platform.data import store as store_mod  # noqa: E402
from dreamllm_platform.data.config import EncoderConfig, PrecomputeConfig, SourceConfig, SyntheticConfig  # noqa: E402
from dreamllm_platform.data.latents import run_precompute  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=300)
    ap.add_argument("--work", default="outputs/bench_precompute_memory")
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    syn = SyntheticConfig(image_size=48, mmc4_shards=args.shards, docs_per_shard=2, scenes_per_doc=2,
                          webdataset_shards=0, parquet_shards=0, pairs_per_shard=0, conversations=0, instruct_docs=0)
    cfg = PrecomputeConfig(flavor="debug", data_root=str(work / "data"), output=str(work / "store"), synthetic=syn,
                           sources={"mmc4": SourceConfig("mmc4", "mmc4", "mmc4/images")},
                           encoder=EncoderConfig(batch_size=16), ray_num_cpus=args.num_cpus)
    proc = psutil.Process()
    samples: list[tuple[float, int, int]] = []  # (time, rss, shards committed)
    done = threading.Event()
    committed = [0]
    commit = store_mod.LatentStore.commit

    def counting_commit(self, *a, **k):
        committed[0] += 1
        return commit(self, *a, **k)

    store_mod.LatentStore.commit = counting_commit

    def sample():
        while not done.is_set():
            samples.append((time.time(), proc.memory_info().rss, committed[0]))
            time.sleep(0.2)

    start_rss = proc.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    summary = run_precompute(cfg)
    done.set()
    mib = 2**20
    print(f"shards {summary.shards_total}, committed now {summary.shards_done}, images {summary.images_encoded}, "
          f"{summary.seconds:.0f} s")
    print(f"driver RSS before: {start_rss / mib:.0f} MiB, peak: {max(s[1] for s in samples) / mib:.0f} MiB")
    for q in (0.25, 0.5, 0.75, 1.0):
        at = next((s for s in samples if s[2] >= q * summary.shards_done), samples[-1])
        print(f"  RSS at {q:.0%} of the shards committed: {at[1] / mib:.0f} MiB")


if __name__ == "__main__":
    main()
