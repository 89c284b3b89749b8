"""Which model to serve: a folder or Hub repo id given, else $CAPTIONER_MODEL, else the bundled default.

The one place the CLI, the app, the evaluation command and the benchmarks load a model from.
"""
from __future__ import annotations

import os
from pathlib import Path

from .hub import ModelLoadError
from .model import Captioner

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"  # beside the package in a clone (`pip install -e .`)


def example(name: str = "cat.jpg") -> Path:
    """The path of one of the repository's example photos (examples/NAME), wherever the caller runs from."""
    path = EXAMPLES / name
    if not path.is_file():
        known = sorted(p.name for p in EXAMPLES.glob("*.jpg")) if EXAMPLES.is_dir() else []
        raise ValueError(f"example {name!r} not found in {EXAMPLES}: "
                         + (f"the examples are {', '.join(known)}" if known else "the examples ship with a clone of "
                            "the repository (pip install -e .), not with a built wheel"))
    return path


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
