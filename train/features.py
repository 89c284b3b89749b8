"""Cached encoder features: computed once per image, keyed by backbone + weights + preprocessing.

A change to any of those gives a new key, so stale features are never reused. Extraction writes chunk
files atomically and skips finished chunks, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from captioner.preprocess import open_image, preprocess

CHUNK = 256  # images per cache chunk file


class Regions(torch.nn.Module):
    """(B, F, H, W) -> (B, H*W, F): the last map as the regions a decoder that attends reads (as
    `Encoder.backbone_features` gives them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, F, H*W) -> (B, H*W, F)


def split_backbone(backbone, top_stages: int, *, spatial: bool = False):
    """(bottom, top) views of an EfficientNet-style backbone (conv_stem, bn1, blocks, conv_head, bn2), sharing its
    modules: bottom(x) is the feature map before the last `top_stages` stages, top(map) the pooled (B, F) features,
    or with `spatial` the last map's regions (B, H*W, F). top(bottom(x)) == backbone(x) (or its regions). Training
    only `top` on cached bottom maps is CNN fine-tuning a CPU can afford."""
    import torch.nn as nn

    stages = getattr(backbone, "blocks", None)
    if stages is None or not all(hasattr(backbone, n) for n in ("conv_stem", "bn1", "conv_head", "bn2")):
        raise ValueError(f"--tune-top-stages needs an EfficientNet-style backbone; {type(backbone).__name__} has no conv_stem/blocks/conv_head")
    if not 1 <= top_stages <= len(stages):
        raise ValueError(f"--tune-top-stages {top_stages}: the backbone has {len(stages)} stages; choose 1..{len(stages)}")
    cut = len(stages) - top_stages
    bottom = nn.Sequential(backbone.conv_stem, backbone.bn1, *list(stages)[:cut])
    head = [Regions()] if spatial else [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    top = nn.Sequential(*list(stages)[cut:], backbone.conv_head, backbone.bn2, *head)
    return bottom, top


def top_parameter_names(backbone, top_stages: int) -> set[str]:
    """State-dict names of what `split_backbone(backbone, top_stages)[1]` trains (they stay out of the map cache's key)."""
    top = split_backbone(backbone, top_stages)[1]
    ids = {id(t) for t in (*top.parameters(), *top.buffers())}
    return {n for n, t in (*backbone.named_parameters(), *backbone.named_buffers()) if id(t) in ids}


def backbone_fingerprint(encoder, top_stages: int = 0) -> str:
    """Hash of the backbone weights (so other weights never hit this cache); with `top_stages`, of the frozen
    bottom only, so training the top stages keeps the cached maps valid."""
    h = hashlib.sha256()
    skip = top_parameter_names(encoder.backbone, top_stages) if top_stages else set()
    for name, t in encoder.backbone.state_dict().items():
        if name in skip:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


MIRROR = "mirror"  # the view that is the plain image flipped left to right (--flip); its captions swap left/right


def augmented_view(path: str, view: int | str):
    """View number `view` (>= 1) of an image, for training-time augmentation: a random crop of 60-100% of the area
    (aspect 3:4 to 4:3), mirrored half of the time; view MIRROR is the whole image mirrored. Seeded by (view, file name), so cached views stay valid.
    Mirroring can contradict a caption's "left"/"right"; those are rare in Flickr8k (about 1% of captions)."""
    img = open_image(path)
    if view == MIRROR:
        return img.transpose(0)  # 0 = Image.FLIP_LEFT_RIGHT
    rng = random.Random(f"{view}:{os.path.basename(path)}")
    w, h = img.size
    area = w * h * rng.uniform(0.6, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    return img.transpose(0) if rng.random() < 0.5 else img  # 0 = Image.FLIP_LEFT_RIGHT


def cache_key(model, images: list[str], view: int | str = 0, top_stages: int = 0, precision: str = "fp32") -> str:
    c = model.config
    spec = {
        "backbone": c.backbone,
        "weights": backbone_fingerprint(model.encoder, top_stages),
        "image_size": c.image_size,
        "resize": c.resize,
        "crop_pct": c.crop_pct,
        "mean": list(c.mean),
        "std": list(c.std),
        "images": hashlib.sha256("\n".join(os.path.realpath(p) for p in images).encode()).hexdigest()[:16],
    }
    if precision != "fp32":  # features computed in bf16 differ a little (~4%); float32 ones keep the key they had
        spec["precision"] = precision
    if view:  # augmented views get their own keys; the plain features keep the key they always had
        spec["view"] = view
    if top_stages:  # feature maps before the last stages, not pooled features
        spec["maps_below_top_stages"] = top_stages
    elif model.encoder.spatial:  # the last map as regions (N, F), for a decoder that attends; stored in half precision
        spec["regions_fp16"] = True
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _atomic_save(array: np.ndarray, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # per process: DDP ranks may fill one cache at once
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.inference_mode()
def extract_features(model, images: list[str], cache_dir: str | os.PathLike, *, batch_size: int = 32, progress: bool = True,
                     view: int | str = 0, top_stages: int = 0, precision: str = "fp32") -> torch.Tensor:
    """Backbone features (N, F) for the image paths (or for their augmented view `view`), from the cache where present.
    With `top_stages`, the feature maps (N, C, H, W) below the backbone's last `top_stages` stages instead; for a
    decoder that attends, the last map's regions (N, R, F) in half precision (7,000 images of 49 x 1,280 take 0.9 GB).
    `precision` (fp32 or bf16, resolved: see captioner.precision) is what the CNN runs in; it is part of the key."""
    from captioner.precision import autocast, check

    check(precision, ("fp32", "bf16"))
    folder = Path(cache_dir) / cache_key(model, images, view, top_stages, precision)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "features.npy"
    if final.exists():
        return torch.from_numpy(np.load(final))
    encoder = model.encoder.eval()
    had = encoder.__dict__.get("_fast")
    encoder.optimize_for_inference(model.config.image_size)  # batch norm folded: same features, ~1.8x faster
    run = encoder.backbone_features
    half = encoder.spatial and not top_stages
    if top_stages:
        bottom = split_backbone(encoder.__dict__["_fast"][0], top_stages)[0]
        run = lambda x: bottom(x.contiguous(memory_format=torch.channels_last)).contiguous()  # noqa: E731
    try:
        chunks = range(0, len(images), CHUNK)
        bar = tqdm(total=len(images), desc=f"features (view {view})" if view else "features", unit="img", disable=not progress)
        for start in chunks:
            path = folder / f"chunk_{start // CHUNK:05d}.npy"
            part = images[start : start + CHUNK]
            if path.exists():
                bar.update(len(part))
                continue
            out = []
            for b in range(0, len(part), batch_size):
                batch = torch.stack([preprocess(augmented_view(p, view) if view else p, model.config)
                                     for p in part[b : b + batch_size]])  # (b, 3, S, S)
                with autocast(precision):
                    x = run(batch)  # (b, F), (b, C, H, W) or (b, R, F)
                out.append((x.half() if half else x.float()).numpy())
                bar.update(len(batch))
            _atomic_save(np.concatenate(out), path)
    finally:
        if had is None:
            encoder.__dict__.pop("_fast", None)  # the copy would go stale if the backbone is trained later
    bar.close()
    try:
        parts = [np.load(folder / f"chunk_{i:05d}.npy") for i in range(len(chunks))]
    except FileNotFoundError:  # another process (a DDP rank) finished first: it saves the whole before removing chunks
        return torch.from_numpy(np.load(final))
    array = np.concatenate(parts) if parts else np.zeros((0, encoder.backbone.num_features), np.float32)
    _atomic_save(array, final)
    for i in range(len(chunks)):
        (folder / f"chunk_{i:05d}.npy").unlink(missing_ok=True)
    (folder / "images.txt").write_text("\n".join(images))
    return torch.from_numpy(array)
