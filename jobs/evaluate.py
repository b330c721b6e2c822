"""Evaluate a registered DreamLLM version on the held-out set and record the metrics on the version.

    python jobs/evaluate.py [--config configs/evaluate.yaml] [--set model=models:/dreamllm/3]
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml

Metrics: val_loss_lm, val_loss_diffusion, qa_exact_match, fid and clip_score
(the last two when features.inception / features.clip name the feature networks).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.evaluation import EvalConfig, run_evaluation  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(EvalConfig, argv, __doc__)
    try:
        r = run_evaluation(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad reference, missing set or feature network: one line
        print(f"evaluate failed: {e}", file=sys.stderr)
        return 1
    print(f"\nevaluated {r.model}" + (f" (version {r.version})" if r.version else "") + f" in {r.seconds:.1f} s")
    for k, v in sorted(r.metrics.items()):
        print(f"  {k:<20} {v:.6g}")
    for k, why in sorted(r.skipped.items()):
        print(f"  {k:<20} skipped: {why}")
    print(f"  held-out set         {cfg.heldout.root} (digest {r.dataset_digest})")
    if r.run_id:
        print(f"  logged on version    {r.version} (tags dreamllm.eval.*), MLflow run {r.run_id}")
        for f, uri in sorted(r.pictures.items()):
            print(f"  figure               {uri}")
    else:
        print("  not logged: the model is a checkpoint URI, not a registry reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
