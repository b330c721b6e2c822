"""The smoke run: one model answering about an image, creating one, and writing an interleaved document.

Owns: the demo that the README's main command runs until the full pipeline
exists, and a quick end-to-end check of a checkpoint on any machine. It writes
every output under one folder and returns where each went.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage, ImageDraw

from dreamllm.checkpoint import load_checkpoint, save_checkpoint
from dreamllm.config import get_flavor
from dreamllm.generation import ImageSampling, TextSampling, chat, generate_document, text_to_image
from dreamllm.model import DreamLLM
from dreamllm.sequence import Image, Text, Turn


@dataclass
class SmokeConfig:
    """What the smoke run builds and where it writes."""

    flavor: str = "small"
    """Model flavor to build with random weights when no checkpoint is given ('debug' or 'small')."""
    checkpoint: str | None = None
    """A DreamLLM checkpoint directory to load instead of a random model."""
    output_dir: str = "outputs/demo"
    """Folder for the outputs (a timestamped subfolder is created)."""
    question: str = "What color is the shape?"
    """The chat question about the generated input image."""
    prompt: str = "A red circle on a blue background."
    """The text-to-image prompt."""
    document_prompt: str = "This document describes several scenes."
    """The start of the interleaved document."""
    steps: int = 10
    """Denoising steps per image."""
    seed: int = 0
    """Seed of all sampling."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def _input_image(size: int = 96) -> PILImage.Image:
    """A red circle on a blue background: the picture the chat asks about."""
    img = PILImage.new("RGB", (size, size), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    return img


def run_smoke(cfg: SmokeConfig) -> dict[str, str]:
    """Run chat, text-to-image and interleaved generation; returns {output name: path or text}."""
    out = Path(cfg.output_dir) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint:
        model = load_checkpoint(cfg.checkpoint)
    else:
        model = DreamLLM.from_config(get_flavor(cfg.flavor)).eval()
    where: dict[str, str] = {}
    image_s = ImageSampling(num_inference_steps=cfg.steps, seed=cfg.seed)

    question_image = _input_image()
    question_image.save(out / "chat_input.png")
    answer = chat(model, [Turn("user", (Image("q"), Text(cfg.question)))], {"q": question_image},
                  TextSampling(max_new_tokens=24, seed=cfg.seed))
    (out / "chat.json").write_text(json.dumps({"question": cfg.question, "answer": answer}, indent=2))
    where["chat input image"] = str(out / "chat_input.png")
    where["chat answer"] = str(out / "chat.json")

    text_to_image(model, [cfg.prompt], image_s)[0].save(out / "text_to_image.png")
    where["text-to-image"] = str(out / "text_to_image.png")

    parts = generate_document(model, cfg.document_prompt,
                              TextSampling(max_new_tokens=48, max_images=2, temperature=0.9, seed=cfg.seed,
                                           image=image_s))
    doc = []
    for i, p in enumerate(parts):
        if isinstance(p, str):
            doc.append({"text": p})
        else:
            p.save(out / f"document_image_{i}.png")
            doc.append({"image": f"document_image_{i}.png"})
    (out / "document.json").write_text(json.dumps({"prompt": cfg.document_prompt, "parts": doc}, indent=2))
    n_img = sum(1 for d in doc if "image" in d)
    # An untrained model rarely samples <dream_start>; a trained one places images itself.
    where[f"interleaved document ({len(doc) - n_img} text parts, {n_img} images)"] = str(out / "document.json")

    if not cfg.checkpoint:
        where["checkpoint of this model"] = str(save_checkpoint(model, out / "checkpoint"))
    return where
