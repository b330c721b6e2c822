"""The main job: synthetic shards -> towers -> latents -> stages I, II, III -> register -> evaluate -> promote -> serve
-> learning curve.

    python jobs/pipeline.py                                  the embedded defaults: small flavor, outputs/pipeline
    python jobs/pipeline.py --set flavor=debug --set root=outputs/pipeline-debug
    python jobs/pipeline.py --config configs/pipeline.yaml --set sft.optim.max_steps=400
    python jobs/pipeline.py --set keep_serving=true          keep the API up afterwards (Ctrl-C stops it)

Every step is also a job of its own (see dreamllm_platform/pipeline.py). A
resubmitted pipeline skips the steps it finished before; `--set force=true`
reruns them. It ends by printing where every output is and the learning curve (the check after every stage).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.pipeline import PipelineConfig, StepConfigs, run_pipeline, summary  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(PipelineConfig, argv, __doc__)
    try:
        steps = StepConfigs(cfg)  # every step's config is checked before anything runs
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        r = run_pipeline(cfg, steps)
    except (ValueError, FileNotFoundError) as e:  # a user-caused problem: one line; the state keeps what finished
        print(f"pipeline failed: {e} (resubmit to resume from the failed step)", file=sys.stderr)
        return 1
    total = sum(r.seconds.values())
    print(f"\nDreamLLM pipeline finished in {total / 60:.1f} min"
          + (f" (skipped, done earlier: {', '.join(r.skipped)})" if r.skipped else "") + ". Outputs:")
    for what, where in summary(steps.cfg, r):
        print(f"  {what:<42} {where}")
    if "learning" in r.results:
        print("\nLearning check after every stage (held-out scenes; ceiling: the towers' own figures):")
        print(r.results["learning"]["table"])
    if cfg.keep_serving and r.api:
        from dreamllm_platform.runtime import serve_until_stopped

        print(f"\nserving at {r.api} (playground: {r.api.removesuffix('/v1')}/) until Ctrl-C")
        serve_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
