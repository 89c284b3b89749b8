"""Timing, machine facts, markdown tables, sample images and the model under test."""
from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
FLICKR_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "Images"
FALLBACK_MODEL = ROOT / "runs" / "flickr8k" / "best"
DEFAULT_VOCAB_SIZE = 2600  # the default architecture's vocabulary (Flickr8k, min_freq=5): 4 specials + 2596 words


@dataclass
class Settings:
    """How hard to measure: --quick only checks that everything runs (numbers are rough)."""

    quick: bool = False
    warmup: int = 3
    repeat: int = 20
    peer_repeat: int = 3
    batch_images: int = 64
    app_clicks: int = 10
    app_captions: int = 100
    train_steps: int = 8

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if not quick:
            return cls()
        return cls(quick=True, warmup=1, repeat=5, peer_repeat=1, batch_images=32, app_clicks=3, app_captions=100,
                   train_steps=3)


@dataclass
class Stat:
    """Wall-clock milliseconds of repeated calls (after warm-up)."""

    median_ms: float
    min_ms: float
    max_ms: float
    n: int
    cpu_ms: float  # median process CPU time per call (all threads; spin-waiting counts)

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure(fn: Callable[[], object], *, warmup: int, repeat: int) -> Stat:
    """Median wall time of `fn()` over `repeat` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    walls, cpus = [], []
    was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of one call is noise, not the model's cost
    try:
        for _ in range(max(1, repeat)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            walls.append((time.perf_counter() - t0) * 1e3)
            cpus.append((time.process_time() - c0) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return Stat(statistics.median(walls), min(walls), max(walls), len(walls), statistics.median(cpus))


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeat: int) -> dict[str, Stat]:
    """Like `measure`, but the variants take turns call by call, so a busy machine's slow spells hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    gc.disable()
    try:
        for _ in range(max(1, repeat)):
            for k, fn in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                walls[k].append((time.perf_counter() - t0) * 1e3)
                cpus[k].append((time.process_time() - c0) * 1e3)
    finally:
        gc.enable()
    return {k: Stat(statistics.median(w), min(w), max(w), len(w), statistics.median(cpus[k])) for k, w in walls.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    import torch

    facts = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onednn": bool(torch.backends.mkldnn.is_available()),
    }
    try:
        facts["load_average_1m"] = round(os.getloadavg()[0], 2)  # > cores: other work shares the CPU
    except OSError:
        pass
    try:
        import psutil

        facts["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for name in ("timm", "transformers", "gradio", "gradio_client"):
        try:
            facts[name] = __import__(name).__version__
        except Exception:  # not installed, or broken: say so rather than fail
            facts[name] = None
    return facts


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- images


def sample_images(n: int, workdir: Path) -> tuple[list[str], str]:
    """`n` JPEG paths: Flickr8k images when ../shared/data/flickr8k is there, else synthetic 500x375 photos."""
    if FLICKR_IMAGES.is_dir():
        files = sorted(p for p in FLICKR_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
        if len(files) == n:
            return [str(p) for p in files], f"Flickr8k ({FLICKR_IMAGES})"
    return [synthetic_jpeg(workdir / f"synthetic_{i}.jpg", (500, 375), seed=i) for i in range(n)], "synthetic 500x375 JPEGs"


def synthetic_jpeg(path: Path, size: tuple[int, int], *, seed: int = 0, quality: int = 90) -> str:
    """A photo-like JPEG (smooth gradients plus noise, so it compresses like a photo, not like a flat colour)."""
    import numpy as np
    from PIL import Image

    if path.exists():
        return str(path)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * 255, (yy / h) * 255, ((xx + yy) / (w + h)) * 255], axis=-1)
    small = rng.integers(0, 255, (max(1, h // 64), max(1, w // 64), 3), dtype=np.uint8)
    blobs = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    a = np.clip(0.5 * base + 0.5 * blobs + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=quality)
    return str(path)


def workdir() -> Path:
    d = Path(tempfile.gettempdir()) / "captioner-bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------- the model under test


def random_default_model(vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, **overrides):
    """The default architecture with random weights and a dummy vocabulary (timings only; captions are noise),
    made ready for inference as `load_model` makes a loaded one."""
    import torch

    from captioner import Captioner, CaptionerConfig, Vocabulary
    from captioner.vocab import SPECIALS

    torch.manual_seed(seed)
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(vocab_size - len(SPECIALS)))])
    return Captioner(CaptionerConfig(vocab_size=vocab_size, **overrides), vocab).optimize_for_inference()


def load_bench_model(src: str | None, precision: str = "auto"):
    """(model, description). SRC, else the bundled default model, else runs/flickr8k/best, else a random model; loaded
    at `precision` (captioner.precision)."""
    from captioner.loading import DEFAULT_MODEL, load_model

    if src == "random":
        return random_default_model().set_precision(precision), "random weights, default architecture (--model random)"
    if src:
        return load_model(src, precision=precision).eval(), f"{src}"
    if (DEFAULT_MODEL / "model.safetensors").exists():
        return load_model(precision=precision).eval(), f"bundled default model ({DEFAULT_MODEL.relative_to(ROOT)})"
    if (FALLBACK_MODEL / "model.safetensors").exists():
        return load_model(str(FALLBACK_MODEL), precision=precision).eval(), f"{FALLBACK_MODEL.relative_to(ROOT)} (no bundled default model yet)"
    return random_default_model().set_precision(precision), (
        "RANDOM WEIGHTS, default architecture (tf_efficientnet_lite0 + LSTM 512, vocabulary 2600): neither "
        "captioner/default_model nor runs/flickr8k/best exists yet. Timings reflect the architecture; captions are "
        "noise and run to max_len words, longer than a trained model's"
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
