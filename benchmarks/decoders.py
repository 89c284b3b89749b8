"""Section 7: the two decoders side by side, same run, same image, same caption length.

Show-and-Tell (the image at t=0) against the attention decoder (soft attention over the 7x7 map at every word).
Both are built with the default sizes (Lite0, embed 512, LSTM 512) and made to write exactly WORDS words (<EOS>
masked), so only the architecture differs; the variants take turns call by call (`measure_interleaved`). With
trained models (--model / --attend-model in run.py) their own weights are used, still at WORDS words.
"""
from __future__ import annotations

import torch

from captioner.decode import caption, stream
from captioner.preprocess import preprocess

from .common import Settings, measure_interleaved, random_default_model
from .peers import _never_end

WORDS = 10


def run(s: Settings, image_path: str, *, show_tell=None, attend=None) -> dict:
    models = {
        "show-tell": show_tell or random_default_model(),
        "attend": attend or random_default_model(decoder="attend"),
    }
    for m in models.values():
        _never_end(m.decoder, m.vocab.eos_id)  # every caption has exactly WORDS words
    x = {name: preprocess(image_path, m.config) for name, m in models.items()}  # (3, S, S) each

    def first_word(m, xx):
        gen = stream(m, xx, max_len=WORDS)
        next(gen)
        gen.close()

    def one_step(m, xx):
        with torch.inference_mode():
            _, state = m.decoder.start(m.encode(xx[None]))
        tok = torch.tensor([4])

        @torch.inference_mode()
        def call():
            return m.decoder.step(tok, state)

        return call

    rows = []
    measures = {
        "whole greedy caption (encoder included)": lambda m, xx: (lambda: caption(m, xx, max_len=WORDS)),
        "time to first streamed word": lambda m, xx: (lambda: first_word(m, xx)),
        "whole beam-3 caption": lambda m, xx: (lambda: caption(m, xx, strategy="beam", beam_size=3, max_len=WORDS)),
        "one decoder step (batch 1)": one_step,
    }
    for stage, make in measures.items():
        stats = measure_interleaved({n: make(m, x[n]) for n, m in models.items()}, warmup=s.warmup, repeat=s.repeat)
        st, at = stats["show-tell"], stats["attend"]
        rows.append({"stage": stage, "show_tell_ms": round(st.median_ms, 3), "attend_ms": round(at.median_ms, 3),
                     "ratio": round(at.median_ms / st.median_ms, 3), "n": st.n})
    params = {n: round(sum(p.numel() for p in m.decoder.parameters()) / 1e6, 2) for n, m in models.items()}
    return {"words": WORDS, "rows": rows, "decoder_params_m": params,
            "targets": {"greedy_ratio_max": 1.3, "first_word_ratio_max": 1.2}}
