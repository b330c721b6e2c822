"""The front door from a generation request to `dreamllm.generation`: sampling settings and images.

Owns: the sampling values a request gets when it leaves them out
(`DEFAULTS`: 128 tokens, 25 denoising steps, guidance 7.5, DPM-Solver++),
building `TextSampling` / `ImageSampling` from a request's values, decoding a
request's image (base64 or a `data:image/...;base64,` URL, with a pixel cap)
and encoding an answer's image as base64 PNG (or JPEG / WebP). The pyfunc
model (`pyfunc_model`) and the Serve app (`serving/`) both go through here,
so the two front ends sample and encode alike.

dreamllm and PIL are imported inside the functions: the CPU ingress imports
this module for its defaults and stays free of torch.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for a sampling value it leaves out (the Serve app's `defaults:` start from these)."""

    max_tokens: int = 128
    """Generated tokens of a text answer."""
    steps: int = 25
    """Denoising steps of an image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight."""
    scheduler: str = "dpm++"
    """Diffusion sampler: 'ddim' or 'dpm++'."""


DEFAULTS = SamplingDefaults()


def image_sampling(steps: int | None = None, guidance_scale: float | None = None, scheduler: str | None = None,
                   negative_prompt: str | None = None, seed: int | None = None,
                   defaults: SamplingDefaults = DEFAULTS):
    """`ImageSampling` from a request's values; None takes `defaults`."""
    from dreamllm.generation import ImageSampling

    return ImageSampling(num_inference_steps=int(defaults.steps if steps is None else steps),
                         guidance_scale=float(defaults.guidance_scale if guidance_scale is None else guidance_scale),
                         scheduler=str(defaults.scheduler if scheduler is None else scheduler),
                         negative_prompt=str(negative_prompt or ""), seed=seed)


def text_sampling(max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  max_images: int = 0, seed: int | None = None, image=None, defaults: SamplingDefaults = DEFAULTS):
    """`TextSampling` from a request's values; None takes `defaults` (temperature 0: greedy, top_p 1), and
    `image` (an `ImageSampling`) that of `image_sampling()`."""
    from dreamllm.generation import TextSampling

    return TextSampling(max_new_tokens=int(defaults.max_tokens if max_tokens is None else max_tokens),
                        temperature=float(0.0 if temperature is None else temperature),
                        top_p=float(1.0 if top_p is None else top_p), max_images=int(max_images), seed=seed,
                        image=image if image is not None else image_sampling(defaults=defaults))


# ------------------------------------------------------------------ images

class ImageInputError(ValueError):
    """A request image that cannot be used; `code` is "invalid_image" or "image_too_large" (OpenAI's codes)."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def open_image(data: bytes, where: str, max_pixels: int | None = None):
    """An upright RGB PIL image (EXIF orientation applied) from encoded bytes (png, jpeg, webp, gif,
    bmp), refused above `max_pixels` before it is decoded."""
    from PIL import Image

    from dreamllm.images import upright_rgb

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
    except Exception:  # PIL raises several types for unreadable data; all mean the same to the caller
        raise ImageInputError(f"'{where}' is not a readable image (png, jpeg, webp, gif or bmp).") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageInputError(f"'{where}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels}.",
                              "image_too_large")
    try:
        img.load()  # decode here, so that bad pixel data is this error and not upright_rgb's
        return upright_rgb(img)  # the same orientation as the training images (dreamllm.images)
    except Exception:
        raise ImageInputError(f"'{where}' could not be decoded.") from None


def decode_image(data: Any, where: str, max_pixels: int | None = None):
    """An upright RGB PIL image from a PIL image, a base64 string or a `data:image/...;base64,` URL."""
    from PIL import Image

    from dreamllm.images import upright_rgb

    if isinstance(data, Image.Image):
        return upright_rgb(data)
    if not isinstance(data, str):
        raise ImageInputError(f"'{where}': expected a base64 image string, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"'{where}' is not valid base64.") from None
    return open_image(raw, where, max_pixels)


def encode_image(image, fmt: str = "png") -> str:
    """Base64 of `image` encoded as `fmt` ('png', 'jpeg' or 'webp'; anything else is PNG)."""
    buf = io.BytesIO()
    image.save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"))
    return base64.b64encode(buf.getvalue()).decode()


def data_url(image, fmt: str = "png") -> str:
    """`image` as a `data:image/<fmt>;base64,` URL."""
    return f"data:image/{fmt};base64,{encode_image(image, fmt)}"
