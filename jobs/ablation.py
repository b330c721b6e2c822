"""The synergy ablation (the paper's Table 3 in miniature): joint learning vs comprehension-only vs
creation-only vs joint without interleaved documents, each over several seeds, on the pipeline's data.

    python jobs/ablation.py                                   the embedded defaults: 4 arms x 3 seeds, small flavor
    python jobs/ablation.py --set seeds=[0] --set pipeline.flavor=debug

Synthetic data, towers and latents come from the pipeline's steps, once,
under `root` (resubmitting skips every arm x seed that finished). Prints
mean ± standard deviation of every learning-check figure per arm, and logs
an MLflow parent run with one child per arm x seed, the table and a plot.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.ablation import AblationConfig  # noqa: E402
from dreamllm_platform.config import parse_job_args  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(AblationConfig, argv, __doc__)
    from dreamllm_platform.ablation import run_ablation

    try:
        r = run_ablation(cfg)
    except (ValueError, FileNotFoundError) as e:  # a user-caused problem: one line
        print(f"ablation failed: {e} (resubmit to resume)", file=sys.stderr)
        return 1
    print(f"\nablation finished in {r.seconds / 60:.1f} min; MLflow parent run {r.parent_run_id}; files in {r.files}\n")
    print(r.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
