"""Section 6: the speed levers, each measured against the current code (variants interleaved call by call, so a
busy machine slows both alike) and checked to give the same captions. Kept: faster by >= 5% and same captions."""
from __future__ import annotations

import os
import time
import warnings

import torch

from captioner.decode import caption, caption_batch
from captioner.preprocess import open_image, preprocess

from .common import Settings, log, measure_interleaved
from .fast import applied, build_variant, preprocess_draft
from .model_bench import first_word, inputs

KEEP_SPEEDUP = 1.05
PROPOSALS = {
    "eager": ("lstm_cell", "fuse_bn", "channels_last", "chunk8"),
    "eager+jit": ("lstm_cell", "fuse_bn", "channels_last", "jit_freeze", "chunk8"),
}


def _captions(model, xs, overrides=None) -> list[str]:
    overrides = overrides or {}
    with applied(model, overrides):
        return [caption(model, x, **kw) for x in xs for kw in ({}, {"strategy": "beam", "beam_size": 3})]


def _same(base: list[str], other: list[str]) -> str:
    diff = sum(a != b for a, b in zip(base, other))
    return f"yes ({len(base)}/{len(base)})" if not diff else f"no ({diff}/{len(base)} differ)"


def _verdict(before: float, after: float, same: str) -> str:
    if not same.startswith("yes"):
        return "drop: changes captions"
    if before / after >= KEEP_SPEEDUP:
        return "keep"
    return "drop: no gain" if before / after > 0.95 else "drop: slower"


def _row(lever, measured, before, after, same, note="", verdict=None) -> dict:
    return {"lever": lever, "measured": measured, "before_ms": round(before, 3), "after_ms": round(after, 3),
            "speedup": round(before / after, 2) if after else None, "same_output": same,
            "verdict": verdict or _verdict(before, after, same), "note": note}


def run(model, s: Settings, images: list[str], big_jpeg: str | None, *, with_compile: bool = False) -> dict:
    cfg = model.config
    _, x, feature, _ = inputs(model, images[0])
    xb = x[None]
    xs = [preprocess(p, cfg) for p in images[: s.check_images]]
    base_caps = _captions(model, xs)
    rows: list[dict] = []
    w, r = s.warmup, s.repeat

    # --- autograd bookkeeping off: no_grad -> inference_mode (the encoder, batch 1)
    def enc_under(ctx):
        def f():
            with ctx():
                model.encoder(xb)
        return f

    st = measure_interleaved({"grad": enc_under(torch.enable_grad), "no_grad": enc_under(torch.no_grad),
                              "inference_mode": enc_under(torch.inference_mode)}, warmup=w, repeat=r)
    rows.append(_row("torch.inference_mode (vs no_grad)", "encoder, batch 1", st["no_grad"].median_ms, st["inference_mode"].median_ms,
                     "yes (same maths)", f"autograd on: {st['grad'].median_ms:.1f} ms; decode.py already uses inference_mode",
                     verdict="already in place"))

    # --- threads (whole greedy caption from the image tensor)
    current = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = sorted({1, current, cores, max(1, cores // 2)})

    def at_threads(n):
        def f():
            torch.set_num_threads(n)
            caption(model, x)
        return f

    try:
        st = measure_interleaved({n: at_threads(n) for n in counts}, warmup=w, repeat=max(3, r // 2))
    finally:
        torch.set_num_threads(current)
    for n in counts:
        if n != current:
            rows.append(_row(f"torch.set_num_threads({n}) (vs {current})", "whole greedy caption", st[current].median_ms, st[n].median_ms,
                             "yes (same maths)", f"{cores} cores available; a busy machine favours fewer threads"))

    # --- decoder: LSTM step through torch.lstm_cell; int8 dynamic quantisation
    token = torch.tensor([4 if len(model.vocab) > 4 else model.vocab.eos_id])
    with torch.inference_mode():
        _, state = model.decoder.step(feature, None)
    for lever in ("lstm_cell", "int8_decoder"):
        over = build_variant(model, [lever])

        def step_base():
            with torch.inference_mode():
                model.decoder.step(token, state)

        def step_var(over=over):
            with torch.inference_mode(), applied(model, over):
                model.decoder.step(token, state)

        def cap_var(over=over):
            with applied(model, over):
                caption(model, feature)

        with torch.inference_mode():
            old_logits = model.decoder.step(token, state)[0]
            with applied(model, over):
                new_logits = model.decoder.step(token, state)[0]
        diff = float((new_logits - old_logits).abs().max())
        same = _same(base_caps, _captions(model, xs, over))
        st = measure_interleaved({"base": step_base, "var": step_var}, warmup=w, repeat=max(r, 20))
        note = f"max |Δlogit| {diff:.1e}"
        rows.append(_row(lever, "one decode step", st["base"].median_ms, st["var"].median_ms, same, note))
        st = measure_interleaved({"base": lambda: caption(model, feature), "var": cap_var}, warmup=w, repeat=r)
        rows.append(_row(lever, "greedy caption from cached feature", st["base"].median_ms, st["var"].median_ms, same, note))

    # --- encoder: conv+BN folding, channels_last, jit trace+freeze, torch.compile
    encoder_levers = [("fuse_bn",), ("channels_last",), ("fuse_bn", "channels_last"), ("jit_freeze",), ("channels_last", "jit_freeze")]
    if with_compile:
        encoder_levers.append(("channels_last", "compile"))
    with torch.inference_mode():
        ref = model.encoder.features(xb)
    for levers in encoder_levers:
        t0 = time.perf_counter()
        try:
            over = build_variant(model, levers)
            with torch.inference_mode(), applied(model, over):
                out = model.encoder.features(xb)  # compile happens here
        except Exception as e:  # e.g. torch.compile without a C++ compiler
            rows.append({"lever": "+".join(levers), "measured": "encoder features", "verdict": f"failed: {type(e).__name__}: {e}"[:200]})
            continue
        build_s = time.perf_counter() - t0
        diff = float((out - ref).abs().max())
        same = _same(base_caps, _captions(model, xs, over))

        def enc_var(over=over):
            with torch.inference_mode(), applied(model, over):
                model.encoder.features(xb)

        def enc_base():
            with torch.inference_mode():
                model.encoder.features(xb)

        st = measure_interleaved({"base": enc_base, "var": enc_var}, warmup=w, repeat=r)
        rows.append(_row("+".join(levers), "encoder features, batch 1", st["base"].median_ms, st["var"].median_ms, same,
                         f"max |Δfeature| {diff:.1e}; one-off build {build_s:.2f} s"))

    # --- caption_batch at batch 32: the encoder fed 8 images at a time
    pils = [open_image(p) for p in images[:32]]
    batch_variants = {"base": {}, "chunk8": build_variant(model, ["chunk8"]),
                      "fuse_bn+channels_last": build_variant(model, ["fuse_bn", "channels_last"]),
                      "fuse_bn+channels_last+chunk8": build_variant(model, ["fuse_bn", "channels_last", "chunk8"])}

    def batch_fn(over):
        def f():
            with applied(model, over):
                caption_batch(model, pils, batch_size=32)
        return f

    st = measure_interleaved({k: batch_fn(v) for k, v in batch_variants.items()}, warmup=1, repeat=1 if s.quick else 3)
    for k in list(batch_variants)[1:]:
        same = _same(base_caps, _captions(model, xs, batch_variants[k]))
        rows.append(_row(k, f"caption_batch of {len(pils)} images, batch 32 (per image)", st["base"].median_ms / len(pils),
                         st[k].median_ms / len(pils), same, "encoder batch 32 at 224x224: activations far beyond the CPU caches"))

    # --- preprocessing: JPEG draft mode (decoder downscales in the DCT), vs the current path
    rows.extend(_preprocess_rows(model, s, images, big_jpeg))

    # --- re-using the encoder output when only decode settings change (what the app's feature cache does)
    st = measure_interleaved({"base": lambda: caption(model, x, strategy="beam"), "var": lambda: caption(model, feature, strategy="beam")},
                             warmup=w, repeat=r)
    rows.append(_row("re-use the encoder output", "beam 3 caption after a settings change", st["base"].median_ms, st["var"].median_ms,
                     "yes (same feature)", "decode.stream/caption accept the (1, E) feature; captioner/ui.py caches it per session",
                     verdict="keep (app already does)"))

    # --- the proposals together
    proposals = {}
    for name, levers in PROPOSALS.items():
        t0 = time.perf_counter()
        over = build_variant(model, levers)
        build_s = time.perf_counter() - t0
        same = _same(base_caps, _captions(model, xs, over))

        def var(fn, over=over):
            def f():
                with applied(model, over):
                    fn()
            return f

        metrics = {
            "whole greedy caption": lambda: caption(model, x),
            "time to first word": lambda: first_word(model, x),
            "whole beam 3 caption": lambda: caption(model, x, strategy="beam", beam_size=3),
        }
        result = {"levers": list(levers), "build_s": round(build_s, 2), "same_output": same}
        fns = {}
        for metric, fn in metrics.items():
            fns[("base", metric)] = fn
            fns[("var", metric)] = var(fn)
        st = measure_interleaved(fns, warmup=w, repeat=r)
        for metric in metrics:
            b, a = st[("base", metric)].median_ms, st[("var", metric)].median_ms
            rows.append(_row(f"PROPOSED {name}: " + "+".join(levers), metric, b, a, same, f"one-off build {build_s:.2f} s"))
            result[metric] = {"before_ms": round(b, 3), "after_ms": round(a, 3)}
        pils = [open_image(p) for p in images]
        st = measure_interleaved({"base": lambda: caption_batch(model, pils, batch_size=32),
                                  "var": var(lambda: caption_batch(model, pils, batch_size=32))}, warmup=1, repeat=1 if s.quick else 3)
        result["batch32_images_per_s"] = {"before": round(len(pils) / (st["base"].median_ms / 1e3), 2),
                                          "after": round(len(pils) / (st["var"].median_ms / 1e3), 2)}
        rows.append(_row(f"PROPOSED {name}: " + "+".join(levers), f"caption_batch of {len(pils)} images, batch 32 (per image)",
                         st["base"].median_ms / len(pils), st["var"].median_ms / len(pils), same, f"one-off build {build_s:.2f} s"))
        proposals[name] = result
        log(f"  levers: proposal {name} done")
    return {"rows": rows, "proposals": proposals, "check_images": len(xs),
            "note": "before/after interleaved call by call; same_output compares greedy and beam-3 captions on the check images"}


def _preprocess_rows(model, s: Settings, images: list[str], big_jpeg: str | None) -> list[dict]:
    cfg = model.config
    rows = []
    w, r = s.warmup, s.repeat
    pil = open_image(images[0])

    try:  # the textbook torchvision pipeline, for comparison with preprocess()'s one numpy pass
        import torchvision.transforms.functional as TF
        from PIL import Image

        def tv():
            t = TF.to_tensor(pil.resize((cfg.image_size, cfg.image_size), Image.BILINEAR))
            return TF.normalize(t, cfg.mean, cfg.std)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = float((tv() - preprocess(pil, cfg)).abs().max())
            st = measure_interleaved({"tv": tv, "ours": lambda: preprocess(pil, cfg)}, warmup=w, repeat=r)
        rows.append(_row("fused preprocessing (numpy, one pass)", "preprocess from decoded PIL image", st["tv"].median_ms,
                         st["ours"].median_ms, "yes" if diff < 1e-5 else f"max |Δ| {diff:.1e}",
                         "before = torchvision to_tensor + normalize", verdict="already in place"))
    except ImportError:
        pass

    from PIL import Image

    for path in (images[0], big_jpeg):
        if not path:
            continue
        with Image.open(path) as im:
            label = f"{im.size[0]}x{im.size[1]} JPEG"
        a, b = preprocess(path, cfg), preprocess_draft(path, cfg)
        diff = float((a - b).abs().max())
        same_cap = caption(model, a) == caption(model, b)
        same = "yes (identical pixels)" if diff == 0 else (f"caption same, max |Δpixel| {diff:.2f}" if same_cap else f"no (max |Δpixel| {diff:.2f})")
        st = measure_interleaved({"base": lambda p=path: preprocess(p, cfg), "var": lambda p=path: preprocess_draft(p, cfg)}, warmup=w, repeat=r)
        verdict = _verdict(st["base"].median_ms, st["var"].median_ms, "yes")
        if diff and verdict == "keep":
            verdict = "keep (optional: pixels change slightly)"
        rows.append(_row("JPEG draft mode (PIL Image.draft)", f"preprocess from {label}", st["base"].median_ms, st["var"].median_ms, same,
                         "decoder downscales by 1/2..1/8 while both sides stay >= the model's size", verdict=verdict))
    return rows
