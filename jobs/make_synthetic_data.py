"""Write the synthetic coloured-shapes set in the real formats (MMC4, img2dataset, LLaVA, instruction docs).

    python jobs/make_synthetic_data.py [--set data_root=s3://bucket/prefix] [--set synthetic.defects=true]

Uses the `data_root`, `synthetic` and `storage` sections of the precompute config;
rewrites the set even when one is already there.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.data.config import PrecomputeConfig  # noqa: E402
from dreamllm_platform.data.synthetic import write_synthetic  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(PrecomputeConfig, argv, __doc__)
    try:
        root = write_synthetic(cfg.data_root, cfg.synthetic, cfg.storage)
    except (ValueError, OSError) as e:
        print(f"writing the synthetic set failed: {e}", file=sys.stderr)
        return 1
    print(f"synthetic data set written to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
