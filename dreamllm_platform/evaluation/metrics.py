"""Evaluation metrics: FID and CLIP score of generated images, and exact-match accuracy of answers.

Owns: loading the feature networks from a local or object-storage path (a
TorchScript Inception for FID, a transformers CLIP for CLIP score; nothing is
fetched from a hub), the Frechet distance of two feature sets, CLIP score
(100 x max(cos(image, text), 0), as torchmetrics defines it) and the answer
normalisation of exact match.

FID is computed here from features with scipy rather than with torchmetrics or
clean-fid: both need torchvision, which does not import beside this project's
CPU torch build.
"""
from __future__ import annotations

import io
import re
import string
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import storage
from ..storage import StorageConfig


# ------------------------------------------------------------------- FID

def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) of two (N, D) feature sets (N >= 2 each)."""
    from scipy import linalg

    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products warn; the finiteness check below handles them
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():
            # Singular products (fewer images than feature dimensions): regularise as pytorch-fid does.
            eps = np.eye(s_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real  # numerical error leaves tiny imaginary parts
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    return max(float(fid), 0.0)  # rounding can give -1e-6 for identical sets


class InceptionFeatures:
    """A TorchScript feature network called as `net(x, return_features=True)` on (N, 3, S, S) floats in [0, 255]."""

    def __init__(self, uri: str, image_size: int = 299, st: StorageConfig | None = None):
        try:
            self.net = torch.jit.load(io.BytesIO(storage.read_bytes(uri, st)), map_location="cpu").eval()
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"features.inception {uri} is not a TorchScript module: {first}") from None
        self.size = image_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = np.stack([np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC))
                          for im in images[i:i + batch_size]])
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
            out.append(self.net(x, return_features=True).reshape(len(x), -1).double().numpy())
        return np.concatenate(out)


# ------------------------------------------------------------- CLIP score

class ClipScorer:
    """CLIP score with a transformers CLIPModel and its tokenizer saved in one directory (local or s3://)."""

    def __init__(self, uri: str, st: StorageConfig | None = None):
        from transformers import AutoTokenizer, CLIPModel

        path = storage.download_dir(uri, Path(tempfile.gettempdir()) / "dreamllm-eval-features", st)
        try:
            self.model = CLIPModel.from_pretrained(path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"features.clip {uri} is not a saved CLIPModel with its tokenizer: "
                             f"{str(e).splitlines()[0]}") from None

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return out.pooler_output if hasattr(out, "pooler_output") else out

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], captions: list[str]) -> float:
        """Mean over pairs of 100 * max(cos(image_i, caption_i), 0)."""
        from dreamllm.images import clip_pixels

        size = self.model.config.vision_config.image_size
        pixels = torch.stack([clip_pixels(im, size) for im in images])
        text = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt",
                              max_length=self.model.config.text_config.max_position_embeddings)
        img = self._pooled(self.model.get_image_features(pixel_values=pixels))
        txt = self._pooled(self.model.get_text_features(input_ids=text["input_ids"],
                                                        attention_mask=text["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return float((100 * cos.clamp(min=0)).mean())


# ------------------------------------------------------------ exact match

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)
