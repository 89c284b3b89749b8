"""Sections 1 and 2: per-image latency of each stage, and batch throughput of caption_batch (CLI folder mode)."""
from __future__ import annotations

import torch

from captioner.decode import caption, caption_batch, stream
from captioner.preprocess import open_image, preprocess

from .common import Settings, Stat, measure, measure_interleaved

STRATEGY_KW = {"greedy": {}, "beam 3": {"strategy": "beam", "beam_size": 3}, "sample": {"strategy": "sample", "seed": 0}}


def words(model, x, **kw) -> int:
    """How many words this decode yields (a random model rarely stops before max_len)."""
    steps = list(stream(model, x, **kw))
    return len(steps[-1].tokens) if steps else 0


def first_word(model, x, **kw) -> None:
    """From the image tensor reaching the model to the first Step that `stream` yields."""
    gen = stream(model, x, **kw)
    next(gen)
    gen.close()


def inputs(model, image_path: str):
    """(decoded PIL image, preprocessed (3, S, S) tensor, its ImageFeatures, the decoder's state after `start`)."""
    pil = open_image(image_path)
    x = preprocess(pil, model.config)
    features = model.encode(x[None])
    with torch.inference_mode():
        _, state = model.decoder.start(features)  # the image and <SOS> fed; the first word's logits are out
    return pil, x, features, state


def latency(model, s: Settings, image_path: str, big_jpeg: str | None = None) -> dict:
    """Section 1. Each row: median ms of one call after warm-up (batch 1)."""
    cfg = model.config
    pil, x, features, state = inputs(model, image_path)
    token = torch.tensor([4 if len(model.vocab) > 4 else model.vocab.eos_id])
    rows: list[dict] = []

    def row(stage: str, fn, note: str = "", **extra) -> Stat:
        st = measure(fn, warmup=s.warmup, repeat=s.repeat)
        rows.append({"stage": stage, **st.as_dict(), "note": note, **extra})
        return st

    row("preprocess from decoded PIL image", lambda: preprocess(pil, cfg), f"{pil.size[0]}x{pil.size[1]} -> {cfg.image_size}x{cfg.image_size}")
    row("preprocess from JPEG file", lambda: preprocess(image_path, cfg), "open + decode + EXIF + resize + normalise")
    if big_jpeg:
        row("preprocess from 12 MP phone JPEG", lambda: preprocess(big_jpeg, cfg), "4032x3024")
    row("encoder (features + project), batch 1", lambda: model.encode(x[None]), cfg.backbone)

    def start():
        with torch.inference_mode():
            model.decoder.start(features)

    row("decoder start (image + <SOS> -> first word's logits)", start, "decoder.start on the encoder's output")

    def one_step():
        with torch.inference_mode():
            model.decoder.step(token, state)

    row("one decode step (embed + LSTM + head)", one_step, f"decoder.step; hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    # the three strategies take turns call by call, so their ratios hold on a busy machine
    stats = measure_interleaved({name: (lambda kw=kw: caption(model, x, **kw)) for name, kw in STRATEGY_KW.items()}, warmup=s.warmup, repeat=s.repeat)
    for name, kw in STRATEGY_KW.items():
        n = words(model, x, **kw)
        rows.append({"stage": f"whole caption, {name} (from image tensor)", **stats[name].as_dict(), "note": f"{n} words, encoder included",
                     "words": n})
    n = words(model, x)
    row("time to first streamed word (greedy)", lambda: first_word(model, x), "tensor in -> first Step out")
    row("whole caption, greedy (from JPEG file)", lambda: caption(model, image_path), f"{n} words, end to end", words=n)
    return {"rows": rows, "image": image_path}


def lookup(section: dict, stage_prefix: str) -> float | None:
    for r in section.get("rows", ()):
        if r.get("stage", "").startswith(stage_prefix):
            return r["median_ms"]
    return None


def throughput(model, s: Settings, images: list[str], batch_sizes=(1, 8, 32)) -> dict:
    """Section 2. caption_batch over decoded PIL images (what `python -m captioner folder/` does), greedy."""
    pils = [open_image(p) for p in images]
    rows = []
    for b in batch_sizes:
        caption_batch(model, pils[:b], batch_size=b, strategy="greedy")  # warm-up: one batch of this size
        st = measure(lambda b=b: caption_batch(model, pils, batch_size=b, strategy="greedy"), warmup=0, repeat=1 if s.quick else 3)
        rows.append({"batch_size": b, "images": len(pils), "median_s": round(st.median_ms / 1e3, 3),
                     "images_per_s": round(len(pils) / (st.median_ms / 1e3), 2), "ms_per_image": round(st.median_ms / len(pils), 2)})
    return {"rows": rows, "note": "caption_batch(strategy='greedy') over decoded PIL images: preprocessing + encoder + batched greedy decode"}
