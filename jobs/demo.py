"""Smoke run of DreamLLM on the embedded defaults: chat about an image, text-to-image, interleaved document.

    python jobs/demo.py [--config FILE] [--set flavor=debug] [--set checkpoint=DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.smoke import SmokeConfig, run_smoke  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(SmokeConfig, argv, __doc__)
    try:
        where = run_smoke(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    print("\nDreamLLM smoke run finished. Outputs:")
    for name, path in where.items():
        print(f"  {name:<50} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
