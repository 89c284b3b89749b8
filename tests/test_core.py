"""Mechanics of the model, vocabulary, preprocessing and decoding, on tiny random configs."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, CaptionerConfig, ImageError, ModelLoadError, Vocabulary, preprocess
from captioner.decode import caption, caption_batch, stream
from captioner.model import caption_loss
from captioner.vocab import detokenize, tokenize
from tiny import WORDS, assert_all_different, rescore, tiny_config, tiny_model


def photo(w=40, h=30, seed=0, mode="RGB"):
    a = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB") if mode == "RGB" else Image.fromarray(a, "RGB").convert(mode)


# ---------------------------------------------------------------- vocabulary

def test_vocab_specials_encode_decode_and_threshold():
    v = Vocabulary.build(["A dog runs.", "A dog sits.", "A cat, in a T-shirt."], min_freq=2)
    assert v.itos[:4] == ["<PAD>", "<SOS>", "<EOS>", "<UNK>"]
    assert set(v.itos[4:]) == {"a", "dog", "."}  # "runs", "sits", "cat" seen once: below the threshold
    ids = v.encode("A dog flies.")
    assert ids[0] == v.sos_id and ids[-1] == v.eos_id and v.unk_id in ids
    assert v.decode([v.sos_id, v.stoi["a"], v.stoi["dog"], v.stoi["."], v.eos_id, v.stoi["dog"]]) == "A dog."


def test_tokenize_lowercases_and_detokenize_rejoins_hyphens_and_punctuation():
    assert tokenize("A man in a T-shirt, smiling .") == ["a", "man", "in", "a", "t", "-", "shirt", ",", "smiling", "."]
    assert detokenize(["a", "man", "in", "a", "t", "-", "shirt", ",", "smiling", "."]) == "A man in a t-shirt, smiling."
    assert detokenize(["the", "dog", "'s", "ball"]) == "The dog's ball"


def test_vocab_mismatch_is_an_error_naming_both_sizes():
    with pytest.raises(ValueError, match=r"9 words.*vocab_size=8"):
        Captioner(tiny_config(), Vocabulary(WORDS + ["cat"]))


# ---------------------------------------------------------------- model

def test_training_forward_alignment_table():
    """Inputs [image, <SOS>, dog, eating, food] predict targets [<SOS>, dog, eating, food, <EOS>]."""
    m = tiny_model()
    caps = torch.tensor([[1, 5, 6, 7, 2]]).T  # (T=5, B=1): <SOS> dog runs . <EOS>
    img = torch.randn(1, 3, 32, 32)
    logits = m(img, caps)
    assert logits.shape == (5, 1, len(WORDS))
    # Recompute step by step: t=0 sees the image, t=1 <SOS> (together: Decoder.start), then dog, ... (Decoder.step)
    features = m.encoder(img)
    first, state = m.decoder.advance(features.vector, None)  # t=0: the image, predicting <SOS>
    out, state = m.decoder.start(features)  # t=0 and t=1: its logits predict the first word
    stepped = [first, out]
    for tok in caps[1:-1, 0]:
        out, state = m.decoder.step(tok.view(1), state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped), logits, atol=1e-5, rtol=1e-5)
    # and the loss compares output t with caption t
    loss = caption_loss(logits, caps)
    manual = torch.nn.functional.cross_entropy(logits[:, 0], caps[:, 0])
    torch.testing.assert_close(loss, manual)


def test_loss_ignores_padding():
    m = tiny_model()
    caps = torch.tensor([[1, 5, 2, 0, 0], [1, 5, 6, 7, 2]]).T  # (T, B)
    logits = m(torch.randn(2, 3, 32, 32), caps)
    loss = caption_loss(logits, caps)
    garbage = logits.clone()
    garbage[3:, 0] = torch.randn_like(garbage[3:, 0]) * 100  # padded positions of sample 0
    assert torch.allclose(loss, caption_loss(garbage, caps))
    nonpad = caps != 0
    manual = torch.nn.functional.cross_entropy(logits[nonpad], caps[nonpad])
    torch.testing.assert_close(loss, manual)


def test_frozen_backbone_switch():
    m = tiny_model()
    assert not any(p.requires_grad for p in m.encoder.backbone.parameters())
    m.train()
    assert not m.encoder.backbone.training  # frozen batch-norm statistics
    m2 = tiny_model(train_backbone=True)
    assert all(p.requires_grad for p in m2.encoder.backbone.parameters())


# ---------------------------------------------------------------- save / load

def test_save_load_round_trip_identical_outputs(tmp_path):
    m = tiny_model(3)
    m.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "vocab.json"}
    m2 = Captioner.from_pretrained(tmp_path / "m")
    img = photo()
    assert m2.config == m.config and m2.vocab == m.vocab
    assert [s.__dict__ for s in stream(m, img, num_alternatives=3)] == [s.__dict__ for s in stream(m2, img, num_alternatives=3)]


def test_strict_loading_rejects_wrong_files(tmp_path):
    m = tiny_model()
    d = tmp_path / "m"
    m.save_pretrained(d)
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    extra = dict(state, **{"decoder.extra": torch.zeros(1)})
    save_file(extra, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected"):
        Captioner.from_pretrained(d)
    state.pop("decoder.head.bias")
    save_file(state, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing"):
        Captioner.from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="corrupted or truncated"):
        Captioner.from_pretrained(d)
    assert not (d / "pytorch_model.bin").exists()  # never falls back to a pickle


def test_load_errors_for_config_and_vocab(tmp_path):
    import json

    m = tiny_model()
    d = tmp_path / "m"
    m.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="newer"):
        Captioner.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        Captioner.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    Vocabulary(WORDS[:-1]).save(d)
    with pytest.raises(ModelLoadError, match=r"7 words.*vocab_size=8"):
        Captioner.from_pretrained(d)
    with pytest.raises(ModelLoadError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "nowhere")


def test_load_errors_for_shapes_json_vocab_and_backbone(tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    tiny_model().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    # weights whose shapes do not match the config: a model with a wider LSTM, the config of the narrow one
    tiny_model(hidden_size=24).save_pretrained(tmp_path / "wide")
    shutil.copy(tmp_path / "wide" / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"has shape \(96, 16\), the config needs \(64, 16\)"):
        Captioner.from_pretrained(d)
    tiny_model().save_pretrained(d)
    (d / "config.json").write_text('{"backbone": "test_efficientnet", ')  # cut off
    with pytest.raises(ModelLoadError, match="bad config.json"):
        Captioner.from_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "vocab.json").unlink()
    with pytest.raises(ModelLoadError, match="missing vocab.json"):
        Captioner.from_pretrained(d)
    # a config naming a backbone timm does not know: a ModelLoadError with timm's reason, not timm's RuntimeError
    tiny_model().save_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "backbone": "no_such_backbone"}))
    with pytest.raises(ModelLoadError, match="no_such_backbone"):
        Captioner.from_pretrained(d)


# ---------------------------------------------------------------- decoding

def test_stream_equals_caption_and_records_are_consistent():
    m = tiny_model(5, max_len=12)
    img = photo(seed=2)
    for kw in ({}, {"strategy": "beam", "beam_size": 3}, {"strategy": "sample", "seed": 7, "top_p": 0.9, "temperature": 0.8}):
        steps = list(stream(m, img, **kw))
        assert steps and caption(m, img, **kw) == steps[-1].text
        assert steps[-1].stop in ("eos", "unk", "max_len") and all(s.stop is None for s in steps[:-1])
    steps = list(stream(m, img, num_alternatives=3))
    cum = 0.0
    for t, s in enumerate(steps):
        assert s.t == t and s.tokens[-1] == s.token and len(s.tokens) == t + 1
        assert len(s.alternatives) <= 3 and s.alternatives[0].prob >= s.alternatives[-1].prob
        assert s.alternatives[0].token == s.token  # greedy picks the most likely word
        cum += math.log(s.prob)
        assert s.logprob == pytest.approx(cum, abs=1e-5)


def test_beam_one_equals_greedy():
    for seed in range(4):
        m = tiny_model(seed, max_len=10)
        imgs = [photo(seed=s) for s in range(3)]
        assert [caption(m, i, strategy="beam", beam_size=1) for i in imgs] == [caption(m, i) for i in imgs]


def test_batch_equals_single_in_order_for_every_batch_size(distinct):
    """On the fixture whose captions differ per photo: a batch that shuffled, dropped or crossed captions fails."""
    m, photos = distinct
    greedy = [caption(m, p) for p in photos]
    assert_all_different(greedy)
    beam = [caption(m, p, strategy="beam", beam_size=2) for p in photos]
    assert_all_different(beam)
    for batch_size in (1, 4, len(photos), 32):  # 4: a full batch, then a partial one
        assert caption_batch(m, photos, batch_size=batch_size) == greedy
        assert caption_batch(m, photos, strategy="beam", beam_size=2, batch_size=batch_size) == beam
    order = [3, 0, 5, 1, 4, 2]
    assert caption_batch(m, [photos[i] for i in order], batch_size=4) == [greedy[i] for i in order]
    with pytest.raises(ValueError, match="batch_size=0"):
        caption_batch(m, photos, batch_size=0)


def test_max_len_eos_and_no_special_tokens():
    m = tiny_model(1)
    img = photo()
    for n in (1, 3, 7):
        steps = list(stream(m, img, max_len=n))
        assert len(steps) <= n
        if len(steps) < n:
            assert steps[-1].stop in ("eos", "unk")  # unk: a random model may like <UNK> best
    # Force a model that always wants <EOS> after one word: bias the head.
    with torch.no_grad():
        m.decoder.head.bias[2] = 50.0
    steps = list(stream(m, img, max_len=10))
    assert len(steps) == 1 and steps[0].stop == "eos"  # <EOS> is never allowed before the first word
    with torch.no_grad():
        m.decoder.head.bias[:4] = torch.tensor([60.0, 60.0, -60.0, 60.0])  # <PAD>, <SOS>, <UNK> very likely
    for strategy in ("greedy", "beam", "sample"):
        text = caption(m, img, strategy=strategy, max_len=6, seed=0)
        assert not any(sp in text for sp in ("<PAD>", "<SOS>", "<EOS>", "<UNK>"))
        assert text


def test_beam_search_never_crashes_when_no_beam_ends():
    m = tiny_model(2)
    with torch.no_grad():
        m.decoder.head.bias[2] = -1e4  # <EOS> never wins
    steps = list(stream(m, photo(), strategy="beam", beam_size=4, max_len=6))
    assert steps[-1].stop == "max_len" and len(steps[-1].tokens) == 6


def test_sampling_is_seedable():
    m = tiny_model(4, max_len=12)
    img = photo()
    a = [caption(m, img, strategy="sample", seed=s) for s in range(5)]
    assert a == [caption(m, img, strategy="sample", seed=s) for s in range(5)]
    assert len(set(a)) > 1


def test_no_repeat_ngram_blocks_repeats():
    m = tiny_model(1, max_len=12)
    img = photo()
    plain = dict(block_function_words=True)  # every n-gram, function words too
    for s in [stream(m, img, no_repeat_ngram=1, **plain), stream(m, img, strategy="beam", no_repeat_ngram=1, **plain)]:
        toks = list(s)[-1].tokens
        assert len(toks) == len(set(toks))
    toks = list(stream(m, img, no_repeat_ngram=2, **plain))[-1].tokens
    bigrams = list(zip(toks, toks[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_branching_forces_a_word_and_continues():
    m = tiny_model(6, max_len=8)
    img = photo()
    base = list(stream(m, img))
    at = 1 if len(base) > 1 else 0
    alt = next(a.token for a in base[at].alternatives if a.token != base[at].token and a.token != 2) if base[at].alternatives[1:] else 4
    prefix = [s.token for s in base[:at]] + [alt]
    branched = list(stream(m, img, prefix=prefix))
    assert [s.token for s in branched[: at + 1]] == prefix
    for a, b in zip(base[:at], branched[:at]):
        assert a.prob == pytest.approx(b.prob) and a.alternatives == b.alternatives  # same prefix, same view
    # rescoring a caption reproduces the records of the stream that made it
    rescored = rescore(m, img, list(base[-1].tokens), num_alternatives=5)
    assert [s.token for s in rescored] == [s.token for s in base]
    assert [round(s.prob, 5) for s in rescored] == [round(s.prob, 5) for s in base]
    with pytest.raises(ValueError, match="prefix token 999"):
        list(stream(m, img, prefix=[999]))


def test_bad_settings_are_value_errors_naming_the_value():
    m = tiny_model()
    for kw, pat in [({"strategy": "magic"}, "magic"), ({"max_len": 0}, "max_len=0"), ({"beam_size": 0}, "beam_size=0"),
                    ({"temperature": 0}, "temperature=0"), ({"top_p": 1.5}, "top_p=1.5")]:
        with pytest.raises(ValueError, match=pat):
            list(stream(m, photo(), **kw))


# ---------------------------------------------------------------- preprocessing

def _exif_rotated():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB", "YCbCr"])
def test_every_pil_mode_converts(mode):
    base = photo(37, 23)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "PA":
        img = base.convert("RGBA").convert("PA") if hasattr(Image, "Palette") else base.convert("P")
    else:
        img = base.convert(mode)
    cfg = tiny_config()
    x = preprocess(img, cfg)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -1.0001 <= float(x.min()) and float(x.max()) <= 1.0001  # mean = std = 0.5
    if mode == "I;16":  # 16-bit scaled, not clipped to white
        ref = preprocess(base.convert("L"), cfg)
        assert (x - ref).abs().max() < 0.05


def test_transparency_is_composited_on_white_and_exif_applied():
    cfg = tiny_config(image_size=8)
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert torch.allclose(preprocess(clear, cfg), torch.ones(3, 8, 8))
    img = _exif_rotated()
    assert img.size == (40, 20)
    from captioner.preprocess import open_image

    upright = open_image(img)
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after rotation


def test_resize_policies():
    wide = Image.new("RGB", (200, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 50, 100))  # white left quarter
    squash = preprocess(wide, tiny_config(resize="squash"))
    crop = preprocess(wide, tiny_config(resize="crop"))
    assert squash[0, 16, 2] > 0.9  # squashed: the white strip survives on the left
    assert crop[0, 16, 2] < -0.9  # centre crop: the left quarter is cut away
    with pytest.raises(ValueError, match="resize='stretch'"):
        CaptionerConfig(resize="stretch")


def test_bad_images_raise_clear_errors(tmp_path):
    cfg = tiny_config()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    buf = io.BytesIO()
    photo(200, 200).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[:300])
    for name, pat in [("empty.jpg", "empty"), ("text.jpg", "not an image"), ("trunc.jpg", "damaged or truncated"), ("nope.png", "no such file")]:
        with pytest.raises(ImageError, match=pat):
            preprocess(tmp_path / name, cfg)
    big = Image.new("1", (9000, 9000))
    big.save(tmp_path / "huge.png")
    with pytest.raises(ImageError, match="too large"):
        preprocess(tmp_path / "huge.png", cfg)
    assert preprocess(Image.new("RGB", (1, 1)), cfg).shape == (3, 32, 32)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    x = preprocess(tmp_path / "a.gif", tiny_config())
    assert x[0].mean() > 0.9 and x[1].mean() < -0.9  # red


def test_inference_copy_of_the_encoder_gives_the_same_features_and_captions():
    m = tiny_model(4, max_len=8)
    imgs = [photo(seed=s) for s in range(3)]
    x = torch.stack([preprocess(i, m.config) for i in imgs])
    with torch.inference_mode():
        ref = m.encoder.backbone_features(x)
    before = [caption(m, i) for i in imgs]
    m.optimize_for_inference()
    with torch.inference_mode():
        torch.testing.assert_close(m.encoder.backbone_features(x), ref, atol=1e-4, rtol=1e-4)
    assert [caption(m, i) for i in imgs] == before
    assert "_fast" not in str(list(m.state_dict()))  # never saved
    m.train()
    assert torch.is_grad_enabled() and m.encoder.backbone_features(x).requires_grad is False  # frozen: original path, no grad


def test_generate_batch_top_k_samples_only_the_k_likeliest_words():
    from captioner.decode import generate_batch
    from captioner.generation import GenerationConfig
    from captioner.model import ImageFeatures

    def rollout(top_k: int = 0) -> GenerationConfig:  # as self-critical training samples: one word, no nucleus
        return GenerationConfig(strategy="sample", max_len=1, top_k=top_k, top_p=1.0, no_repeat_ngram=0)

    m = tiny_model(seed=3)
    feats = ImageFeatures(torch.randn(64, m.config.embed_size))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = generate_batch(m, feats, rollout(top_k=2), generator=gen)[:, 0]  # (64,)
        start_logits, _ = m.decoder.start(feats)  # (64, V)
    v = m.vocab
    start_logits[:, [v.pad_id, v.sos_id, v.unk_id, v.eos_id]] = -math.inf
    top2 = start_logits.topk(2, dim=-1).indices  # (64, 2)
    assert all(int(t) in top2[i].tolist() for i, t in enumerate(first))
    with torch.no_grad():
        wide = generate_batch(m, feats, rollout(), generator=torch.Generator().manual_seed(0))[:, 0]
    assert any(int(t) not in top2[i].tolist() for i, t in enumerate(wide))  # without top_k, others are drawn too
    with pytest.raises(ValueError, match="top_k"):
        rollout(top_k=-1)
