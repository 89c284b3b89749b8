"""Images unlike Flickr8k, for measuring the familiarity detector (issue 32): made in code, plus photos that packages ship.

`synthetic()` draws them deterministically (blank, one colour, noise, gradients, text pages, charts, tiny images,
stripes, checkerboards, shapes), so nothing big is kept in the repository. `package_photos(folder)` lists the images
of a folder the user unpacked from wheels (scikit-image's `skimage/data`, scikit-learn's `sklearn/datasets/images`,
matplotlib's `mpl-data/sample_data`); docs/familiarity.md says how.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif"}  # not the multipage TIFFs (test files, not photos)


def _noise(rng: random.Random, size: int, colour: bool, kind: str) -> Image.Image:
    import numpy as np

    g = np.random.default_rng(rng.randrange(2**31))
    shape = (size, size, 3) if colour else (size, size)
    if kind == "uniform":
        a = g.integers(0, 256, shape)
    elif kind == "gaussian":
        a = np.clip(g.normal(128, 50, shape), 0, 255)
    else:  # salt and pepper over grey
        a = np.full(shape, 128.0)
        m = g.random(shape[:2])
        a[m < 0.1] = 0
        a[m > 0.9] = 255
    return Image.fromarray(a.astype("uint8")).convert("RGB")


def _text_page(rng: random.Random, size: tuple[int, int], dark: bool = False) -> Image.Image:
    bg, fg = ((20, 20, 20), (230, 230, 230)) if dark else ((250, 250, 245), (10, 10, 10))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    words = "the of and to in is that for it as was with be by on not he this are or his from at which".split()
    y = 10
    while y < size[1] - 14:
        x = 10
        while x < size[0] - 40:
            w = rng.choice(words)
            d.text((x, y), w, fill=fg)
            x += 7 * len(w) + 6
        y += 14
    return img


def _chart(rng: random.Random, kind: str) -> Image.Image:
    img = Image.new("RGB", (400, 300), "white")
    d = ImageDraw.Draw(img)
    d.line((40, 260, 380, 260), fill="black", width=2)
    d.line((40, 20, 40, 260), fill="black", width=2)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    if kind == "bar":
        for i in range(8):
            h = rng.randint(20, 220)
            d.rectangle((50 + i * 40, 260 - h, 80 + i * 40, 260), fill=colours[i % 5])
    elif kind == "line":
        for c in colours[:3]:
            pts = [(40 + i * 17, 260 - rng.randint(20, 230)) for i in range(21)]
            d.line(pts, fill=c, width=2)
    elif kind == "scatter":
        for _ in range(150):
            x, y = rng.randint(45, 375), rng.randint(25, 255)
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=rng.choice(colours))
    else:  # pie
        img = Image.new("RGB", (300, 300), "white")
        d = ImageDraw.Draw(img)
        start = 0.0
        for i in range(5):
            extent = rng.uniform(30, 110) if i < 4 else 360 - start
            d.pieslice((30, 30, 270, 270), start, start + extent, fill=colours[i])
            start += extent
    for i in range(5):
        d.text((5, 255 - i * 50), str(i * 10), fill="black")
    return img


def synthetic(seed: int = 0) -> dict[str, Image.Image]:
    """name -> image: the degenerate and the drawn images. The same seed gives the same pixels."""
    rng = random.Random(seed)
    out: dict[str, Image.Image] = {}
    for name, rgb in [("black", (0, 0, 0)), ("white", (255, 255, 255)), ("grey", (128, 128, 128)),
                      ("red", (220, 30, 30)), ("green", (30, 160, 60)), ("blue", (40, 70, 200)),
                      ("sky", (135, 190, 235)), ("sand", (210, 190, 140))]:
        out[f"solid_{name}"] = Image.new("RGB", (320, 240), rgb)
    for s in (1, 2, 4, 8, 16):
        out[f"tiny_{s}px"] = Image.new("RGB", (s, s), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    out["tiny_8px_noise"] = _noise(rng, 8, True, "uniform")
    for kind in ("uniform", "gaussian", "saltpepper"):
        for colour in (True, False):
            out[f"noise_{kind}_{'colour' if colour else 'grey'}"] = _noise(rng, 224, colour, kind)
    for i, (a, b) in enumerate([((0, 0, 0), (255, 255, 255)), ((255, 0, 0), (0, 0, 255)), ((20, 40, 120), (240, 200, 80))]):
        for vertical in (False, True):
            img = Image.new("RGB", (256, 256))
            px = img.load()
            for y in range(256):
                for x in range(256):
                    f = (y if vertical else x) / 255
                    px[x, y] = tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))
            out[f"gradient_{i}_{'v' if vertical else 'h'}"] = img
    img = Image.new("RGB", (256, 256))
    px = img.load()
    for y in range(256):
        for x in range(256):
            r = math.hypot(x - 128, y - 128) / 181
            px[x, y] = (round(255 * (1 - r)), round(128 * r), 200)
    out["gradient_radial"] = img
    out["text_page"] = _text_page(rng, (420, 560))
    out["text_page_wide"] = _text_page(rng, (640, 400))
    out["text_page_dark"] = _text_page(rng, (420, 560), dark=True)
    for kind in ("bar", "line", "scatter", "pie"):
        out[f"chart_{kind}"] = _chart(rng, kind)
    for period in (8, 32):
        img = Image.new("RGB", (256, 256), "white")
        d = ImageDraw.Draw(img)
        for x in range(0, 256, period * 2):
            d.rectangle((x, 0, x + period - 1, 255), fill="black")
        out[f"stripes_{period}"] = img
        cb = Image.new("RGB", (256, 256), "white")
        d = ImageDraw.Draw(cb)
        for y in range(0, 256, period):
            for x in range(0, 256, period):
                if (x // period + y // period) % 2:
                    d.rectangle((x, y, x + period - 1, y + period - 1), fill="black")
        out[f"checkerboard_{period}"] = cb
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.randint(0, 320), rng.randint(0, 240), rng.randint(10, 60)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    out["shapes"] = img
    img = Image.new("RGB", (300, 300), (240, 240, 240))
    d = ImageDraw.Draw(img)
    d.rectangle((60, 60, 240, 240), outline="black", width=6)
    d.line((60, 60, 240, 240), fill="black", width=6)
    out["line_drawing"] = img
    return out


def package_photos(folder: str | Path) -> dict[str, Path]:
    """name -> path of every image file under `folder` (recursively; for the unpacked wheels' sample data)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()}
