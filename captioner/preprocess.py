"""Any PIL image (any mode, EXIF-rotated, animated) or image file to the normalised tensor a model expects.

Sizes and normalisation come from the model's config, never from constants here.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .config import CaptionerConfig

# Larger images are refused before decoding: a "decompression bomb" would take gigabytes.
MAX_PIXELS = 40_000_000
# Photos up to this many pixels are kept exactly as decoded, so the model's input is bit-identical to a full-size
# decode (a 12-megapixel phone photo is one of them). Larger ones are reduced as they are opened: a JPEG is decoded at
# 1/2, 1/4 or 1/8 scale (Pillow's draft), anything else is box-reduced by a whole factor right after decoding, in
# both cases to no less than KEEP_SHORT_SIDE pixels on the short side: the model needs 256 (224 / crop_pct) and the
# inspector's heatmap 512, so nothing they show is lost, and a 40-megapixel photo is held at about 1 MP, not 120 MB.
ORDINARY_PIXELS = 16_000_000
KEEP_SHORT_SIDE = 1024

ImageLike = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(ValueError):
    """An input that cannot be read as an image; the message says why and what to do."""


def shrink_factor(w: int, h: int) -> int:
    """The whole factor a w x h photo is reduced by as it is opened: 1 (kept as it is) up to ORDINARY_PIXELS."""
    return 1 if w * h <= ORDINARY_PIXELS else max(1, min(w, h) // KEEP_SHORT_SIDE)


def open_image(source: ImageLike, name: str | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as an RGB image, with clear errors for bad files. A photo over ORDINARY_PIXELS
    comes back reduced (see there): at most one full-size decode is ever held, and only while it is being reduced.

    `name` is what the error messages call the image (default: its path, or "image")."""
    is_path = isinstance(source, (str, os.PathLike))
    name = name or (os.fspath(source) if is_path else "image")
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            if is_path and not os.path.isfile(source):
                raise ImageError(f"{name}: no such file")
            if (os.path.getsize(source) if is_path else len(source)) == 0:
                raise ImageError(f"{name}: the file is empty; choose a JPEG, PNG, WebP or GIF photo")
            fp = source if is_path else io.BytesIO(source)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(
                f"{name}: {w}x{h} pixels is too large (limit {MAX_PIXELS // 1_000_000} megapixels); resize it first"
            )
        if getattr(img, "is_animated", False):
            img.seek(0)  # captions describe the first frame of an animation
        factor = shrink_factor(w, h)
        if factor > 1 and img.format == "JPEG" and not isinstance(source, Image.Image):
            img.draft("RGB", (w // factor, h // factor))  # decode at the largest 1/2^k scale no smaller than that
        img.load()
        factor = shrink_factor(*img.size)
        if factor > 1 and img.mode in ("RGB", "RGBA", "L", "LA"):
            img = img.reduce(factor)  # before any conversion, which would copy the full-size image
        img = to_rgb(img)
        factor = shrink_factor(*img.size)
        return img.reduce(factor) if factor > 1 else img
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read; choose a JPEG, PNG, WebP or GIF photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image dimensions are too large to decode safely; resize it first") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data surface as these
        raise ImageError(f"{name}: the image data is damaged or truncated ({e}); re-save or re-export it") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: EXIF orientation applied, transparency over white.
    An RGB image that needs no turning is returned as it is, not copied (a 12 MP photo is 36 MB)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose would copy even when it does nothing
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: scale the real range to 0..255 instead of clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _crop_geometry(w: int, h: int, config: CaptionerConfig) -> tuple[int, int, int, int]:
    """The "crop" policy for a w x h photo: the size (nw, nh) it is scaled to, and the crop's top-left there."""
    size = config.image_size
    short = max(1, round(size / config.crop_pct))
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize(img: Image.Image, config: CaptionerConfig) -> Image.Image:
    """Apply the model's resize policy: squash to a square, or shorter side then centre crop."""
    size = config.image_size
    if config.resize == "squash":
        return img.resize((size, size), Image.BILINEAR)
    nw, nh, left, top = _crop_geometry(*img.size, config)
    return img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))


def encoder_view(img: Image.Image, config: CaptionerConfig, max_side: int = 512) -> Image.Image:
    """The part of an RGB image the encoder sees (all of it when the model squashes; the centre square it crops
    otherwise), at most `max_side` pixels a side, in one resampling pass: what attention heatmaps are drawn over.
    An image that is already small enough (and not cropped) is returned as it is."""
    w, h = img.size
    box = None
    if config.resize != "squash":  # the crop in the photo's own pixels, from the same numbers `resize` uses
        nw, nh, left, top = _crop_geometry(w, h, config)
        size = config.image_size
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        w = h = max(box[2] - box[0], box[3] - box[1])  # shown square, as the encoder's grid is
    scale = min(1.0, max_side / max(w, h))
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    if box is None and out == img.size:
        return img
    return img.resize(out, Image.BICUBIC, box=box, reducing_gap=2.0)


def to_tensor(img: Image.Image, config: CaptionerConfig) -> torch.Tensor:
    """An RGB image (from open_image) to the normalised float tensor (3, S, S) the model takes."""
    a = np.asarray(resize(img, config), dtype=np.float32)  # (S, S, 3), 0..255
    mean = np.asarray(config.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(config.std, dtype=np.float32) * 255.0)
    a = (a - mean) * inv_std  # one fused pass: (x/255 - mean)/std
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # (3, S, S)


def preprocess(source: ImageLike, config: CaptionerConfig) -> torch.Tensor:
    """One image (a path, bytes or PIL image) to a normalised float tensor (3, S, S)."""
    return to_tensor(open_image(source), config)


def preprocess_batch(sources: list, config: CaptionerConfig) -> torch.Tensor:
    """Several images to (B, 3, S, S); raises ImageError naming the first bad one."""
    return torch.stack([preprocess(s, config) for s in sources])
