"""Where the attention decoder looked: a step's attention weights drawn over the photo as a heatmap.

The weights are one per region of the backbone's square map (7 x 7 at 224 x 224), in row-major order; the map
covers the whole photo because preprocessing squashes (or centre-crops) it to the square the encoder sees.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

# A perceptually ordered ramp (dark blue -> teal -> yellow), as viridis: low weights stay readable.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def _colour(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], shape (H, W) -> RGB (H, W, 3) along _RAMP."""
    pos = values * (len(_RAMP) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def attention_overlay(image: Image.Image, weights: Sequence[float], *, alpha: float = 0.55, max_side: int = 512) -> Image.Image:
    """The photo with `weights` (one per region of a square grid) upsampled smoothly and blended over it.

    Weights are scaled to the step's own maximum, so every step shows where *its* attention went."""
    n = len(weights)
    side = math.isqrt(n)
    if n == 0 or side * side != n:
        raise ValueError(f"{n} attention weights: expected one per region of a square grid (e.g. 49 = 7 x 7)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: expected a value in [0, 1]")
    photo = image
    if photo.mode != "RGB" or max(photo.size) > max_side:  # else drawn over as it is (the app's photo is shrunk once)
        photo = image.convert("RGB")
        photo.thumbnail((max_side, max_side))
    grid = np.asarray(weights, dtype=np.float32).reshape(side, side)  # (side, side)
    grid = grid / grid.max() if grid.max() > 0 else grid
    small = Image.fromarray(np.uint8(np.clip(grid, 0, 1) * 255), mode="L")
    heat = np.asarray(small.resize(photo.size, Image.BICUBIC), dtype=np.float32) / 255.0  # (H, W)
    colour = _colour(np.clip(heat, 0, 1))  # (H, W, 3)
    base = np.asarray(photo, dtype=np.float32)
    blended = base * (1 - alpha) + colour * alpha
    return Image.fromarray(np.uint8(np.clip(blended, 0, 255)))
