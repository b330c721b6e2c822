"""Open the dashboards: the MLflow UI on the pipeline's tracking store, and the Ray dashboard's address.

    python jobs/ui.py                                  the store of `make pipeline` (outputs/pipeline/mlflow.db)
    python jobs/ui.py --set root=outputs/pipeline-debug --set port=5001
    python jobs/ui.py --set tracking.tracking_uri=sqlite:///outputs/mlflow.db    the jobs' own default store

Prints the UI's URL (on 127.0.0.1) and the dashboard of each Ray running on this
machine, or how to start one with a dashboard; Ctrl-C stops the UI.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.dashboards import UiConfig, run_ui  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(UiConfig, argv, __doc__)
    try:
        return run_ui(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # no store, a port in use, a UI that died: one line
        print(f"ui failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
