"""Register an exported checkpoint as a new version of the registered model; it becomes the `candidate`.

    python jobs/register.py CHECKPOINT_URI [--run-id RUN] [--config configs/promote.yaml] [--set ...]
    python jobs/register.py s3://bucket/ray_results/dreamllm-sft-7b/export

The checkpoint's files are copied to the registry's store, named by their
content (`<store>/<model>/sha256-<digest>/`, `store` in configs/promote.yaml),
and the version points there: rerunning the stage, which overwrites
CHECKPOINT_URI, never changes what the version serves. The training run is
read from the checkpoint's metadata unless --run-id names one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import job_parser, parse_job  # noqa: E402
from dreamllm_platform.mlflow_tags import CHECKPOINT_URI_TAG, CONTENT_DIGEST_TAG, SOURCE_URI_TAG  # noqa: E402
from dreamllm_platform.model_registry import version_ref  # noqa: E402
from dreamllm_platform.registry import RegistryConfig, register  # noqa: E402
from dreamllm_platform.tracking import tracking_uri  # noqa: E402


def main(argv=None) -> int:
    parser = job_parser(__doc__)
    parser.add_argument("checkpoint", help="checkpoint URI (local dir, file://, s3://)")
    parser.add_argument("--run-id", help="MLflow run to link (default: the checkpoint's mlflow_run_id)")
    parser.add_argument("--who", help="who registers (default: the current user)")
    cfg, args = parse_job(parser, RegistryConfig, argv)
    try:
        mv, move = register(cfg, args.checkpoint, args.run_id, args.who)
    except (ValueError, FileNotFoundError) as e:
        print(f"register failed: {e}", file=sys.stderr)
        return 1
    print(f"registered {mv.name} version {mv.version} ({tracking_uri(cfg.tracking)})")
    print(f"  checkpoint     {mv.tags.get(CHECKPOINT_URI_TAG)} (sha256 {mv.tags.get(CONTENT_DIGEST_TAG)})")
    print(f"  copied from    {mv.tags.get(SOURCE_URI_TAG)}")
    print(f"  logged model   {mv.model_id} (pyfunc: mlflow.pyfunc.load_model('{version_ref(mv.name, mv.version)}'))")
    print(f"  training run   {mv.run_id or 'not linked'}")
    print(f"  alias          candidate -> v{mv.version} (was {move.previous or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
