"""Pretrain the towers of the small or debug flavor, none of which has pretrained weights offline: the image
decoder (SD-style VAE, then UNet + text encoder), the CLIP vision tower (contrastive) and the LLM (text).

    python jobs/pretrain_towers.py [--config configs/towers.yaml] [--set flavor=debug] [--set unet.steps=600]
    ray job submit --working-dir . -- python jobs/pretrain_towers.py --set data_root=s3://bucket/laion \\
        --set output=s3://bucket/towers/small

With no arguments: a local Ray, the synthetic set written to outputs/synthetic
if missing, the towers in outputs/towers/<flavor>. Train on your own
img2dataset shards by pointing `data_root`/`sources` at them. Resubmitting
resumes from the last checkpoint, and does nothing once the towers are
finished. Use the result with `--set decoder=<output>` (precompute) or
`--set model.decoder=<output>` (stages I-III).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.config import parse_job_args  # noqa: E402
from dreamllm_platform.towers import TowersConfig  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(TowersConfig, argv, __doc__)
    from dreamllm_platform.towers import run_towers_pretraining

    try:
        r = run_towers_pretraining(cfg)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # a user-caused problem: one line
        print(f"towers pretraining failed: {e}", file=sys.stderr)
        return 1
    print(f"\ntowers {'already finished' if r.skipped else 'trained'}")
    print(f"  towers             {r.output}")
    print(f"  MLflow run         {r.mlflow_run_id} ({r.tracking_uri})")
    print(f"  final metrics      { {k: round(v, 4) for k, v in r.metrics.items()} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
