"""Precompute VAE latents: read MMC4 / LAION / LLaVA shards, filter, encode on a Ray actor pool, write the store.

    python jobs/precompute_latents.py [--config configs/precompute.yaml] [--set flavor=debug] ...
    ray job submit --working-dir . -- python jobs/precompute_latents.py --config configs/precompute_7b.yaml

With no arguments: a local Ray, the synthetic set written to outputs/synthetic
if missing, the store in outputs/latent_store. Re-running skips completed shards.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.data.config import PrecomputeConfig  # noqa: E402
from dreamllm_platform.data.latents import ShardsFailed, run_precompute  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(PrecomputeConfig, argv, __doc__)
    try:
        summary = run_precompute(cfg)
    except ShardsFailed as e:  # the other shards are committed; a rerun redoes only these
        print("\n" + e.summary.format())
        print(f"precompute failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"precompute failed: {e}", file=sys.stderr)
        return 1
    print("\n" + summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
