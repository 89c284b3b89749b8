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
# What decoding allocates: Pillow holds 1-bit, 8-bit grey and palette images in 1 byte a pixel, 16-bit grey in 2 and
# every other mode (RGB too) in 4, so a photo within MAX_PIXELS never needs more than MAX_DECODED_BYTES. Refused
# above it, before decoding; a mode not in this table counts as 4 bytes a pixel.
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
MAX_DECODED_BYTES = 4 * MAX_PIXELS
# Modes Image.reduce takes (box average, in the image's own mode); the others are resized in their own mode (palette
# and 1-bit ones by nearest neighbour, which keeps the palette and its transparent index).
REDUCIBLE = {"L", "LA", "La", "I", "F", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}

ImageLike = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(ValueError):
    """An input that cannot be read as an image; the message says why and what to do."""


def shrink_factor(w: int, h: int) -> int:
    """The whole factor a w x h photo is reduced by as it is opened: 1 (kept as it is) up to ORDINARY_PIXELS."""
    return 1 if w * h <= ORDINARY_PIXELS else max(1, min(w, h) // KEEP_SHORT_SIDE)


def decoded_bytes(mode: str, w: int, h: int) -> int:
    """The bytes Pillow allocates to decode a w x h image of `mode` (BYTES_PER_PIXEL)."""
    return w * h * BYTES_PER_PIXEL.get(mode, 4)


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n:,} bytes"


def reduce_in_mode(img: Image.Image, factor: int, rows: int = 64) -> Image.Image:
    """`img` made `factor` times smaller in each side, still in its own mode, `rows` output rows at a time: nothing
    the size of the full image is allocated again (converted first, a 40 MP 16-bit or float image took over 1 GB on
    the way; Image.reduce itself copies an RGBA or LA image whole to premultiply its alpha). Box averages, as
    Image.reduce does (its result, strip by strip); palette and 1-bit images are sampled (nearest neighbour), which
    keeps the palette and its transparent index."""
    if factor <= 1:
        return img
    w, h = img.size
    out = Image.new(img.mode, (max(1, -(-w // factor)), max(1, -(-h // factor))))
    sampled = img.mode in ("1", "P", "PA")  # averaging a palette's indices would make other colours
    if img.mode in ("P", "PA") and (palette := img.getpalette(rawmode="RGBA")):
        out.putpalette(palette, "RGBA")
        out.info.update({k: v for k, v in img.info.items() if k == "transparency"})
    for top in range(0, out.size[1], rows):
        strip = img.crop((0, top * factor, w, min(h, (top + rows) * factor)))
        if img.mode in REDUCIBLE:
            small = strip.reduce(factor)
        else:
            small = strip.resize((out.size[0], -(-strip.size[1] // factor)), Image.NEAREST if sampled else Image.BOX)
        out.paste(small, (0, top))
    return out


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
            img.seek(0)  # captions describe the first frame of an animation (only that frame is decoded)
        if (need := decoded_bytes(img.mode, w, h)) > MAX_DECODED_BYTES:
            raise ImageError(f"{name}: {w}x{h} pixels in mode {img.mode} would take {_size(need)} to decode (limit "
                             f"{_size(MAX_DECODED_BYTES)}); resize it or save it as an 8-bit JPEG or PNG")
        factor = shrink_factor(w, h)
        if factor > 1 and img.format == "JPEG" and not isinstance(source, Image.Image):
            img.draft(img.mode, (w // factor, h // factor))  # decode at the largest 1/2^k scale no smaller than that
        img.load()
        # Shrunk in its own mode, before any conversion: converting first (16-bit or float to 8 bits, a palette with
        # transparency to RGBA, CMYK to RGB) would copy the full-size image, several times over for some modes.
        img = reduce_in_mode(img, shrink_factor(*img.size))
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
        # In float32, in place: float64 would take 8 bytes a pixel (0.3 GB for a 40 MP image) where 4 do.
        a = np.array(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a *= 255.0 / hi
        a += 0.5
        img = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "L")
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
