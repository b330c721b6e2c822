"""What a synthetic-scene image shows, read back by a deterministic image analysis (no learned network).

Owns: `describe(image) -> SceneGuess`, which judges a created image against
the vocabulary of `dreamllm_platform.data.synthetic` (one shape of one colour
at one position on a plain background):

- background: the most common colour of the border pixels;
- foreground: the largest connected blob of pixels far from the background
  (specks and noise elsewhere are ignored), its edge then cut half-way
  between background and shape colour;
- colour: the named colour of COLORS that best explains the blob's core (its
  fifth farthest from the background) as mixes of that colour with the
  background, since JPEG and decoder blur blend thin strokes with it;
- shape: template matching: each of SHAPES is drawn with the synthetic set's
  own `draw_shape`, fitted to the blob's bounding box, and the best IoU wins;
- position: the POSITIONS centre nearest to the winning template's centre
  (a triangle's or star's centroid is not its drawing centre).

An image without such a blob (blank, or noise covering most of it) gives
None fields; a blob no template fits (IoU below `min_iou`) gives shape None.

Accuracy, measured on 300 held-out ground-truth renders saved as JPEG like
the training set (tests/dreamllm_platform/test_learning_check.py): at 64 px
colour, shape and position are all right; at 32 px colour 98%, shape 95%,
position 100% (the misses are 9-pixel rings, diamonds and stars, and thin
rings whose colour JPEG's chroma subsampling blends with the background).
Lossless renders are read exactly at both sizes.

Palette note: the closest named colours are yellow/orange (RGB distance 81),
purple/gray (98), magenta/purple (104), blue/purple (105), red/brown and
white/pink (108) and gray/brown (114); the colour misses above are mostly between
such pairs, and a washed-out created image is most easily misnamed there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..data.synthetic import COLORS, POSITIONS, SHAPES, draw_shape

FOREGROUND_DISTANCE = 48.0
"""RGB distance from the background above which a pixel is foreground (the closest palette pair is 81 apart)."""
MIN_AREA, MAX_AREA = 0.01, 0.5
"""The blob's share of the image: smaller is a speck, larger is not one shape on a background (a small
triangle covers about 4%, a large square about 23%)."""

_NAMES = sorted(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], np.float64)
_POS_NAMES = sorted(POSITIONS)
_POS_CENTRES = np.array([POSITIONS[n] for n in _POS_NAMES], np.float64)


@dataclass(frozen=True)
class SceneGuess:
    """What `describe` read from an image; None where it could not tell."""

    color: str | None
    """Named colour of the shape."""
    shape: str | None
    """Best-matching shape (None when no template reaches `min_iou`)."""
    position: str | None
    """Named position nearest the shape's centre."""
    background: str
    """Named colour nearest the background."""
    area: float
    """Share of the image covered by the shape's blob (0 when there is none)."""
    shape_iou: float
    """IoU of the blob and the best template (0 when there is no blob)."""


def nearest_color(rgb) -> str:
    """The name in COLORS nearest (Euclidean RGB) to `rgb`."""
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float64)) ** 2).sum(1)))]


def nearest_position(x: float, y: float) -> str:
    """The name in POSITIONS whose centre is nearest to (x, y), both as fractions of the image side."""
    return _POS_NAMES[int(np.argmin(((_POS_CENTRES - (x, y)) ** 2).sum(1)))]


def _background(rgb_HW3: np.ndarray) -> np.ndarray:
    """Median colour of the border pixels in the most common coarse colour bin (step 32 per channel)."""
    border = np.concatenate([rgb_HW3[0], rgb_HW3[-1], rgb_HW3[1:-1, 0], rgb_HW3[1:-1, -1]])
    bins = (border // 32).astype(np.int64) @ np.array([64, 8, 1])
    values, counts = np.unique(bins, return_counts=True)
    return np.median(border[bins == values[np.argmax(counts)]], axis=0)


def _mixed_color(pixels_N3: np.ndarray, bg: np.ndarray) -> str:
    """The named colour of a shape whose pixels are blended with the background (JPEG chroma subsampling
    and decoder blur do this to thin strokes): a pixel is a mix a*c + (1-a)*bg with a >= 1/2 of its colour c.
    Each name c scores the median distance of the pixels to that mixing segment, plus a tenth of their
    median distance to c itself (which breaks ties of colours on one line through the background, e.g.
    gray and black on white)."""
    span_C3 = _PALETTE - bg
    v_N13 = pixels_N3[:, None, :] - bg
    a_NC = ((v_N13 * span_C3).sum(-1) / np.maximum((span_C3 ** 2).sum(-1), 1e-9)).clip(0.5, 1.0)
    off_segment = np.linalg.norm(v_N13 - a_NC[..., None] * span_C3, axis=-1)
    to_color = np.linalg.norm(pixels_N3[:, None, :] - _PALETTE, axis=-1)
    return _NAMES[int(np.argmin(np.median(off_segment, 0) + 0.1 * np.median(to_color, 0)))]


def _template(shape: str, size: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    img = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, 255)
    return np.asarray(img) > 0


@functools.lru_cache(maxsize=None)
def _extent(shape: str) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, x1, y0, y1) relative to its drawing centre, in units of r."""
    r, c = 1000.0, 1500.0
    ys, xs = np.nonzero(_template(shape, (3000, 3000), c, c, r))
    return (xs.min() - c) / r, (xs.max() + 1 - c) / r, (ys.min() - c) / r, (ys.max() + 1 - c) / r


def _fit(blob_HW: np.ndarray, shape: str) -> tuple[float, float, float]:
    """(IoU, cx, cy) of `shape` drawn to fill the blob's bounding box, best over small scales and half-pixel
    shifts (at 32 px the bounding box is only known to about a pixel)."""
    size = blob_HW.shape[::-1]
    ys, xs = np.nonzero(blob_HW)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    ex0, ex1, ey0, ey1 = _extent(shape)
    r0 = ((x1 - x0) / (ex1 - ex0) + (y1 - y0) / (ey1 - ey0)) / 2
    best = (-1.0, 0.0, 0.0)
    for scale in (0.92, 1.0, 1.08):
        r = r0 * scale
        # The scaled template centred on the blob's bounding box, then shifted by half pixels around it.
        bx = (x0 + x1) / 2 - (ex0 + ex1) / 2 * r
        by = (y0 + y1) / 2 - (ey0 + ey1) / 2 * r
        for dx in (-0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                t = _template(shape, size, bx + dx, by + dy, r)
                iou = (t & blob_HW).sum() / max((t | blob_HW).sum(), 1)
                if iou > best[0]:
                    best = (float(iou), bx + dx, by + dy)
    return best


def _largest_blob(mask_HW: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask_HW` (all False when it is empty)."""
    labels, n = ndimage.label(mask_HW, structure=np.ones((3, 3)))
    if n == 0:
        return mask_HW
    sizes = ndimage.sum_labels(mask_HW, labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def describe(image: Image.Image, min_iou: float = 0.5) -> SceneGuess:
    """Read colour, shape and position of the one shape in a synthetic-style `image` (any size); a best
    template with IoU below `min_iou` leaves the shape None."""
    rgb = np.asarray(image.convert("RGB"), np.float64)
    H, W = rgb.shape[:2]
    bg = _background(rgb)
    dist_HW = np.sqrt(((rgb - bg) ** 2).sum(-1))
    blob = _largest_blob(dist_HW > FOREGROUND_DISTANCE)
    area = float(blob.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return SceneGuess(None, None, None, nearest_color(bg), area, 0.0)
    core = rgb[blob][dist_HW[blob] >= np.percentile(dist_HW[blob], 80)]
    color = _mixed_color(core, bg)
    # Edges blurred by JPEG or the decoder are part background: cut them half-way between the two colours.
    half_way = np.linalg.norm(np.median(core, axis=0) - bg) / 2
    blob = _largest_blob(dist_HW > max(FOREGROUND_DISTANCE / 2, half_way))
    fits = {s: _fit(blob, s) for s in SHAPES}
    shape = max(SHAPES, key=lambda s: fits[s][0])
    iou, cx, cy = fits[shape]
    return SceneGuess(color, shape if iou >= min_iou else None, nearest_position(cx / W, cy / H),
                      nearest_color(bg), area, iou)
