"""Clip-level augmentations: one random draw per clip, applied to every frame alike.

Shape legend: T frames, H x W pixels, C = 3 colour channels, S output side
(pixels), N = gh * gw tokens of a gh x gw patch grid, D token width.

A clip's frames must move together: a crop or flip that changed from frame
to frame would be spurious motion the temporal model would learn to predict.
So every function here takes the random draw (a box, a flag) as an argument,
drawn once per clip by the caller from a seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Tries at drawing a box that fits before falling back to a centre crop (torchvision's choice).
_CROP_TRIES = 10


@dataclass(frozen=True, slots=True)
class CropBox:
    """A crop in pixels (or grid cells) of the source: rows top:top+height, columns left:left+width."""

    top: int
    left: int
    height: int
    width: int


def random_resized_crop_box(
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> CropBox:
    """Draw a box covering a `scale` fraction of the area with aspect (w/h) in `ratio`.

    The aspect is drawn log-uniformly, as in torchvision's RandomResizedCrop.
    After a few draws that do not fit, falls back to the largest centred box
    whose aspect lies in `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w)
    return center_crop_box(height, width, ratio=ratio)


def even_crop_box(box: CropBox) -> CropBox:
    """The box with top/left rounded down and height/width rounded down to even numbers (at least 2).

    4:2:0 video stores one chroma sample per 2x2 pixels, so a crop that cuts
    it without resampling must start and end on even rows and columns. The
    result moves each edge by at most one pixel (a side never drops below 2).
    """

    def even(start: int, length: int) -> tuple[int, int]:
        lo = start - start % 2
        hi = start + length
        hi -= hi % 2
        return lo, max(2, hi - lo)

    top, height = even(box.top, box.height)
    left, width = even(box.left, box.width)
    return CropBox(top, left, height, width)


def center_crop_box(height: int, width: int, *, ratio: tuple[float, float] = (1.0, 1.0)) -> CropBox:
    """The largest centred box whose aspect (w/h) is clamped into `ratio`; (1, 1) is a centred square."""
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def crop_resize_frames(frames_THWC: np.ndarray | Tensor, box: CropBox, size: int, *, flip: bool) -> Tensor:
    """Crop every frame to `box`, resize to size x size, optionally mirror: uint8 (T, 3, S, S).

    Resizing is bilinear with antialiasing on uint8 directly (PyTorch's
    fast uint8 path; within 1 grey level of the float computation). The
    result may have channels-last strides: stacking clips into a batch
    makes the one contiguous copy, instead of a copy here and another there.
    """
    frames = torch.as_tensor(frames_THWC)
    crop_THWC = frames[:, box.top : box.top + box.height, box.left : box.left + box.width]
    crop_TCHW = crop_THWC.permute(0, 3, 1, 2)
    if crop_TCHW.shape[-2:] != (size, size):
        crop_TCHW = F.interpolate(crop_TCHW, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        crop_TCHW = crop_TCHW.flip(-1)
    return crop_TCHW


def random_grid_crop_box(grid_hw: tuple[int, int], crop: int, rng: np.random.Generator) -> CropBox:
    """A crop x crop window of a token grid at a uniformly drawn offset (crop <= both grid sides)."""
    gh, gw = grid_hw
    if not (0 < crop <= min(gh, gw)):
        raise ValueError(f"crop_grid={crop} must be in [1, {min(gh, gw)}] for a {gh}x{gw} token grid")
    top = int(rng.integers(0, gh - crop + 1))
    left = int(rng.integers(0, gw - crop + 1))
    return CropBox(top, left, crop, crop)


def crop_flip_tokens(tokens_TND: Tensor, grid_hw: tuple[int, int], box: CropBox | None, *, flip: bool) -> Tensor:
    """Crop the token grid to `box` (None keeps it whole) and mirror its columns: (T, h*w, D).

    Tokens are row-major over the grid (token n sits at row n // gw, column
    n % gw), as the ViT's patch embedding lays them out. Mirroring the
    columns is what the encoder would (approximately) see for a mirrored
    image; it is an augmentation of the features, not an exact identity.
    """
    T, N, D = tokens_TND.shape
    gh, gw = grid_hw
    if gh * gw != N:
        raise ValueError(f"tokens have N={N}, grid {gh}x{gw} needs {gh * gw}")
    grid_THWD = tokens_TND.view(T, gh, gw, D)
    if box is not None:
        grid_THWD = grid_THWD[:, box.top : box.top + box.height, box.left : box.left + box.width]
    if flip:
        grid_THWD = grid_THWD.flip(2)
    return grid_THWD.reshape(T, -1, D).contiguous()
