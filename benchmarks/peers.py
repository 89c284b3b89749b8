"""Section 3: the captioners users would otherwise pick, built from configs with random weights (no downloads),
timed in the same run on the same preprocessed-tensor input, each generating exactly 16 new tokens.

  inception_v3+LSTM  the classic Show-and-Tell design: timm inception_v3 at 299x299 + our LSTM decoder (our own code)
  BLIP-base          transformers BlipForConditionalGeneration, the config of Salesforce/blip-image-captioning-base
  ViT-GPT2           transformers VisionEncoderDecoderModel: ViT-B/16 (224) + GPT-2 small with cross-attention
"""
from __future__ import annotations

import gc
import time
import warnings

import torch

from captioner.decode import caption, stream

from .common import Settings, log, measure

NEW_TOKENS = 16
PEERS = ("inception_v3", "blip", "vit-gpt2")

# What Salesforce/blip-image-captioning-base's config.json says (BlipConfig() differs in the text heads: 8, not 12).
BLIP_BASE = {
    "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 384, "patch_size": 16},
    "text": {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def _params(m) -> float:
    return round(sum(p.numel() for p in m.parameters()) / 1e6, 1)


def _never_end(decoder, eos_id: int) -> None:
    """Give <EOS> no chance in every logits row the decoder's seam (`start`, `step`) returns, on this instance only."""

    def masked(seam):
        def call(*args):
            logits, state = seam(*args)
            logits[:, eos_id] = -torch.inf  # (B, V)
            return logits, state

        return call

    decoder.start, decoder.step = masked(decoder.start), masked(decoder.step)


def build_inception(model, scale: str):
    from captioner import Captioner, CaptionerConfig

    size = 299 if scale == "full" else 75  # 75: inception_v3's smallest input, for the smoke test
    c = model.config
    cfg = CaptionerConfig(backbone="inception_v3", image_size=size, embed_size=c.embed_size, hidden_size=c.hidden_size,
                          num_layers=c.num_layers, vocab_size=c.vocab_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_len=NEW_TOKENS)
    torch.manual_seed(0)
    peer = Captioner(cfg, model.vocab).optimize_for_inference()  # as load_model serves any saved model
    _never_end(peer.decoder, model.vocab.eos_id)  # random weights: exactly 16 words, like the others
    x = torch.randn(3, size, size)

    def run(beams: int):
        kw = {"strategy": "beam", "beam_size": beams} if beams > 1 else {}
        return caption(peer, x, max_len=NEW_TOKENS, **kw)

    def tokens(beams: int) -> int:
        kw = {"strategy": "beam", "beam_size": beams} if beams > 1 else {}
        steps = list(stream(peer, x, max_len=NEW_TOKENS, **kw))
        return len(steps[-1].tokens) if steps else 0

    note = f"timm inception_v3 {size}x{size} + LSTM {c.hidden_size} (our decode code); <EOS> suppressed, max_len={NEW_TOKENS}"
    return peer, run, tokens, note, size


def build_blip(scale: str):
    from transformers import BlipConfig, BlipForConditionalGeneration

    if scale == "full":
        defaults = BlipConfig()
        deviations = {f"{part}.{k}": (getattr(getattr(defaults, f"{part}_config"), k), v)
                      for part, want in BLIP_BASE.items() for k, v in want.items() if getattr(getattr(defaults, f"{part}_config"), k) != v}
        cfg = BlipConfig(vision_config=dict(BLIP_BASE["vision"]), text_config=dict(BLIP_BASE["text"]))
        note = "BLIP-base: ViT-B/16 384px + BERT-base text decoder"
        if deviations:
            note += "; BlipConfig() defaults corrected to the checkpoint's: " + ", ".join(f"{k} {a}->{b}" for k, (a, b) in deviations.items())
    else:
        cfg = BlipConfig(vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=16),
                         text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                             bos_token_id=97, sep_token_id=98, eos_token_id=98, pad_token_id=0))
        note = "tiny BLIP config (smoke test)"
    torch.manual_seed(0)
    peer = BlipForConditionalGeneration(cfg).eval()
    size = cfg.vision_config.image_size
    x = torch.randn(1, 3, size, size)

    def gen(beams: int):
        with torch.inference_mode():
            return peer.generate(pixel_values=x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False)

    def tokens(beams: int) -> int:
        return int(gen(beams).shape[1]) - 1  # the prompt is one <BOS>

    return peer, gen, tokens, note, size


def build_vit_gpt2(scale: str):
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    if scale == "full":
        enc, dec = ViTConfig(), GPT2Config(add_cross_attention=True)
        note = "ViT-B/16 224px + GPT-2 small (cross-attention)"
    else:
        enc = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=16)
        dec = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=99, bos_token_id=98, eos_token_id=98, add_cross_attention=True)
        note = "tiny ViT-GPT2 config (smoke test)"
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = dec.bos_token_id
    cfg.pad_token_id = dec.eos_token_id
    cfg.eos_token_id = dec.eos_token_id
    torch.manual_seed(0)
    peer = VisionEncoderDecoderModel(config=cfg).eval()
    peer.generation_config.decoder_start_token_id = dec.bos_token_id
    peer.generation_config.pad_token_id = dec.eos_token_id
    peer.generation_config.eos_token_id = dec.eos_token_id
    size = enc.image_size
    x = torch.randn(1, 3, size, size)

    def gen(beams: int):
        with torch.inference_mode():
            return peer.generate(pixel_values=x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams, do_sample=False)

    def tokens(beams: int) -> int:
        return int(gen(beams).shape[1]) - 1  # the prompt is the decoder start token

    return peer, gen, tokens, note, size


def run(model, s: Settings, ours_greedy_ms: float, *, scale: str = "full", which=PEERS, ours_label: str = "ours") -> dict:
    """Time each peer, greedy and beam 3, as a ratio to `ours_greedy_ms` (our whole greedy caption, encoder included)."""
    rows = []
    for name in which:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "inception_v3":
                    peer, gen, tokens, note, size = build_inception(model, scale)
                    label = "Show-and-Tell: inception_v3 + LSTM"
                elif name == "blip":
                    peer, gen, tokens, note, size = build_blip(scale)
                    label = "BLIP-base (transformers)"
                elif name == "vit-gpt2":
                    peer, gen, tokens, note, size = build_vit_gpt2(scale)
                    label = "ViT-GPT2 (transformers)"
                else:
                    raise ValueError(f"unknown peer {name!r}; expected one of {PEERS}")
        except ImportError as e:
            rows.append({"peer": name, "skipped": f"{e.name or e} is not installed (pip install -r benchmarks/requirements.txt)"})
            log(f"  peers: {name} skipped ({e})")
            continue
        build_s = time.perf_counter() - t0
        row = {"peer": label, "params_m": _params(peer), "input": f"{size}x{size}", "build_s": round(build_s, 1), "note": note}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for beams, key in ((1, "greedy"), (3, "beam3")):
                    row[f"{key}_tokens"] = tokens(beams)  # doubles as the warm-up call
                    st = measure(lambda b=beams, g=gen: g(b), warmup=0, repeat=s.peer_repeat)
                    row[f"{key}_ms"] = round(st.median_ms, 1)
                    row[f"{key}_x_ours"] = round(st.median_ms / ours_greedy_ms, 1)
        except Exception as e:  # report, keep going with the other peers
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log(f"  peers: {label} done ({row.get('greedy_ms')} ms greedy)")
        del peer, gen, tokens
        gc.collect()
    return {"rows": rows, "ours_greedy_ms": round(ours_greedy_ms, 2), "ours": ours_label, "new_tokens": NEW_TOKENS,
            "note": f"random weights built from configs; input: a preprocessed tensor; {NEW_TOKENS} new tokens "
                    f"(min_new_tokens = max_new_tokens); ratio = peer ms / our whole greedy caption ms ({ours_label})"}
