"""Which model to serve: a folder or Hub repo id given, else $CAPTIONER_MODEL, else the bundled default.

The one place the CLI, the app, the evaluation command and the benchmarks load a model from.
"""
from __future__ import annotations

import os
from pathlib import Path

from .hub import ModelLoadError
from .model import Captioner

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


def load_model(src=None, *, revision: str | None = None, precision: str = "auto", runtime: str | None = None) -> Captioner:
    """A model ready for inference from SRC, else $CAPTIONER_MODEL (at $CAPTIONER_REVISION), else the bundled
    default, at `precision` (auto | fp32 | bf16 | int8: captioner.precision.inference_plan), its encoder's backbone
    run by `runtime` (auto | onnx | torch: captioner.runtime; default $CAPTIONER_ENCODER_RUNTIME, else auto: ONNX
    Runtime where installed); raises ModelLoadError."""
    src = src or os.environ.get("CAPTIONER_MODEL") or None
    if src is None:
        if not (DEFAULT_MODEL / "model.safetensors").exists():
            raise ModelLoadError(f"the bundled default model is missing from {DEFAULT_MODEL}; pass --model FOLDER_OR_REPO_ID")
        src = DEFAULT_MODEL
    model = Captioner.from_pretrained(src, revision=revision or os.environ.get("CAPTIONER_REVISION") or None)
    from .runtime import resolve

    return model.optimize_for_inference(precision, runtime=resolve(runtime))
