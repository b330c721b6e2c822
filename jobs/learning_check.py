"""Show that training taught the model: trained vs untrained accuracy on held-out synthetic scenes, on MLflow.

    python jobs/learning_check.py [--config configs/learning_check.yaml] [--set model=models:/dreamllm@champion]
    python jobs/learning_check.py --set model=outputs/checkpoints/sft --set check.prompts=10

Comprehension: colour, shape and position questions about each scene's image
(greedy answer, exact match). Creation: an image from each scene's caption,
its colour, shape and position read back by a fixed image analysis. The
untrained model is the trained one's starting point (same frozen parts, the
flavor's LLM and fresh own parameters). Metrics `learning.*` and
`learning.untrained.*`, the table and some created images go on the run that
trained the model unless --set run_id=... names another.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.evaluation import LearningJobConfig, run_learning_check  # noqa: E402
from dreamllm_platform.tracking import tracking_uri  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(LearningJobConfig, argv, __doc__)
    try:
        r = run_learning_check(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad reference, missing checkpoint or run: one line
        print(f"learning check failed: {e}", file=sys.stderr)
        return 1
    print(f"\nchecked {r.model} in {r.seconds:.1f} s\n")
    print(r.result.table())
    where = "a new run (no training run found in this store)" if r.new_run else "the training run"
    print(f"\nlogged on {where}: MLflow run {r.run_id} ({tracking_uri(cfg.tracking)})")
    print("  metrics learning.* and learning.untrained.*, artifacts learning_check/ (table.txt, details.json, images)")
    if r.output:
        print(f"  files                {r.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
