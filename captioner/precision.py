"""Which number format the maths runs in, chosen for the CPU it runs on.

bfloat16 halves the bytes each matrix product reads and, on a CPU that computes it natively (AVX512-BF16 or AMX),
runs about 2-3x faster than float32; where it is emulated it is slower than float32. So `auto` reads the CPU's
capabilities and never assumes them; float32 is the fallback everywhere.

- Training (`--precision auto|fp32|bf16`): bf16 is autocast for the forward pass; master weights, optimizer state
  and the loss stay float32, so a checkpoint is float32 whatever ran.
- Inference (`load_model(precision=...)`, the CLI's and the app's `--precision`): see `captioner.model.Captioner.
  set_precision`; a saved model stays float32/float16 on disk, precision is chosen when it is loaded.
"""
from __future__ import annotations

import contextlib

import torch

TRAINING = ("auto", "fp32", "bf16")  # what training and feature extraction accept
INFERENCE = ("auto", "fp32", "bf16", "int8")  # what loading a model for inference accepts


def cpu_features() -> dict[str, bool]:
    """The CPU capabilities precision depends on, as torch reports them (False where this torch cannot tell)."""

    def ask(name: str) -> bool:
        probe = getattr(torch.cpu, name, None)
        try:
            return bool(probe()) if probe is not None else False
        except Exception:  # an old or unusual build: treat as absent, float32 stays
            return False

    return {"avx512_bf16": ask("_is_avx512_bf16_supported"), "amx": ask("_is_amx_tile_supported"),
            "vnni": ask("_is_vnni_supported")}


def native_bf16() -> bool:
    """True where the CPU computes bfloat16 matrix products in hardware (AVX512-BF16 or AMX tiles)."""
    f = cpu_features()
    return f["avx512_bf16"] or f["amx"]


def check(precision: str, allowed: tuple[str, ...]) -> str:
    if precision not in allowed:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(allowed)}")
    return precision


def for_training(precision: str, device: torch.device | str = "cpu") -> str:
    """'auto' | 'fp32' | 'bf16' -> the precision a training run uses: auto is bf16 on a CUDA device or a CPU with
    native bf16, else fp32. An explicit bf16 is honoured even where it is emulated (slow, but it runs)."""
    check(precision, TRAINING)
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if torch.device(device).type == "cpu":
        return "bf16" if native_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str = "cpu"):
    """A context in which the forward pass runs at `precision` (a resolved one: fp32 or bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision={precision!r}: autocast takes fp32 or bf16")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# What `auto` picks for inference, per class of CPU: (encoder, decoder). Where the CPU has VNNI (int8 dot products in
# hardware) an int8 decoder step is several times faster than float32 and keeps nearly every greedy dev caption, while a
# bf16 encoder changes far more of them; so auto takes the int8 decoder there, and float32 elsewhere: nothing was
# measured there, and float32 is never slower than itself. The int8 layers quantize each activation row by its own
# scale (captioner/int8.py), so they are batch-invariant. The numbers: docs/performance.md, "Measurements behind the
# code", and benchmarks/RESULTS.md, "Inference precision".
AUTO_VNNI = ("fp32", "int8")
AUTO_OTHER = ("fp32", "fp32")


def inference_plan(precision: str, decoder: str = "attend") -> tuple[str, str]:
    """'auto' | 'fp32' | 'bf16' | 'int8' -> (encoder precision, decoder precision) for this CPU. The encoder is a CNN,
    which the int8 layers do not cover (Linear and LSTM cells; static int8 of Lite0 changed its ImageNet labels too
    often: docs/performance.md): int8 means an int8 decoder and a float32 encoder."""
    check(precision, INFERENCE)
    if precision == "auto":
        return AUTO_VNNI if cpu_features()["vnni"] or cpu_features()["amx"] else AUTO_OTHER
    if precision == "int8":
        return ("fp32", "int8")
    return (precision, precision)


def add_precision_argument(parser) -> None:
    """--precision for the commands that load a model for inference (the CLI, the app)."""
    parser.add_argument("--precision", choices=INFERENCE, default="auto",
                        help="number format for inference: auto (an int8 decoder where the CPU has VNNI, else float32), "
                             "fp32, bf16 (changes about 1 caption in 8) or int8 (the decoder; default: auto)")
