"""Fixtures of the model-library tests: the debug flavor, its tokenizer, fresh models and a batch."""
import pytest
import torch

from dreamllm.config import get_flavor
from dreamllm.model import DreamLLM
from dreamllm.sequence import Image, SequenceBuilder, Text, collate
from dreamllm.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def cfg():
    return get_flavor("debug")


@pytest.fixture(scope="session")
def tok(cfg):
    return build_tokenizer(cfg.tokenizer)


@pytest.fixture(scope="session")
def builder(tok, cfg):
    return SequenceBuilder(tok, cfg)


@pytest.fixture
def model(cfg, tok):
    """A fresh debug model (tests may train or mutate it)."""
    return DreamLLM.from_config(cfg, tok)


@pytest.fixture
def images(cfg):
    """Pixels and latent distributions for image keys a..d (fixed random values)."""
    g = torch.Generator().manual_seed(0)
    S, R = cfg.vision.image_size, cfg.diffusion.latent_size
    pixels = {k: torch.randn(3, S, S, generator=g) for k in "abcd"}
    latents = {k: torch.stack([torch.randn(4, R, R, generator=g), torch.full((4, R, R), -4.0)]) for k in "abcd"}
    return pixels, latents


@pytest.fixture
def batch(builder, images, tok):
    """A batch of one interleaved document, one comprehension pair and one creation pair."""
    doc = builder.document([Text("A red circle on a blue background."), Image("a"),
                            Text("Next, a green star at the top."), Image("b")])
    comp = builder.pair("a yellow square", "c", "comprehension")
    crea = builder.pair("a purple ring", "d", "creation")
    pixels, latents = images
    return collate([[doc], [comp, crea]], tok.pad_token_id, pixels=pixels, latents=latents)
