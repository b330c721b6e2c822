"""Image preprocessing for the two image paths, in PIL + torch (no torchvision).

Owns: turning decoded bytes into an upright RGB image (`upright_rgb`: the EXIF
Orientation tag applied, as every viewer shows the photo; the data path and
serving both decode through it), turning a PIL image into (a) CLIP pixel values
for the vision tower and (b) VAE pixel values in [-1, 1] for latent encoding,
and back from VAE output to PIL. Both resize the short side and centre-crop,
as CLIP and SD do.

torch is imported inside the tensor functions: the CPU serving ingress decodes
request images through `upright_rgb` and stays free of torch.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def upright_rgb(image: Image.Image) -> Image.Image:
    """`image` rotated/flipped as its EXIF Orientation tag says, in RGB.

    Phone cameras store pixels sideways and set the tag; without this a portrait
    photo is trained on (and answered about) lying on its side. Unreadable EXIF
    leaves the pixels as stored: the image itself is fine.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF blocks raise several types from PIL's parser
        pass
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic) and centre-crop to size x size, in RGB."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP input: (3, size, size) float32, normalised with CLIP's mean and std."""
    import torch

    x = _to_tensor(resize_center_crop(image, size))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def vae_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """VAE input: (3, size, size) float32 in [-1, 1]."""
    return _to_tensor(resize_center_crop(image, size)) * 2.0 - 1.0


def to_pil(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1] to a list of RGB PIL images."""
    import torch

    x = ((images_B3HW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]
