"""Guided decoding (constrained beam search) on tiny random models: the required word appears when it can, streaming
and caption() agree, branching works, and it falls back cleanly (nothing confident, the word not in the vocabulary,
no ImageNet head, no caption that can meet it)."""
import dataclasses
import json
import math
import re

import pytest
import torch

from captioner import GenerationConfig
from captioner.decode import caption, caption_batch, encode, final, stream
from captioner.imagenet import Constraint, ConstraintOutcome
from tiny import WORDS, photo, rescore, tiny_model

DECODERS = ["show-tell", "attend"]
DOG = WORDS.index("dog")
DOG_CLASSES = list(range(151, 269))
# The mechanics of the constrained search, on tiny models that rarely say "dog": every constrained caption is kept
# (the margin's own test is test_a_constraint_is_kept_only_when_it_fits).
GUIDED = dict(strategy="guided", guide_margin=math.inf)
CAT_CLASSES = list(range(281, 286))


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def model_of(decoder="show-tell", seed=0, hot=DOG_CLASSES, dog_bias=-4.0, head=True, **kw):
    """A tiny model whose ImageNet head is sure of the classes `hot` and whose decoder rarely says "dog"."""
    m = tiny_model(seed, decoder=decoder, imagenet_head=head, max_len=kw.pop("max_len", 8), **kw)
    m.decoder.head.bias[2] -= 1.0  # <EOS> rarer: captions run several words
    m.decoder.head.bias[DOG] += dog_bias
    if head:
        m.encoder.classifier.bias[list(hot)] = 10.0
    return m


def words_of(step):
    return [WORDS[t] for t in step.tokens]


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_required_word_appears(decoder):
    m = model_of(decoder, 1)
    img = photo()
    assert "dog" not in words_of(list(stream(m, img, strategy="beam", beam_size=3))[-1])  # unguided: no dog
    steps = list(stream(m, img, **GUIDED, beam_size=3))
    last = steps[-1]
    assert "dog" in words_of(last) and last.stop in ("eos", "unk", "max_len")
    c = last.constraint
    assert c.words == ("dog",) and c.met is True and c.used == "dog"
    assert c.evidence[0].confidence > 0.9 and c.evidence[0].labels[0][0] in ("Chihuahua", "Japanese spaniel", "Maltese dog")
    assert c.describe().startswith('guided: required "dog", as the CNN sees ') and 'uses "dog"' in c.describe()
    # every record says what is required; the end (met) only on the last
    assert all(isinstance(s.constraint, Constraint) and s.constraint.words == ("dog",) for s in steps[:-1])
    assert isinstance(c, ConstraintOutcome) and c.constraint == steps[0].constraint  # the request, and how it ended
    assert all(s.constraint is not None for s in last.caption_steps())
    json.dumps(dataclasses.asdict(last))  # plain data for the app


@pytest.mark.parametrize("decoder", DECODERS)
def test_streaming_equals_caption_and_batches(decoder):
    m = model_of(decoder, 2)
    img = photo(1)
    s = dict(**GUIDED, beam_size=2)
    steps = list(stream(m, img, **s))
    assert caption(m, img, **s) == steps[-1].text == caption(m, img, GenerationConfig(**s))
    assert caption_batch(m, [img, photo(2)], **s)[0] == steps[-1].text
    f = encode(m, img)
    assert caption(m, features=f, **s) == steps[-1].text
    final = steps[-1].caption_steps()
    assert [x.token for x in final] == list(steps[-1].tokens)
    again = rescore(m, img, list(steps[-1].tokens))  # the records are the model's own probabilities of that caption
    assert [round(x.prob, 5) for x in again] == [round(x.prob, 5) for x in final]


@pytest.mark.parametrize("decoder", DECODERS)
def test_branching_with_a_prefix(decoder):
    m = model_of(decoder, 3)
    img = photo(2)
    base = list(stream(m, img, **GUIDED))[-1]
    first = base.caption_steps()[0]
    # not "." either: after a full stop guided decoding may only end, so a caption that starts with one cannot meet it
    alt = next(a.token for a in first.alternatives if a.token not in (first.token, DOG, WORDS.index(".")))
    branched = list(stream(m, img, **GUIDED, prefix=[alt]))[-1]
    assert branched.tokens[0] == alt and "dog" in words_of(branched) and branched.constraint.met
    # a prefix that already says the word meets the constraint
    said = list(stream(m, img, **GUIDED, prefix=[WORDS.index("a"), DOG]))[-1]
    assert said.tokens[:2] == (WORDS.index("a"), DOG) and said.constraint.met and said.constraint.used == "dog"


def test_guided_captions_end_at_their_full_stop():
    """The required word goes inside the sentence, never after its period: guided captions have a "." only last."""
    stop = WORDS.index(".")
    for seed in range(6):
        m = model_of("show-tell", seed)
        with torch.no_grad():
            m.decoder.head.bias[stop] += 1.5  # full stops early and often: the search must place "dog" before one
        for size in (1, 3):
            last = list(stream(m, photo(seed), **GUIDED, beam_size=size))[-1]
            assert stop not in last.tokens[:-1], (seed, size, last.text)
            # nothing forces an early end and max_len (8) leaves room: every beam size can and must place "dog"
            assert last.constraint.met is True and "dog" in words_of(last), (seed, size, last.text)


@pytest.mark.parametrize("size", [1, 3])
def test_guided_when_no_beam_ends(size):
    """No caption ends: <EOS> never wins, nor <UNK> or "." (after which guided decoding may only end). The search
    runs to max_len and still returns a caption that meets the constraint."""
    m = model_of("show-tell", 5, max_len=6)
    with torch.no_grad():
        m.decoder.head.bias[[WORDS.index(w) for w in ("<EOS>", "<UNK>", ".")]] = -1e4
    steps = list(stream(m, photo(3), **GUIDED, beam_size=size))
    last = steps[-1]
    assert last.stop == "max_len" and len(last.tokens) == 6 and all(s.stop is None for s in steps[:-1])
    assert last.constraint.met is True and "dog" in words_of(last)
    assert caption(m, photo(3), **GUIDED, beam_size=size) == last.text


def test_falls_back_when_no_caption_can_meet_it():
    m = model_of("show-tell", 4)
    a, runs, eos = WORDS.index("a"), WORDS.index("runs"), WORDS.index("<EOS>")
    last = list(stream(m, photo(), **GUIDED, prefix=[a, runs, eos]))[-1]  # forced to end before "dog"
    assert last.text == "A runs" and last.constraint.met is False and last.constraint.used is None
    assert "kept the unconstrained best" in last.constraint.describe()


@pytest.mark.parametrize("decoder", DECODERS)
def test_nothing_required_is_beam_search(decoder):
    """No confident label (or none the vocabulary has, or no head): guided decoding is beam search, record for record."""
    cases = {
        "nothing confident": model_of(decoder, 5, hot=[]),
        "word not in the vocabulary": model_of(decoder, 5, hot=CAT_CLASSES),  # "cat": not in the tiny vocabulary
        "no ImageNet head": model_of(decoder, 5, head=False),
    }
    notes = {}
    for why, m in cases.items():
        for size in (1, 3):
            guided = list(stream(m, photo(3), **GUIDED, beam_size=size))
            beam = list(stream(m, photo(3), strategy="beam", beam_size=size))
            assert [dataclasses.replace(s, constraint=None, history=()) for s in guided] == \
                   [dataclasses.replace(s, history=()) for s in beam], why
            c = guided[-1].constraint
            assert c.words == () and c.met is None
            notes[why] = c.describe()
        # beam size 1 without a requirement is greedy
        assert caption(m, photo(3), **GUIDED, beam_size=1) == caption(m, photo(3))
    # Each case says why in one sentence that starts from the CNN's top label (the first label the CNN line shows).
    assert re.fullmatch(r"guided: The CNN's top label, [^()]+ \(\S+%\), .+; nothing was required", notes["nothing confident"])
    assert notes["word not in the vocabulary"] == ("guided: cat, cats, kitten confident, but not in this model's vocabulary; "
                                                    "nothing was required")
    assert notes["no ImageNet head"] == "guided: this model has no ImageNet head (image classifier), so nothing was required"


def test_the_threshold_decides():
    m = model_of("show-tell", 6, hot=[])
    m.encoder.classifier.bias[DOG_CLASSES] = 3.0  # dog classes together: about 0.6 with this head
    conf = float(encode(m, photo()).labels[0, DOG_CLASSES].sum())
    assert 0.2 < conf < 0.95
    below = list(stream(m, photo(), **GUIDED, guide_threshold=conf + 0.01))[-1]
    above = list(stream(m, photo(), **GUIDED, guide_threshold=conf - 0.01))[-1]
    assert below.constraint.words == () and above.constraint.words == ("dog",) and "dog" in words_of(above)


def test_settings():
    from captioner.generation import STRATEGIES

    assert "guided" in STRATEGIES
    with pytest.raises(ValueError, match="guide_threshold"):
        GenerationConfig(guide_threshold=0)
    with pytest.raises(ValueError, match="guide_threshold"):
        GenerationConfig(guide_threshold=1.5)
    assert GenerationConfig.make(**GUIDED, guide_threshold=0.3).guide_threshold == 0.3


def test_guided_names_the_subject_of_the_example_photos():
    """The bundled model on the six photos with written subjects (examples/ and tests/data/ subjects.json, written
    before any caption): guided decoding names the cat, which beam search calls a dog; it requires nothing where train did not show the CNN's
    word to be right (cup for the espresso, rocket for the missile: docs/guided.md), so no caption puts a subject
    where it cannot be ("running through the cup"); the people are named as by beam search."""
    from conftest import subject_photos

    from captioner.imagenet import top_labels
    from captioner.loading import load_model
    from captioner.vocab import tokenize

    model = load_model()
    named = {}
    for name, (path, spec) in subject_photos().items():
        last = final(model, path, strategy="guided")
        named[name] = bool(set(tokenize(last.text)) & set(spec["subject"]))
        if name == "cat.jpg":
            assert last.constraint.words[0] == "cat" and last.constraint.met and "Egyptian cat" in last.constraint.describe()
        if name in ("coffee.jpg", "rocket.jpg", "grace_hopper.jpg"):  # nothing forced in where it would not fit
            assert last.constraint.words == ()
            top = top_labels(model, path, k=1)[0][0]
            assert last.constraint.describe().startswith(f"guided: The CNN's top label, {top} (")
            assert last.constraint.describe().endswith("; nothing was required")
            assert not {"cup", "mug", "rocket", "uniform", "jersey"} & set(tokenize(last.text)), last.text
    assert named["cat.jpg"] and sum(named.values()) >= 4, named


def test_guided_decoding_with_calibrated_per_word_thresholds(monkeypatch):
    """constraint_for(..., None) (each word's calibrated threshold) through the guided search: the record says so,
    with the word's own threshold; a word whose threshold the photo misses is not required."""
    import captioner.decode as decode
    import captioner.imagenet as imagenet

    m = model_of("show-tell", 1)
    monkeypatch.setattr(decode, "constraint_for", lambda f, v, t, expected=None: imagenet.constraint_for(f, v, None, expected))
    monkeypatch.setattr(imagenet, "thresholds", lambda: {"dog": 0.5})
    last = list(stream(m, photo(), **GUIDED, beam_size=3))[-1]
    c = last.constraint
    assert c.words == ("dog",) and c.threshold is None and c.met and "dog" in words_of(last)
    assert "its calibrated threshold is 50%" in c.describe() and 'uses "dog"' in c.describe()
    assert json.loads(json.dumps(last.record()))  # the step's JSON form carries the None threshold
    monkeypatch.setattr(imagenet, "thresholds", lambda: {"cat": 0.5})  # no threshold for dog: never required
    last = list(stream(m, photo(), **GUIDED, beam_size=3))[-1]
    assert last.constraint.words == () and last.text == list(stream(m, photo(), strategy="beam", beam_size=3))[-1].text


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_constraint_is_kept_only_when_it_fits(decoder):
    """The model rarely says "dog" (its bias -4): the caption with it is less likely per word than the best without.
    Within the margin the constrained caption is kept; beyond it the caption is the one without the word, and the
    constraint says which word was tried, that it did not fit, and both scores (inspector text and JSON)."""
    m = model_of(decoder, 1)
    img = photo()
    kept = final(m, img, strategy="guided", guide_margin=math.inf)
    c = kept.constraint
    assert c.met is True and c.used == "dog" and "dog" in words_of(kept) and c.unfit is False
    assert c.fit is not None and c.free is not None and c.free > c.fit  # the caption without "dog" is likelier
    gap = c.free - c.fit
    assert final(m, img, strategy="guided", guide_margin=gap + 0.01).constraint.met is True
    dropped = final(m, img, strategy="guided", guide_margin=gap / 2)
    d = dropped.constraint
    assert d.met is False and d.unfit is True and d.used is None and "dog" not in words_of(dropped)
    assert (d.fit, d.free) == pytest.approx((c.fit, c.free))
    # the caption is the best one without the word: the same as with a margin of 0
    assert dropped.text == final(m, img, strategy="guided", guide_margin=0.0).text
    text = d.describe()
    assert "could not fit" in text and "dog" in text and f"{d.fit:.2f}" in text and f"{d.free:.2f}" in text
    record = json.loads(json.dumps(d.record()))
    assert record["met"] is False and record["unfit"] is True and record["words"] == ["dog"]
    assert record["fit"] == pytest.approx(d.fit) and record["free"] == pytest.approx(d.free) and record["margin"] == gap / 2
    assert "could not fit" in record["text"]
    with pytest.raises(ValueError, match="guide_margin"):
        GenerationConfig(guide_margin=-1)
