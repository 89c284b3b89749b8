"""The decoder seam and decoding settings, for both decoders (show-tell, attend), on tiny random configs.

Every decoder is driven only through start/step; these tests hold each decoding path (greedy, beam, sampling,
branching, batches, re-used features) to the same contract for both.
"""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, GenerationConfig, ImageFeatures, ModelLoadError
from captioner.decode import caption, caption_batch, encode, final, generate_batch, stream
from tiny import WORDS, assert_all_different, photo, rescore, scripted_model, tiny_model

DECODERS = ["show-tell", "attend"]
SETTINGS = [{}, {"strategy": "beam", "beam_size": 3}, {"strategy": "beam", "beam_size": 1},
            {"strategy": "sample", "seed": 3, "temperature": 0.9, "top_k": 4}]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # encode() runs in inference mode; nothing here trains
        yield


def model_of(decoder, seed=0, **kw):
    m = tiny_model(seed, decoder=decoder, max_len=kw.pop("max_len", 8), **kw)
    with torch.no_grad():
        m.decoder.head.bias[2] -= 1.5  # <EOS> rarer: captions run several words
    return m


# ---------------------------------------------------------------- the seam


@pytest.mark.parametrize("decoder", DECODERS)
def test_teacher_forcing_equals_start_then_steps(decoder):
    """Output t of the training forward predicts captions[t]; start/step give the same logits from t = 1 on."""
    m = model_of(decoder)
    caps = torch.tensor([[1, 5, 6, 7, 2], [1, 4, 5, 2, 0]]).T  # (T=5, B=2)
    img = torch.randn(2, 3, 32, 32)
    logits = m(img, caps)  # (T, B, V)
    assert logits.shape == (5, 2, 8)
    logits_t, state = m.decoder.start(m.encoder(img))
    stepped = [logits_t]
    for tok in caps[1:-1]:
        logits_t, state = m.decoder.step(tok, state)
        stepped.append(logits_t)
    torch.testing.assert_close(torch.stack(stepped), logits[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_state_select_reorders_and_repeats_the_batch(decoder):
    m = model_of(decoder)
    feats = m.encode(torch.randn(3, 3, 32, 32))
    logits, state = m.decoder.start(feats)
    tok = torch.tensor([4, 5, 6])
    picked = state.select(torch.tensor([2, 0]))
    torch.testing.assert_close(m.decoder.step(tok[[2, 0]], picked)[0], m.decoder.step(tok, state)[0][[2, 0]])
    many = state.select(torch.arange(3).repeat_interleave(2))  # rows 0,0,1,1,2,2
    torch.testing.assert_close(m.decoder.step(tok.repeat_interleave(2), many)[0], m.decoder.step(tok, state)[0].repeat_interleave(2, 0))


def test_attend_uses_the_spatial_map_and_show_tell_does_not():
    att, st = model_of("attend"), model_of("show-tell")
    x = torch.randn(2, 3, 64, 64)
    assert att.encode(x).grid.shape[:2] == (2, 4) and st.encode(x).grid is None  # 64/32 = 2: 2x2 regions
    # Same pooled vector, different regions: the attend decoder's first word distribution changes.
    f = att.encode(x)
    shuffled = ImageFeatures(f.vector, f.grid.flip(1) * 3)
    assert not torch.allclose(att.decoder.start(f)[0], att.decoder.start(shuffled)[0])


# ---------------------------------------------------------------- decoding through the seam


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.get("strategy", "greedy") + str(s.get("beam_size", "")))
def test_streamed_and_non_streamed_output_agree(decoder, s):
    m = model_of(decoder, 1)
    img = photo()
    steps = list(stream(m, img, **s))
    assert steps and steps[-1].stop in ("eos", "unk", "max_len") and all(x.stop is None for x in steps[:-1])
    assert caption(m, img, **s) == steps[-1].text == caption(m, img, GenerationConfig(**s))
    assert caption_batch(m, [img, photo(1)], **s)[0] == steps[-1].text
    # The last record carries the final caption's records: what rescoring its words gives.
    final = steps[-1].caption_steps()
    assert [x.token for x in final] == list(steps[-1].tokens)
    again = rescore(m, img, list(steps[-1].tokens))
    assert [round(x.prob, 5) for x in again] == [round(x.prob, 5) for x in final]
    rounded = lambda recs: [[(a.token, round(a.prob, 5)) for a in x.alternatives] for x in recs]  # noqa: E731
    assert rounded(again) == rounded(final)  # beams run batched: equal up to float noise
    if s.get("strategy", "greedy") != "beam":
        assert tuple(steps) == final  # greedy and sampling stream exactly the caption they keep


@pytest.mark.parametrize("decoder", DECODERS)
def test_features_from_encode_decode_like_the_image(decoder):
    m = model_of(decoder, 2)
    img = photo(4)
    f = encode(m, img)
    for s in SETTINGS:
        assert caption(m, features=f, **s) == caption(m, img, **s)
    with pytest.raises(ValueError, match="either an image or features"):
        caption(m, img, features=f)
    with pytest.raises(ValueError, match="either an image or features"):
        caption(m)


@pytest.fixture(params=DECODERS)
def distinct_of(request):
    """(model, photos) whose captions differ per photo, for each decoder (conftest's session fixtures)."""
    return request.getfixturevalue("distinct" if request.param == "show-tell" else "distinct_attend")


def test_batched_features_decode_in_order(distinct_of):
    from captioner.preprocess import preprocess_batch

    m, photos = distinct_of
    batch = m.encode(preprocess_batch(photos, m.config))
    one_by_one = [caption(m, features=batch.select(slice(i, i + 1))) for i in range(len(photos))]
    assert_all_different(one_by_one)
    assert one_by_one == [caption(m, p) for p in photos]
    for batch_size in (2, 4, 32):
        assert caption_batch(m, features=batch, batch_size=batch_size) == one_by_one


@pytest.mark.parametrize("decoder", DECODERS)
def test_branching_and_beam_for_both(decoder):
    m = model_of(decoder, 3)
    img = photo(2)
    base = list(stream(m, img))
    alt = next(a.token for a in base[0].alternatives if a.token != base[0].token)
    branched = list(stream(m, img, prefix=[alt], strategy="beam"))
    assert branched[-1].tokens[0] == alt
    assert [x.token for x in branched[-1].caption_steps()][0] == alt


def test_attention_weights_on_every_record():
    m = model_of("attend", 5)
    for s in SETTINGS:
        last = list(stream(m, photo(), **s))[-1]
        for rec in last.caption_steps():
            assert rec.attention is not None and len(rec.attention) == 1  # 32x32 input: one 1x1 region
            assert sum(rec.attention) == pytest.approx(1.0, abs=1e-5)
    m = model_of("attend", 5, image_size=64)
    recs = list(stream(m, photo()))[-1].caption_steps()
    assert all(len(r.attention) == 4 and sum(r.attention) == pytest.approx(1.0, abs=1e-5) for r in recs)
    assert len({r.attention for r in recs}) > 1  # it looks somewhere else as the caption goes on
    json.dumps([dataclasses.asdict(r) for r in recs])  # plain data for the app and the CLI
    assert all(r.attention is None for r in list(stream(model_of("show-tell"), photo()))[-1].caption_steps())


def test_generate_batch_matches_greedy(distinct_of):
    from captioner.preprocess import preprocess_batch

    m, imgs = distinct_of
    greedy = [caption(m, i) for i in imgs]
    assert_all_different(greedy)
    feats = m.encode(preprocess_batch(imgs, m.config))
    rows = generate_batch(m, feats, GenerationConfig(max_len=8))
    assert [m.vocab.decode(r.tolist()) for r in rows] == greedy


@pytest.mark.parametrize("decoder", DECODERS)
def test_save_load_round_trip(decoder, tmp_path):
    m = model_of(decoder, 7, image_size=64)
    m.save_pretrained(tmp_path)
    back = Captioner.from_pretrained(tmp_path)
    assert back.config.decoder == decoder
    assert caption(back, photo(), strategy="beam") == caption(m, photo(), strategy="beam")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["decoder"] == decoder


def test_old_configs_without_a_decoder_field_load_as_show_tell(tmp_path):
    m = model_of("show-tell")
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["decoder"], cfg["attention_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Captioner.from_pretrained(tmp_path).config.decoder == "show-tell"
    cfg["decoder"] = "transformer"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="decoder='transformer'"):
        Captioner.from_pretrained(tmp_path)


# ---------------------------------------------------------------- one settings object


def test_generation_config_validates_and_names_the_value():
    for kw, pat in [({"strategy": "magic"}, "magic"), ({"max_len": 0}, "max_len=0"), ({"beam_size": 0}, "beam_size=0"),
                    ({"temperature": 0}, "temperature=0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_k": -1}, "top_k=-1"),
                    ({"no_repeat_ngram": -2}, "no_repeat_ngram=-2"), ({"num_alternatives": -1}, "num_alternatives=-1")]:
        with pytest.raises(ValueError, match=pat):
            GenerationConfig(**kw)
    with pytest.raises(ValueError, match="unknown decoding setting.*beams"):
        GenerationConfig.make(beams=3)
    with pytest.raises(ValueError, match="beam_size=0"):
        caption(model_of("show-tell"), photo(), strategy="beam", beam_size=0)
    base = GenerationConfig(strategy="beam")
    assert GenerationConfig.make(base, beam_size=5) == GenerationConfig(strategy="beam", beam_size=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.beam_size = 2


def test_cli_flags_come_from_the_settings_object():
    import argparse

    from captioner.generation import add_arguments, from_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    helps = {a.dest: a.help for a in p._actions if a.dest in GenerationConfig.names()}
    assert set(helps) == set(GenerationConfig.names()) and all(helps.values())
    args = p.parse_args(["--strategy", "beam", "--beam-size", "4", "--num-alternatives", "2"])
    assert from_arguments(args) == GenerationConfig(strategy="beam", beam_size=4, num_alternatives=2)
    assert from_arguments(p.parse_args([])) == GenerationConfig()


# ---------------------------------------------------------------- the inspector's heatmap


def test_attention_overlay_puts_the_heat_where_the_weights_are():
    from captioner.heatmap import attention_overlay

    img = Image.new("RGB", (140, 140), (128, 128, 128))
    weights = [0.0] * 49
    weights[0] = 1.0  # top-left region
    out = np.asarray(attention_overlay(img, weights), dtype=np.float32)
    assert out.shape == (140, 140, 3)
    top_left, bottom_right = out[:20, :20].mean(axis=(0, 1)), out[-20:, -20:].mean(axis=(0, 1))
    assert top_left[0] > bottom_right[0] + 40 and top_left[1] > bottom_right[1] + 40  # yellow against dark blue
    moved = list(reversed(weights))  # now bottom-right
    out2 = np.asarray(attention_overlay(img, moved), dtype=np.float32)
    assert not np.allclose(out, out2)
    with pytest.raises(ValueError, match="48 attention weights"):
        attention_overlay(img, [1.0] * 48)


# ---------------------------------------------------------------- settings that must change (or not change) the caption


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_with_top_k_1_or_a_tiny_top_p_is_greedy(decoder):
    m = model_of(decoder, 4)
    for i in range(2):
        greedy = list(stream(m, photo(i)))[-1]
        for narrow in ({"top_k": 1}, {"top_p": 1e-6}):
            for seed in range(3):
                sampled = list(stream(m, photo(i), strategy="sample", seed=seed, **narrow))[-1]
                assert sampled.tokens == greedy.tokens, (i, narrow, seed)


@pytest.mark.parametrize("decoder", DECODERS)
def test_samples_stay_inside_the_nucleus(decoder):
    """Every sampled word is among the fewest likeliest words whose probabilities reach top_p, at its step."""
    m = model_of(decoder, 5)
    top_p, chosen_ranks, captions = 0.6, set(), set()
    for seed in range(12):
        steps = list(stream(m, photo(seed % 3), strategy="sample", seed=seed, top_p=top_p, num_alternatives=len(m.vocab)))
        captions.add(steps[-1].text)
        for s in steps[-1].caption_steps():
            probs = [a.prob for a in s.alternatives]  # the whole distribution, likeliest first
            rank = [a.token for a in s.alternatives].index(s.token)
            assert sum(probs[:rank]) < top_p + 1e-6, (seed, s.t, rank, probs)
            chosen_ranks.add(rank)
    assert len(captions) > 1 and max(chosen_ranks) > 0  # it did sample: not every word was the likeliest


@pytest.mark.parametrize("decoder", DECODERS)
def test_length_penalty_favours_longer_captions(decoder):
    """Its help text: 0 = none (the likeliest caption wins), higher favours longer captions. The beams are the same;
    only the choice among the finished ones moves, never to a shorter caption, and at least once to a longer one.
    <EOS> is made about as likely as a word, so that captions of several lengths finish."""
    longer = 0
    for seed, eos_bias in [(s, b) for s in range(3) for b in (1.6, 1.8)]:
        m = model_of(decoder, seed)
        with torch.no_grad():
            m.decoder.head.bias[2] += eos_bias  # model_of made <EOS> rarer by 1.5: back to about even, and a little more
        for i in range(2):
            plain = list(stream(m, photo(i), strategy="beam", beam_size=4, length_penalty=0.0))[-1]
            long_ = list(stream(m, photo(i), strategy="beam", beam_size=4, length_penalty=3.0))[-1]
            assert len(long_.tokens) >= len(plain.tokens), (seed, i, plain.text, long_.text)
            assert plain.logprob >= long_.logprob - 1e-6  # no penalty: the likeliest finished caption
            longer += len(long_.tokens) > len(plain.tokens)
    assert longer, "length_penalty never changed which beam won: the test shows nothing"


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_and_sampling_stop_at_max_len_when_no_caption_ends(decoder):
    m = model_of(decoder, 1, max_len=5)
    with torch.no_grad():
        m.decoder.head.bias[[2, 3]] = -1e4  # <EOS> and <UNK> never win
    for s in ({}, {"strategy": "sample", "seed": 0}, {"strategy": "beam", "beam_size": 2}):
        steps = list(stream(m, photo(), **s))
        assert steps[-1].stop == "max_len" and len(steps[-1].tokens) == 5, s
        assert all(x.stop is None for x in steps[:-1]), s
    assert caption_batch(m, [photo(0), photo(1)]) == [caption(m, photo(0)), caption(m, photo(1))]


# ---------------------------------------------------------------- issue 23: full stops, repeats, a growing stream


def _best_by_brute_force(table, max_len, length_penalty=1.0):
    """The caption with the best length-normalised log-probability of every caption a bigram table allows."""
    import itertools
    import math

    eos, best = WORDS.index("<EOS>"), (-math.inf, None)
    words = [WORDS.index(w) for w in ("a", "dog", "runs", ".")]
    for n in range(1, max_len + 1):
        for seq in itertools.product(words, repeat=n):
            prev, lp = 1, 0.0
            for tok in (*seq, eos):
                lp += math.log(table.get(prev, {}).get(tok, 1e-13))
                prev = tok
            best = max(best, (lp / n ** length_penalty, seq))
    return best[1]


def test_beam_keeps_the_caption_that_ends_after_its_full_stop():
    """A caption that ends pays for its <EOS>: scored without it, "A dog" + <EOS> (p(<EOS>) = 0.25) beat "A dog runs."
    (whose "." and <EOS> are both counted), which is how beam captions lost their full stops. The caption returned is
    the one with the best normalised score of all the captions the table allows."""
    a, dog, runs, stop, eos = (WORDS.index(w) for w in ("a", "dog", "runs", ".", "<EOS>"))
    table = {1: {a: 0.6, dog: 0.3, runs: 0.1}, a: {dog: 0.7, runs: 0.2, eos: 0.1}, dog: {runs: 0.6, eos: 0.25, stop: 0.15},
             runs: {stop: 0.55, eos: 0.45}, stop: {eos: 0.99, a: 0.01}}
    m = scripted_model(table)
    last = final(m, photo(), strategy="beam", beam_size=3)
    assert last.text == "A dog runs." and last.stop == "eos"
    assert last.tokens == _best_by_brute_force(table, 6)


def test_no_repeat_rule_blocks_content_phrases_and_spares_function_words():
    from captioner.processors import FUNCTION_WORDS, NoRepeatNGram, processors_for

    m = tiny_model(0)
    a, dog, runs, stop = (WORDS.index(w) for w in ("a", "dog", "runs", "."))
    rules = processors_for(GenerationConfig(no_repeat_ngram=2), m.vocab)
    rule = next(r for r in rules if isinstance(r, NoRepeatNGram))
    assert rule.free == {a, stop} and {"a", "."} <= FUNCTION_WORDS
    blocked = lambda hist: {t for t in range(len(WORDS)) if rule(torch.zeros(1, len(WORDS)), torch.tensor([hist]))[0, t] == -math.inf}  # noqa: E731
    assert blocked([a, dog, runs, a]) == {dog}  # "a dog" said: not again
    assert blocked([a, dog, a, stop, a]) == {dog}  # "a ." repeats freely (function words only), "a dog" does not
    assert blocked([dog, runs, dog]) == {runs}
    plain = next(r for r in processors_for(GenerationConfig(no_repeat_ngram=2, block_function_words=True), m.vocab)
                 if isinstance(r, NoRepeatNGram))
    masked = plain(torch.zeros(1, len(WORDS)), torch.tensor([[a, stop, a]]))[0]
    assert plain.free == frozenset() and {t for t in range(len(WORDS)) if masked[t] == -math.inf} == {stop}


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_rule_in_every_decoding_path(strategy):
    """Random tiny models repeat "a dog" without the rule; with it no caption says a content bigram twice, and the
    batched path (caption_batch) agrees with stream."""
    def content_repeats(tokens):
        pairs = [p for p in zip(tokens, tokens[1:]) if not set(p) <= {WORDS.index("a"), WORDS.index(".")}]
        return len(pairs) != len(set(pairs))

    seen_repeat = False
    for seed in range(8):
        m = tiny_model(seed, max_len=10)
        with torch.no_grad():
            m.decoder.head.bias[2] -= 3.0  # long captions: room to repeat
        imgs = [photo(seed), photo(seed + 1)]
        off = final(m, imgs[0], strategy=strategy, no_repeat_ngram=0)
        seen_repeat |= content_repeats(off.tokens)
        on = [final(m, img, strategy=strategy, no_repeat_ngram=2) for img in imgs]
        assert not any(content_repeats(o.tokens) for o in on), [o.text for o in on]
        assert caption_batch(m, imgs, strategy=strategy, no_repeat_ngram=2) == [o.text for o in on]
    assert seen_repeat  # the rule had something to block


@pytest.mark.parametrize("strategy", ["beam", "guided"])
def test_beam_stream_only_grows(strategy):
    """Each streamed record adds one word to a prefix of the final caption: the caption box never takes a word back,
    and the records streamed are the final caption's own, word for word."""
    grew = 0
    for seed in range(6):
        m = tiny_model(seed, imagenet_head=True, max_len=8)
        with torch.no_grad():
            m.decoder.head.bias[2] -= 2.0
            m.encoder.classifier.bias[151:269] = 10.0  # "dog" required for guided
        steps = list(stream(m, photo(seed), strategy=strategy, beam_size=3, guide_margin=math.inf))
        last = steps[-1]
        assert [s.t for s in steps] == list(range(len(last.tokens)))
        for s in steps:
            assert last.tokens[: len(s.tokens)] == s.tokens and last.text.startswith(s.text.rstrip("."))
        assert [dataclasses.replace(s, constraint=None) for s in steps[:-1]] == \
               [dataclasses.replace(s, constraint=None) for s in last.history]
        grew += len(steps) > 1
    assert grew


def test_temperature_top_k_and_top_p_are_processors_after_the_rules():
    """Sampling's warpers run in the same list as the rules, after them, and only for sampling; each does what it
    says on a row of logits; top_k=1 sampling is greedy decoding, word for word."""
    from captioner.processors import Ended, Temperature, TopK, TopP, processors_for

    m = tiny_model(seed=3)
    rules = processors_for(GenerationConfig(strategy="sample", temperature=0.5, top_k=3, top_p=0.8), m.vocab)
    assert [type(r) for r in rules[-4:]] == [Ended, Temperature, TopK, TopP]
    kept, warpers = rules.split()
    assert [type(r) for r in warpers] == [Temperature, TopK, TopP] and not any(isinstance(r, TopK) for r in kept)
    for config in (GenerationConfig(strategy="beam", top_k=3, top_p=0.5, temperature=2.0), GenerationConfig(strategy="sample", top_p=1.0)):
        assert not rules_of_kind(processors_for(config, m.vocab), (Temperature, TopK, TopP))
    logits, none = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]), torch.zeros(1, 0, dtype=torch.long)
    assert torch.equal(Temperature(0.5)(logits, none), logits * 2)
    assert torch.isfinite(TopK(2)(logits, none)).tolist() == [[True, True, False, False, False]]
    p = torch.softmax(logits, -1)[0]  # 0.57, 0.21, 0.13, 0.03, 0.08
    assert torch.isfinite(TopP(float(p[0]) + 0.01)(logits, none)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(TopP(0.1)(logits, none)).tolist() == [[True, False, False, False, False]]  # the first stays
    img = photo(1)
    greedy = [s.token for s in final(m, img).caption_steps()]
    for seed in range(3):
        drawn = final(m, img, strategy="sample", top_k=1, seed=seed)
        assert [s.token for s in drawn.caption_steps()] == greedy
        assert [s.prob for s in drawn.caption_steps()] == [s.prob for s in final(m, img).caption_steps()]  # unwarped


def rules_of_kind(rules, kinds) -> list:
    return [r for r in rules if isinstance(r, kinds)]
