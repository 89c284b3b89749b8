"""Speed levers, applied to a loaded Captioner *instance* from outside captioner/ (so they can be measured
before anyone changes the package). Each returns an undo function; `patched` applies several at once.

  lstm_cell     Decoder.step through torch.lstm_cell instead of nn.LSTM (same weights, same maths; skips
                oneDNN's RNN kernel, which costs milliseconds per single-token call on CPU)
  fuse_bn       conv + batch-norm folded for inference (eager; torch.nn.utils.fusion)
  channels_last encoder weights and input in NHWC
  jit_freeze    backbone traced and frozen with torch.jit for the model's image size (deprecated API in torch 2.9+)
  compile       backbone through torch.compile (slow to compile: tens of seconds)
  int8_decoder  torch.ao.quantization.quantize_dynamic of the decoder's Linear head (changes the numbers)
  chunk8        the encoder runs a big batch 8 images at a time (a batch of 32 at 224x224 thrashes the CPU caches)
"""
from __future__ import annotations

import copy
import types
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVERS = ("lstm_cell", "fuse_bn", "channels_last", "jit_freeze", "compile", "int8_decoder", "chunk8")
CHUNK = 8


# ---------------------------------------------------------------- decoder


def lstm_cell_step(self, x: torch.Tensor, state=None):
    """The lstm_cell lever. captioner's Decoder.step adopted it (torch.lstm_cell on nn.LSTM's weights), so the
    lever is now the current code; kept so that older result files and the lever table stay comparable."""
    from captioner.model import Decoder

    return Decoder.step(self, x, state)


def int8_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of the decoder with its Linear layers (the vocabulary head) dynamically quantised to int8.

    Decoder.step runs the LSTM's weights through torch.lstm_cell, so a quantised nn.LSTM module would never be called."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(copy.deepcopy(decoder).eval(), {nn.Linear}, dtype=torch.qint8)


# ---------------------------------------------------------------- encoder


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """A copy of `module` with every conv directly followed by a batch norm folded into it (captioner's own code)."""
    from captioner.model import _fuse_conv_bn

    return _fuse_conv_bn(module)


class _FastFeatures:
    """Replacement for Encoder.features: a faster backbone for the model's own image size (eager otherwise),
    optionally fed `chunk` images at a time."""

    def __init__(self, encoder, backbone: Callable | None, size: int, channels_last: bool, chunk: int | None = None):
        self.encoder, self.size, self.channels_last, self.chunk = encoder, size, channels_last, chunk
        self.eager = type(encoder).features.__get__(encoder)
        self.backbone = backbone or self.eager

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[-2:]) != (self.size, self.size) or torch.is_grad_enabled() and self.encoder.train_backbone:
            return self.eager(images)  # other sizes (a traced graph bakes in its padding) and fine-tuning stay eager
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.chunk and images.size(0) > self.chunk:
            return torch.cat([self.backbone(c) for c in images.split(self.chunk)])
        return self.backbone(images)


def fast_backbone(model, *, fuse_bn=False, channels_last=False, jit_freeze=False, compile=False) -> Callable:
    """The model's backbone fused / NHWC / frozen / compiled (a new object; the model is not changed)."""
    size = model.config.image_size
    backbone = model.encoder.backbone
    if fuse_bn:
        backbone = fuse_conv_bn(backbone)
    if channels_last:
        backbone = (backbone if fuse_bn else copy.deepcopy(backbone)).to(memory_format=torch.channels_last)
    if jit_freeze:
        example = torch.zeros(1, 3, size, size)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings (padding becomes a constant) and the deprecation notice
            backbone = torch.jit.freeze(torch.jit.trace(backbone.eval(), example, check_trace=False).eval())
            backbone(example)  # the first calls of a frozen graph run its optimisation passes
            backbone(example)
    if compile:
        backbone = torch.compile(backbone)
    return backbone


# ---------------------------------------------------------------- variants: instance attributes swapped in and out


def build_variant(model, levers=()) -> dict:
    """The instance overrides that make `model` run with `levers` (built once; apply with `applied`)."""
    levers = tuple(levers)
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown lever(s) {sorted(unknown)}; expected some of {LEVERS}")
    if "lstm_cell" in levers and "int8_decoder" in levers:
        raise ValueError("lstm_cell and int8_decoder are alternatives (a quantised LSTM has no float weights)")
    overrides: dict = {}
    if "lstm_cell" in levers:
        overrides["decoder.step"] = types.MethodType(lstm_cell_step, model.decoder)
    if "int8_decoder" in levers:
        overrides["decoder"] = int8_decoder(model.decoder)
    enc = {k: k in levers for k in ("fuse_bn", "channels_last", "jit_freeze", "compile")}
    if any(enc.values()) or "chunk8" in levers:
        backbone = fast_backbone(model, **enc) if any(enc.values()) else None
        overrides["encoder.features"] = _FastFeatures(model.encoder, backbone, model.config.image_size, enc["channels_last"],
                                                      CHUNK if "chunk8" in levers else None)
    return overrides


@contextmanager
def applied(model, overrides: dict):
    """Within the block `model` uses the overrides of build_variant; afterwards it is exactly as before."""
    saved = []
    try:
        for key, value in overrides.items():
            owner_name, _, attr = key.rpartition(".")
            owner = getattr(model, owner_name) if owner_name else model
            if isinstance(value, nn.Module):
                saved.append((owner, attr, getattr(owner, attr), True))
                setattr(owner, attr, value)
            else:
                saved.append((owner, attr, None, False))
                owner.__dict__[attr] = value  # an instance attribute shadows the class's method
        yield model
    finally:
        for owner, attr, old, is_module in reversed(saved):
            if is_module:
                setattr(owner, attr, old)
            else:
                owner.__dict__.pop(attr, None)


@contextmanager
def patched(model, levers=()):
    """Within the block, `model` runs with the given levers; outside it is unchanged."""
    with applied(model, build_variant(model, levers)) as m:
        yield m


def preprocess_draft(path, config) -> torch.Tensor:
    """preprocess() with PIL's JPEG draft mode: the decoder downscales by 1/2, 1/4 or 1/8 in the DCT while
    both sides stay at least the model's size; large photos decode several times faster."""
    from PIL import Image

    from captioner.preprocess import preprocess

    with Image.open(path) as img:
        if img.format == "JPEG":
            s = config.image_size
            if config.resize == "crop":
                s = max(s, round(s / config.crop_pct))
            img.draft("RGB", (s, s))  # never below (s, s) on either side
        img.load()
        return preprocess(img, config)
