"""Pretraining the image decoder of a flavor that has no pretrained one (SD-style VAE, then UNet + text encoder).

Owns: the job's config (`config.py`), the image-caption data on Ray Data
(`data.py`), and the Ray Train driver and loop (`train.py`). The output is a
directory in the diffusers Stable Diffusion layout that
`dreamllm_platform.checkpoints.flavor_config` puts in place of the flavor's
random decoder for the latent precompute and the training stages.
"""
from .config import DecoderConfig

__all__ = ["DecoderConfig", "DecoderResult", "run_decoder_pretraining"]


def __getattr__(name: str):
    # The driver and the loop pull in diffusers, transformers and Ray Train; Ray Data's read tasks import
    # this package (for decoder.data) and need none of it, so `train` is imported only when asked for.
    if name in ("DecoderResult", "run_decoder_pretraining"):
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
