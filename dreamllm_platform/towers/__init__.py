"""Pretraining the towers of a flavor that has none offline: the image decoder (SD-style VAE, then UNet + text
encoder), the CLIP vision tower and the LLM, each a phase of one Ray Train job.

Owns, file by file as `train/` is laid out: the job's config (`config.py`),
the image-caption data on Ray Data (`data.py`) and what a worker draws from
it (`streams.py`), the losses (`objectives.py`), the one phase loop
(`loop.py`), the output folder (`export.py`) and the driver (`trainer.py`).
The output is a folder in the diffusers Stable Diffusion layout plus vision/
and llm/, which `dreamllm_platform.checkpoints.flavor_config` puts in place
of the flavor's random towers for the latent precompute and the stages.
"""
from .config import TowersConfig

__all__ = ["TowersConfig", "TowersResult", "run_towers_pretraining"]


def __getattr__(name: str):
    # The driver and the loop pull in diffusers, transformers and Ray Train; Ray Data's read tasks import
    # this package (for towers.data) and need none of it, so `trainer` is imported only when asked for.
    if name in ("TowersResult", "run_towers_pretraining"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
