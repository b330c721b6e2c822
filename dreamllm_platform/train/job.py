"""The command line of the stage jobs (jobs/align.py, jobs/igpt.py, jobs/sft.py)."""
from __future__ import annotations

import sys

from ..config import parse_job_args
from .config import STAGE_DEFAULTS, TrainConfig


def main(stage: str, argv=None, doc: str = "") -> int:
    """Parse `--config/--set` over the stage's defaults, train, print where everything went."""
    cfg = parse_job_args(TrainConfig, argv, doc, base=STAGE_DEFAULTS[stage])
    if cfg.stage != stage:
        print(f"config error: this job trains stage {stage!r}, the config says {cfg.stage!r}", file=sys.stderr)
        return 2
    from .trainer import run_stage

    try:
        r = run_stage(cfg)
    except ValueError as e:  # a user-caused problem (config, data): one line, no traceback
        print(f"{stage} failed: {e}", file=sys.stderr)
        return 1
    print(f"\nstage {stage} finished")
    print(f"  Ray run name       {r.run_name}")
    print(f"  last checkpoint    {r.checkpoint}")
    print(f"  exported model     {r.export_uri}")
    print(f"  MLflow run         {r.mlflow_run_id} ({r.tracking_uri})")
    final = {k: round(v, 4) for k, v in r.metrics.items() if isinstance(v, float)}
    print(f"  final metrics      {final}")
    return 0
