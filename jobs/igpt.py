"""Stage II I-GPT pretraining: interleaved MMC4 documents + pairs, LLM unfrozen.

    python jobs/igpt.py [--config configs/igpt.yaml] [--set optim.max_steps=50]
    python jobs/igpt.py --set data.mode=streaming   # encode while training, no latent store
    ray job submit --working-dir . -- python jobs/igpt.py --config configs/igpt_7b.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout or a Ray working dir

from dreamllm_platform.train.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("igpt", doc=__doc__))
