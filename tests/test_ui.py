"""The Gradio app's handlers and views (captioner/app/), called directly: streaming, inspector, branching, bad input."""
import dataclasses
import io
import json
import struct
import warnings
import zlib

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.app import APP_DEFAULTS, Handlers, build_demo
from captioner.app.session import PHOTO_MAX_SIDE, Decoding, ImageCache
from captioner.app.views import Inspector, cleared, finished, highlighted, inspect, on_page, table_row
from captioner.decode import Step, caption, stream
from captioner.generation import STRATEGIES, GenerationConfig
from captioner.heatmap import attention_overlay
from captioner.imagenet import describe_labels, percent, top_labels
from captioner.preprocess import encoder_view
from captioner.setting_values import settings_from
from tiny import assert_all_different, attend_model, tiny_model

SETTINGS = [
    dict(strategy="greedy"),
    dict(strategy="beam", beam_size=3),
    dict(strategy="beam", beam_size=1),
    dict(strategy="sample", seed=7, temperature=0.8, top_k=3, top_p=0.9),
]


def ui_kwargs(s, max_len, k=5):
    """The same settings as the app's control values (as the controls send them: the seed -1 = a new one each run)."""
    return dict(strategy=s["strategy"], beam_size=s.get("beam_size", 3), max_len=max_len, num_alternatives=k,
                temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0), top_p=s.get("top_p", 0.9), seed=s.get("seed", -1))


def core_kwargs(s, max_len, k=5):
    """The same settings for decode.stream (GenerationConfig's fields: no seed = None)."""
    kw = ui_kwargs(s, max_len, k)
    kw["seed"] = None if kw["seed"] < 0 else kw["seed"]
    return kw


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny random model, saved and loaded back as the app would load it; <EOS> made unlikely so
    captions run several words."""
    m = tiny_model(seed=3, max_len=8)
    with torch.no_grad():
        m.decoder.head.bias[2] -= 2.0  # <EOS> less likely but possible: some captions end early
    folder = tmp_path_factory.mktemp("tiny_model")
    m.save_pretrained(folder)
    return Captioner.from_pretrained(folder)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    a = np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    Image.fromarray(a).save(path, quality=95)
    return str(path)


@pytest.fixture
def handlers(model):
    return Handlers(model, word_delay=0)


def cap(handlers, image, cache=None, **controls):
    """Every update of /caption for `image`, the settings given as the app's control values."""
    return list(handlers.caption(image, cache, **controls))


def branch(handlers, decoding, step_number, choice, cache=None, **controls):
    return list(handlers.redecode(decoding, step_number, choice, cache, **controls))


def page_caption(handlers, *args, **kw):
    """The page's caption event (the same handler as /caption, through views.on_page): updates by output name."""
    return on_page(handlers.caption, clear_first=True)(*args, **kw)


def page_redecode(handlers, *args, **kw):
    """The page's Re-decode from here (the same handler as the API's redecode, through views.on_page)."""
    return on_page(handlers.redecode, clear_first=False)(*args, **kw)


class CallCounter:
    """Counts calls of one of the model's methods (the encoder's runs: `encode`; decodes: `decoder.start`)."""

    def __init__(self, owner, name, monkeypatch):
        self.n = 0
        original = getattr(owner, name)

        def counted(*args, **kw):
            self.n += 1
            return original(*args, **kw)

        monkeypatch.setattr(owner, name, counted)


def EncodeCounter(model, monkeypatch):
    return CallCounter(model, "encode", monkeypatch)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s["strategy"] + str(s.get("beam_size", "")))
def test_caption_streams_the_texts_of_decode_stream(handlers, model, photo_path, s):
    outs = cap(handlers, photo_path, **ui_kwargs(s, 8))
    steps = list(stream(model, photo_path, **core_kwargs(s, 8)))
    assert [o[0] for o in outs] == [st.text for st in steps]
    assert len(outs) >= 3
    # Each update's current-step bars are that step's alternatives; the final text is caption()'s.
    for o, st in zip(outs, steps):
        assert o[1] == {a.word: a.prob for a in st.alternatives}
    assert outs[-1][0] == caption(model, photo_path, **core_kwargs(s, 8))
    # Greedy and sampling grow word by word; beam streams its leading hypothesis, one word longer each step.
    if s["strategy"] != "beam":
        for a, b in zip(outs, outs[1:]):
            assert b[0].startswith(a[0]) and len(b[0]) > len(a[0])
    else:
        counts = [len(st.tokens) for st in steps[:-1]]
        assert counts == list(range(1, len(counts) + 1))


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s["strategy"] + str(s.get("beam_size", "")))
def test_finished_decoding_holds_decodes_own_records(handlers, model, photo_path, s, monkeypatch):
    decodes = CallCounter(model.decoder, "start", monkeypatch)
    outs = cap(handlers, photo_path, **ui_kwargs(s, 8))
    assert decodes.n == 1  # the inspector's records come with the decode: beam search is not decoded again
    assert all(o[3] is None for o in outs[:-1])  # the state is only set when the decode is finished
    decoding = outs[-1][3]
    assert isinstance(decoding, Decoding) and all(isinstance(st, Step) for st in decoding.steps)
    for st in decoding.steps:
        json.dumps(dataclasses.asdict(st))  # plain JSON-able data at the Gradio boundary
    steps = list(stream(model, photo_path, **core_kwargs(s, 8)))
    final = steps[-1]
    assert decoding.tokens == final.tokens and decoding.text == final.text and decoding.stop == final.stop
    assert decoding.settings == GenerationConfig(**core_kwargs(s, 8)) and decoding.prefix == () and decoding.focus == 0
    assert [st.word for st in decoding.steps] == [model.vocab.itos[t] for t in final.tokens]
    assert [st.t for st in decoding.steps] == list(range(len(final.tokens)))
    # The per-step records are those of the final caption (for beam search the winner's, which the stream may not
    # have shown): what rescoring its words gives.
    ref = list(stream(model, photo_path, strategy="greedy", prefix=list(final.tokens), max_len=len(final.tokens)))
    for got, want in zip(decoding.steps, ref, strict=True):
        assert got.text == want.text and got.token == want.token and got.tokens == want.tokens
        assert got.prob == pytest.approx(want.prob, abs=1e-5) and got.eos_prob == pytest.approx(want.eos_prob, abs=1e-5)
        assert [a.word for a in got.alternatives] == [a.word for a in want.alternatives]
    table = outs[-1][2]
    assert [row[1] for row in table["data"]] == [st.word for st in decoding.steps]
    assert table["headers"][:4] == ["#", "word", "p", "p(<EOS>)"]


def test_stream_with_eos_possible_ends_on_eos_somewhere(handlers, photo_path):
    """Sanity of the fixture: not every caption runs to max_len, so 'stop' takes both values across settings."""
    stops = {cap(handlers, photo_path, strategy="sample", seed=i, top_p=1.0, max_len=8)[-1][3].stop for i in range(30)}
    assert "eos" in stops


def test_settings_change_never_reruns_the_encoder(handlers, model, photo_path, monkeypatch):
    counter = EncodeCounter(model, monkeypatch)
    outs = cap(handlers, photo_path, strategy="greedy", max_len=8)
    cache = outs[-1][4]
    assert counter.n == 1 and isinstance(cache, ImageCache) and cache.features.vector.shape == (1, model.config.embed_size)
    for s in SETTINGS:
        outs = cap(handlers, photo_path, cache, **ui_kwargs(s, 6))
        assert outs[-1][4] is cache
    decoding = outs[-1][3]
    branch(handlers, decoding, 2, decoding.steps[1].alternatives[-1].token, cache)
    assert counter.n == 1
    # Another image (or another user's cache) is encoded anew; the cache follows the image, not the session.
    other = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    outs2 = cap(handlers, other, cache, strategy="greedy")
    assert counter.n == 2 and outs2[-1][4].key != cache.key


def test_defaults_are_guided_and_the_models_max_len(handlers, model, photo_path):
    """The app decodes with guided decoding by default (issue 15: level with greedy on dev, more subjects named);
    everything else is GenerationConfig's default."""

    assert APP_DEFAULTS == GenerationConfig(strategy="guided")
    outs = list(handlers.caption(photo_path))
    assert outs[-1][0] == caption(model, photo_path, strategy="guided", max_len=model.config.max_len)
    assert outs[-1][3].settings.strategy == "guided" and outs[-1][3].settings.max_len == model.config.max_len
    assert handlers.settings() == GenerationConfig(strategy="guided", max_len=model.config.max_len)


def test_settings_from_control_values(handlers, model):
    """Sliders send floats (whole numbers for integer settings: 2.6 is refused, not rounded), an API client may leave
    a setting out or send None; the seed -1 means a new one."""
    got = handlers.settings(strategy="sample", beam_size=3.0, max_len=7.0, top_k=3.0, top_p=0.5, seed=-1, temperature=None)
    assert got == GenerationConfig(strategy="sample", beam_size=3, max_len=7, top_k=3, top_p=0.5, seed=None)
    assert isinstance(got.beam_size, int) and isinstance(got.top_k, int)
    assert handlers.settings(seed=12.0).seed == 12 and handlers.settings(seed="").seed is None
    with pytest.raises(gr.Error, match=r"top_k=2.6: expected a whole number from 0 to 100"):
        handlers.settings(top_k=2.6)
    assert handlers.settings(top_p=None).top_p == GenerationConfig().top_p == 0.9
    assert handlers.settings(strategy="guided", guide_threshold=0.35) == GenerationConfig(strategy="guided", guide_threshold=0.35,
                                                                                            max_len=model.config.max_len)


# ---------------------------------------------------------------- inspector and branching


def test_inspector_says_when_unk_not_eos_ended_the_caption(photo_path):
    """A model that wants <UNK> (never emitted) at every step: the last step's view does not credit <EOS>, it names
    <UNK> and its probability; every step shows p(<UNK>)."""
    m = tiny_model(seed=3, max_len=8)
    with torch.no_grad():
        m.decoder.head.bias[3] += 30.0  # <UNK>
    h = Handlers(m, word_delay=0)
    decoding = cap(h, photo_path, strategy="greedy", max_len=8)[-1][3]
    assert decoding.stop == "unk"
    last = inspect(decoding, len(decoding.steps)).info
    assert "outside its vocabulary" in last and "`<EOS>` won" not in last and "p = 100%" in last
    assert all("p(`<UNK>`) here = 100.0%" in inspect(decoding, t + 1).info for t in range(len(decoding.steps)))


def test_inspector_step_view_equals_the_core_records(handlers, model, photo_path):
    decoding = cap(handlers, photo_path, strategy="greedy", max_len=8, num_alternatives=4)[-1][3]
    steps = list(stream(model, photo_path, strategy="greedy", max_len=8, num_alternatives=4))
    for t, st in enumerate(steps):
        view = inspect(decoding, t + 1)
        assert view.slider.value == t + 1 and view.slider.maximum == max(len(steps), 2)
        assert view.prefix == (steps[t - 1].text if t else "")
        assert view.alternatives == {a.word: a.prob for a in st.alternatives}
        assert f"**{st.word}**" in view.info and f"p(`<EOS>`) here = {percent(st.eos_prob, 1)}" in view.info
        assert f"p = {percent(st.prob, 1)}" in view.info
        assert [value for _, value in view.branch.choices] == [a.token for a in st.alternatives]
        # punctuation quoted: "“.”  (4%)", not a bare ". (4%)"
        assert [label for label, _ in view.branch.choices] == [f"{'“.”' if a.word == '.' else a.word}  ({percent(a.prob)})"
                                                               for a in st.alternatives]
        assert "".join(text for text, _ in view.confidence) == steps[-1].text
        # One selected step: "This step" shows the same step's words, and says which step it is.
        assert view.current == view.alternatives and f"{t + 1} of {len(steps)}" in view.heading
    # Out of range steps are clamped; prev/next move by one.
    assert inspect(decoding, 99).slider.value == len(steps)
    assert inspect(decoding, -3).slider.value == 1
    assert handlers.select(decoding, 2, +1).slider.value == 3 and handlers.select(decoding, 1, -1).slider.value == 1


def _step(t, word, text, prob):
    return Step(t, 4 + t, word, prob, 0.0, (), 0.0, tuple(range(4, 5 + t)), text)


def test_confidence_colouring_follows_each_words_probability():
    steps = [_step(0, "a", "A", 0.9), _step(1, "dog", "A dog", 0.3), _step(2, ".", "A dog.", 0.05)]
    assert highlighted(steps) == [("A", "confident (≥ 50%)"), (" ", None), ("dog", "unsure (20–50%)"), (".", "guess (< 20%)")]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s["strategy"] + str(s.get("beam_size", "")))
def test_branching_equals_stream_with_a_prefix(handlers, model, photo_path, s, monkeypatch):
    first = cap(handlers, photo_path, **ui_kwargs(s, 8))
    decoding, cache = first[-1][3], first[-1][4]
    t = min(2, len(decoding.steps) - 1)  # branch at the third word (or the last)
    original = decoding.steps[t]
    alt = next(a for a in original.alternatives if a.token != original.token and a.word != "<EOS>")
    counter = EncodeCounter(model, monkeypatch)
    outs = branch(handlers, decoding, t + 1, alt.token, cache, **ui_kwargs(s, 8))
    assert counter.n == 0  # the cached features are used
    prefix = (*decoding.tokens[:t], alt.token)
    want = list(stream(model, photo_path, prefix=prefix, **core_kwargs(s, 8)))
    assert [o[0] for o in outs] == [w.text for w in want]
    new = outs[-1][3]
    assert new.tokens == want[-1].tokens and new.tokens[: t + 1] == prefix
    assert new.prefix == prefix and new.focus == t
    # The inspector then shows the new caption, at the step where it branched.
    view = Inspector(*(finished(new)[k] for k in Inspector._fields))
    assert view.slider.value == t + 1 and "".join(w for w, _ in view.confidence) == want[-1].text
    assert view.prefix == (new.steps[t - 1].text if t else "") and f"**{alt.word}**" in view.info


def test_branch_to_eos_ends_the_caption_there(handlers, model, photo_path):
    first = cap(handlers, photo_path, strategy="greedy", max_len=8)
    decoding, cache = first[-1][3], first[-1][4]
    eos = next((a for a in decoding.steps[3].alternatives if a.word == "<EOS>"), None)
    assert eos is not None, "the fixture's step 4 must offer <EOS> (5 alternatives of 8 words)"
    outs = branch(handlers, decoding, 4, eos.token, cache, strategy="greedy", max_len=8)
    assert outs[-1][3].tokens == decoding.tokens[:3] and outs[-1][3].stop == "eos"
    view = Inspector(*(finished(outs[-1][3])[k] for k in Inspector._fields))
    assert view.slider.value == 3 and "made to end after word 3" in view.info


# ---------------------------------------------------------------- the page: one selected step, nothing stale

PAGE = {"caption", "table", "decoding", "cache", "cnn_sees", *Inspector._fields, "download", "status", "photo", "tree", "tree_info", "pick",
        "assessment"}


def apply(page: dict, update: dict) -> dict:
    """A page event's update (outputs by name; one left out, or gr.skip(), keeps its value) applied to the page."""
    assert set(update) <= PAGE, set(update) - PAGE
    return {**page, **{name: value for name, value in update.items() if value != {"__type__": "update"}}}


def run_page(page: dict, events) -> tuple[dict, list[dict]]:
    """Apply every update of a page event; returns the final page and each intermediate one."""
    seen = []
    for update in events:
        page = apply(page, update)
        seen.append(page)
    return page, seen


def test_a_page_decode_clears_then_streams_then_selects_the_focus_step(handlers, model, photo_path):
    page, seen = run_page({}, page_caption(handlers, photo_path, max_len=8))
    assert seen[0]["caption"] == "" and seen[0]["decoding"] is None and seen[0]["current"] is None  # cleared first
    steps = list(stream(model, photo_path, APP_DEFAULTS, max_len=8))
    # One update per streamed word, and one per search step that streamed none (the search tree grows by a column:
    # the same caption, a larger tree).
    worded = [p for i, p in enumerate(seen[1:], 1) if p["caption"] != seen[i - 1]["caption"]]
    assert [p["caption"] for p in worded] == [st.text for st in steps]
    for p, st in zip(worded[:-1], steps):  # while it streams, "This step" is the word being decoded
        assert p["current"] == {a.word: a.prob for a in st.alternatives} and p["decoding"] is None
    columns = [p["tree"].count('class="step"') for p in seen[1:]]
    assert columns == sorted(columns) and len(set(columns)) > 2 and "s-chosen" in page["tree"]
    assert not any("s-chosen" in p["tree"] for p in seen[1:-1])  # the caption's path is known only at the end
    decoding = page["decoding"]
    assert decoding.tokens == steps[-1].tokens and page["cache"].key
    # After the decode both "This step" and the inspector show the focus step (the first).
    first = {a.word: a.prob for a in steps[0].alternatives}
    assert page["current"] == page["alternatives"] == first and page["slider"].value == 1 and "1 of" in page["heading"]


def test_moving_the_inspector_moves_this_step_too(handlers, photo_path):
    page, _ = run_page({}, page_caption(handlers, photo_path, max_len=8))
    decoding = page["decoding"]
    for n in (3, 2, len(decoding.steps)):
        view = handlers.select(decoding, n)  # the slider: dragged, arrow keys, a typed number
        words = {a.word: a.prob for a in decoding.steps[n - 1].alternatives}
        assert view.current == view.alternatives == words and f"{n} of {len(decoding.steps)}" in view.heading
        assert view.slider == {"__type__": "update"}  # the slider is where the user put it: no update to fight a drag
    assert handlers.select(decoding, 99).slider.value == len(decoding.steps)  # a typed number beyond the end: clamped
    assert all(v == {"__type__": "update"} for v in handlers.select(decoding, ""))  # a box being typed into: no change
    assert handlers.select(decoding, 2, +1).current == {a.word: a.prob for a in decoding.steps[2].alternatives}


def test_a_failed_upload_after_a_good_one_leaves_empty_outputs(handlers, photo_path, tmp_path):
    page, _ = run_page({}, page_caption(handlers, photo_path, max_len=8))
    assert page["caption"] and page["table"]["data"] and page["decoding"] and page["current"]
    bad = tmp_path / "notes.jpg"
    bad.write_text("a shopping list, not a photo\n")
    with pytest.warns(UserWarning, match="notes.jpg: not an image file"):  # gr.Warning, outside a served page
        page, seen = run_page(page, page_caption(handlers, str(bad), page["cache"], max_len=8))
    assert seen[0]["caption"] == "" and seen[0]["status"]["visible"] is False  # cleared first, before the file is read
    assert page["caption"] == "" and page["table"]["data"] == [] and page["decoding"] is None
    assert page["current"] is None and page["alternatives"] is None and page["confidence"] is None
    assert page["prefix"] == "" and page["branch"].choices == [] and "Caption an image" in page["info"]
    assert page["download"]["interactive"] is False and page["cnn_sees"] == "" and page["heatmap"]["value"] is None
    # Why, beside the caption (not an error badge over it), and the photo box emptied (not a broken image).
    assert page["status"]["visible"] is True and "notes.jpg: not an image file" in page["status"]["value"]
    assert str(bad.parent) not in page["status"]["value"] and "photo" in page and page["photo"] is None


def test_a_branch_that_cannot_be_done_changes_nothing(handlers, photo_path):
    page, _ = run_page({}, page_caption(handlers, photo_path, max_len=8))
    with pytest.warns(UserWarning, match="Pick one of this step's words"):
        (update,) = page_redecode(handlers, page["decoding"], 1, None, page["cache"], max_len=8)
    assert set(update) == {"status"} and "Pick one of this step's words" in update["status"]["value"]  # nothing else changes
    t = 1
    alt = next(a for a in page["decoding"].steps[t].alternatives[::-1] if a.word != "<EOS>")
    new, seen = run_page(page, page_redecode(handlers, page["decoding"], t + 1, alt.token, page["cache"], max_len=8))
    assert seen[0]["decoding"] is None and seen[0]["current"] is not None  # the old decoding goes with the first new word
    assert new["decoding"].prefix == (*page["decoding"].tokens[:t], alt.token) and new["slider"].value == t + 1


# ---------------------------------------------------------------- formatting, downloads


@pytest.mark.parametrize("p,digits,text", [
    (0.0, 0, "0%"), (0.004, 0, "<1%"), (0.005, 0, "<1%"), (0.0051, 0, "1%"), (0.012, 0, "1%"), (0.5, 0, "50%"),
    (1.0, 0, "100%"), (0.0004, 1, "<0.1%"), (0.0006, 1, "0.1%"), (0.624, 1, "62.4%"), (0.0, 1, "0.0%"),
])
def test_percent_never_rounds_a_possible_word_to_zero(p, digits, text):
    assert percent(p, digits) == text


def test_table_and_radio_show_small_probabilities_as_less_than_one_percent(handlers):
    from captioner.decode import Candidate

    alts = (Candidate(5, "dog", 0.62), Candidate(4, "a", 0.012), Candidate(6, "runs", 0.004))
    st = Step(0, 5, "dog", 0.62, -0.5, alts, 0.0004, (5,), "Dog", stop="eos")
    row = table_row(st)
    assert row == [1, "dog", "62.0%", "<0.1%", "dog\u00a062%, a\u00a01%, runs\u00a0<1%"]
    decoding = Decoding((st,), "eos", GenerationConfig(), (), 0, "key")
    view = inspect(decoding, 1)
    assert [label for label, _ in view.branch.choices] == ["dog  (62%)", "a  (1%)", "runs  (<1%)"]
    assert "p(`<EOS>`) here = <0.1%" in view.info


def test_the_decoding_download_holds_steps_words_probabilities_alternatives_settings_and_model(handlers, model, photo_path,
                                                                                               monkeypatch):
    from captioner.app import downloads

    written = []
    monkeypatch.setattr(downloads, "write_download", lambda *a, w=downloads.write_download: written.append(a) or w(*a))
    page, _ = run_page({}, page_caption(handlers, photo_path, strategy="beam", max_len=8))
    assert written == []  # a caption writes no file that nobody may ask for
    decoding = page["decoding"]
    assert page["download"]["interactive"]
    path = handlers.download(decoding)  # written when asked for, on the button's click
    assert path.endswith(".json") and len(written) == 1
    with pytest.raises(gr.Error, match="Caption an image first"):  # never a silent nothing
        handlers.download(None)
    with pytest.raises(gr.Error, match="expired on the server.*caption the photo again"):  # the page shows one: expired
        handlers.download(None, decoding.text)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    assert record["model"] == handlers.model_id and record["caption"] == decoding.text and record["stop"] == decoding.stop
    assert record["precision"] == handlers.model.precision
    assert record["settings"] == dataclasses.asdict(decoding.settings) and record["settings"]["strategy"] == "beam"
    assert [s["word"] for s in record["steps"]] == [s.word for s in decoding.steps]
    for got, st in zip(record["steps"], decoding.steps, strict=True):
        assert got["prob"] == st.prob and got["eos_prob"] == st.eos_prob and got["tokens"] == list(st.tokens)
        assert [(a["word"], a["token"], a["prob"]) for a in got["alternatives"]] == [(a.word, a.token, a.prob) for a in st.alternatives]
        assert "history" not in got


# ---------------------------------------------------------------- the API's /branch


def test_branch_api_equals_stream_with_a_prefix(handlers, model, photo_path):
    final = list(stream(model, photo_path, APP_DEFAULTS, max_len=8))[-1]
    alt = next(a for a in final.caption_steps()[1].alternatives if a.token != final.tokens[1] and a.word != "<EOS>")
    want = list(stream(model, photo_path, APP_DEFAULTS, prefix=[final.tokens[0], alt.token], max_len=8))
    for word in (alt.word, alt.token, str(alt.token), alt.word.upper()):
        outs = list(handlers.branch(photo_path, 2, word, max_len=8))
        assert [o[0] for o in outs] == [w.text for w in want], word
        assert outs[-1][3].prefix == (final.tokens[0], alt.token) and outs[-1][3].focus == 1
    # "<EOS>" ends the caption there
    outs = list(handlers.branch(photo_path, 3, "<EOS>", max_len=8))
    assert outs[-1][3].tokens == final.tokens[:2] and outs[-1][3].stop == "eos"


@pytest.mark.parametrize("step,word,message", [
    (2, "zebrafish-unicorn", "not a word of the model's vocabulary"),
    (2, 99999, "not in the model's vocabulary"),
    (2, "<UNK>", "cannot be part of a caption"),
    (2, "", "Give the word"),
    (0, "dog", "step=0: this caption has"),
    (99, "dog", "step=99: this caption has"),
    (None, "dog", "give the number of the word"),
])
def test_branch_api_errors_are_clear(handlers, photo_path, step, word, message):
    with pytest.raises(gr.Error, match=message):
        list(handlers.branch(photo_path, step, word, max_len=8))


# ---------------------------------------------------------------- several photos at once


def test_caption_files_captions_the_good_ones_and_names_the_bad_ones(handlers, model, photo_path, tmp_path):
    import csv

    other = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(other)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    files = [photo_path, str(bad), str(other), str(empty)]
    table, downloads = handlers.caption_files(files, max_len=8)
    want = [caption(model, p, APP_DEFAULTS, max_len=8) for p in (photo_path, str(other))]
    assert table["headers"] == ["image", "caption", "familiar", "confidence", "error"]
    assert [row[0] for row in table["data"]] == ["photo.jpg", "notes.jpg", "grey.png", "empty.png"]  # the input order
    assert [row[1] for row in table["data"]] == [want[0], "", want[1], ""]
    # the fixture's photo (random pixels) and a 30 x 40 flat grey image are unfamiliar by rule, for any model; this
    # tiny model has no confidence calibration
    assert [row[2:4] for row in table["data"]] == [["no", ""], ["", ""], ["no", ""], ["", ""]]
    assert table["data"][1][4].startswith("not an image file PIL can read") and table["data"][3][4].startswith("the file is empty")
    assert all(str(tmp_path) not in cell for row in table["data"] for cell in row)
    csv_path, json_path = downloads
    assert csv_path.endswith("captions.csv") and json_path.endswith("captions.json")
    with open(csv_path, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [table["headers"], *table["data"]]
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    assert records[0] == {"image": "photo.jpg", "caption": want[0], "familiar": False, "confidence": None,
                          "familiarity": {"familiar": False, "distance": None, "threshold": None, "reason": "random noise"},
                          "precision": model.precision}
    assert records[2]["familiar"] is False and records[2]["familiarity"]["reason"] == "only 30×40 pixels"
    assert set(records[1]) == {"image", "error"}
    # Gradio's upload payloads (file dicts with the original name) work too
    table2, _ = handlers.caption_files([{"path": str(bad), "orig_name": "my notes.jpg"}], max_len=8)
    assert table2["data"][0][0] == "my notes.jpg" and table2["data"][0][4].startswith("not an image file")


def test_caption_files_reports_progress_photo_by_photo(handlers, photo_path, tmp_path):
    """The several-photos tab's progress: a count that reaches every photo, bad ones included, never going back."""
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo\n")
    files = [photo_path, str(bad), photo_path, photo_path]
    seen = []
    handlers.caption_files(files, progress=lambda done, desc=None, unit=None: seen.append((done, desc, unit)), max_len=8)
    counts = [done for (done, total), _, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 4 and counts[0] == 1  # the bad file first, then the batch
    assert all(total == 4 and unit == "photos" for (_, total), _, unit in seen)
    assert seen[-1][1] == "4 of 4 photos"


def test_each_photo_gets_its_own_caption_in_the_table_and_one_by_one(distinct, distinct_dir, tmp_path):
    """On the model whose captions differ per photo: the table keeps each caption with its photo (out of order, a bad
    file in between), and captioning photo after photo with the previous photo's cache gives each its own."""
    model, photos = distinct
    _, paths = distinct_dir
    handlers = Handlers(model, word_delay=0)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a photo\n")
    order = [paths[i] for i in (2, 5, 0)] + [bad] + [paths[i] for i in (4, 1, 3)]
    for controls in ({}, {"strategy": "greedy"}):  # {}: the app's defaults
        expected = {p.name: caption(model, p, handlers.settings(**controls)) for p in paths}
        assert_all_different(expected.values())
        table, _ = handlers.caption_files([str(p) for p in order], **controls)
        assert [(row[0], row[1]) for row in table["data"]] == [(p.name, expected.get(p.name, "")) for p in order]
        cache = None
        for p in order:
            if p == bad:
                continue
            outs = cap(handlers, str(p), cache, **controls)
            assert outs[-1][0] == expected[p.name]
            cache = outs[-1][4]


def test_caption_files_without_files_is_a_clear_error(handlers):
    with pytest.raises(gr.Error, match="No photos yet"):
        handlers.caption_files([])


def test_redecode_without_a_caption_or_a_word_is_a_clear_error(handlers, photo_path):
    with pytest.raises(gr.Error, match="Caption an image first"):
        branch(handlers, None, 1, 5)
    first = cap(handlers, photo_path, strategy="greedy")
    decoding, cache = first[-1][3], first[-1][4]
    with pytest.raises(gr.Error, match="Pick one of this step's words"):
        branch(handlers, decoding, 1, None, cache)
    with pytest.raises(gr.Error, match="not among step 1's alternatives"):
        branch(handlers, decoding, 1, 1, cache)  # <SOS> is never an alternative
    with pytest.raises(gr.Error, match="image changed"):
        branch(handlers, decoding, 1, decoding.tokens[0], ImageCache("other", cache.features))


def test_inspector_before_any_caption_is_empty_not_an_error(handlers):
    view = inspect(None, 3)
    assert view.slider.value == 1 and view.prefix == "" and "Caption an image" in view.info
    assert view.alternatives is None and view.current is None and view.branch.choices == []


# ---------------------------------------------------------------- bad input


def png_header(w, h):
    """A PNG that declares w x h pixels (no pixel data): enough for a decompression-bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_no_image_is_a_clear_error(handlers):
    with pytest.raises(gr.Error, match="No image yet"):
        cap(handlers, None)


def test_cleared_image_just_clears_the_outputs(handlers):
    page = apply({}, cleared())
    assert page["caption"] == "" and page["table"]["data"] == [] and page["decoding"] is None and "cache" not in page
    assert page["current"] is None and page["alternatives"] is None and page["confidence"] is None and page["prefix"] == ""
    assert page["download"]["interactive"] is False and page["status"]["visible"] is False
    assert page["cnn_sees"] == "" and page["heatmap"]["value"] is None


@pytest.mark.parametrize("name,data,message", [
    ("notes.jpg", b"this is a text file, not a photo\n", "notes.jpg: not an image file PIL can read"),
    ("empty.png", b"", "empty.png: the file is empty"),
    ("big.png", png_header(8000, 6000), "big.png: 8000x6000 pixels is too large (limit 40 megapixels)"),
    ("bomb.png", png_header(20000, 20000), "bomb.png: image dimensions are too large to decode safely"),
    ("cut.jpg", None, "cut.jpg: the image data is damaged or truncated"),
])
def test_bad_files_are_clear_errors_naming_the_file(handlers, tmp_path, name, data, message):
    if data is None:  # a JPEG cut in half
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    path = tmp_path / "upload-dir" / name
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(gr.Error) as e:
        cap(handlers, str(path))
    assert e.value.message.startswith(message)
    assert str(tmp_path) not in e.value.message  # the user's file name, not the server's temporary path
    assert e.value.print_exception is False


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="sample", temperature=0), "temperature=0"),
    (dict(strategy="beam", beam_size=0), "beam_size=0"),
    (dict(strategy="greedy", max_len=0), "max_len=0"),
    (dict(strategy="nonsense"), "strategy='nonsense'"),
    (dict(strategy="greedy", top_k="many"), "bad decoding setting"),
])
def test_bad_settings_are_clear_errors(handlers, photo_path, kwargs, message):
    with pytest.raises(gr.Error, match=message):
        cap(handlers, photo_path, **kwargs)


# ---------------------------------------------------------------- the Blocks


SETTING_TYPES = {"strategy": f"Literal[{', '.join(map(repr, STRATEGIES))}]", "beam_size": "int", "max_len": "int",
                 "num_alternatives": "int", "temperature": "float", "top_k": "int", "top_p": "float", "seed": "int",
                 "guide_threshold": "float"}


def test_build_demo_has_the_caption_endpoint_and_no_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo = build_demo(model, "tiny @ test")
    noisy = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert not noisy, [f"{w.category.__name__}: {w.message}" for w in noisy]
    api = demo.get_api_info()["named_endpoints"]
    assert "/caption" in api
    params = api["/caption"]["parameters"]
    assert params[0]["component"] == "Image" and not params[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] for p in params[1:])
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params[1:]}
    assert defaults["strategy"] == "guided" and defaults["beam_size"] == 3 and defaults["max_len"] == model.config.max_len
    assert defaults["temperature"] == 1.0 and defaults["top_k"] == 0 and defaults["top_p"] == 0.9 and defaults["seed"] == -1
    assert defaults["guide_threshold"] == 0 and GenerationConfig().guide_threshold is None  # 0: calibrated per word
    from captioner.app import limits

    assert demo._queue.default_concurrency_limit == limits.CONCURRENCY == 16 and demo._queue.max_size == limits.MAX_QUEUE == 64
    assert any("tiny @ test" in str(c.get("props", {}).get("value")) for c in demo.config["components"])


def test_gradio_upload_payloads_are_opened_by_the_handler(handlers, model, photo_path):
    """The decoding events get Gradio's undecoded FileData dict (preprocess=False), or a data: URL."""
    import base64

    want = caption(model, photo_path, strategy="greedy", max_len=model.config.max_len)
    payload = {"path": photo_path, "url": None, "orig_name": "photo.jpg", "meta": {"_type": "gradio.FileData"}}
    assert cap(handlers, payload, strategy="greedy")[-1][0] == want
    data = base64.b64encode(open(photo_path, "rb").read()).decode()
    assert cap(handlers, {"path": None, "url": "data:image/jpeg;base64," + data}, strategy="greedy")[-1][0] == want
    with pytest.raises(gr.Error, match="not an image file"):
        cap(handlers, {"path": None, "url": "data:image/jpeg;base64," + base64.b64encode(b"nope").decode()})


def test_the_apis_shape(model):
    """What view_api() shows a client: three endpoints, their parameters' names and types, short output names."""
    api = build_demo(model, "tiny").get_api_info()
    assert set(api["named_endpoints"]) == {"/caption", "/branch", "/caption_files"} and not api["unnamed_endpoints"]

    def shape(name):
        e = api["named_endpoints"][name]
        return ([(p["parameter_name"], p["python_type"]["type"], p["component"]) for p in e["parameters"]],
                [(r["label"], r["component"]) for r in e["returns"]])

    settings = [(name, kind, "Radio" if name == "strategy" else "Number" if name == "seed" else "Slider")
                for name, kind in SETTING_TYPES.items()]
    outputs = [("Caption", "Textbox"), ("Words", "Label"), ("History", "Dataframe"), ("Assessment", "Json")]
    assert shape("/caption") == ([("image", "filepath", "Image"), *settings], outputs)
    assert shape("/branch") == ([("image", "filepath", "Image"), ("step", "int", "Number"), ("word", "str", "Textbox"), *settings],
                                outputs)
    assert shape("/caption_files") == ([("files", "list[filepath]", "File"), *settings],
                                       [("Captions", "Dataframe"), ("Downloads", "File")])
    branch = {p["parameter_name"]: p for p in api["named_endpoints"]["/branch"]["parameters"]}
    assert not any(branch[n]["parameter_has_default"] for n in ("image", "step", "word"))
    assert all(branch[n]["parameter_has_default"] for n in SETTING_TYPES)


# ---------------------------------------------------------------- what the CNN sees; where the model looked


@pytest.fixture(scope="module")
def attend(tmp_path_factory):
    """A tiny attention decoder with an ImageNet head, saved and loaded back as the app would load it."""
    folder = tmp_path_factory.mktemp("tiny_attend")
    attend_model(seed=3).save_pretrained(folder)
    return Captioner.from_pretrained(folder)


@pytest.fixture
def attend_handlers(attend):
    return Handlers(attend, word_delay=0)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_cnns_labels_are_shown_beside_the_caption_computed_once_per_photo(attend_handlers, attend, photo_path, monkeypatch):
    want = top_labels(attend, photo_path, k=5)  # the Python API's labels
    counter = EncodeCounter(attend, monkeypatch)
    page, seen = run_page({}, page_caption(attend_handlers, photo_path))
    assert len(want) == 5 and want[0][1] > want[-1][1] > 0  # the fixture's head gives distinct labels
    assert page["cache"].cnn_sees == tuple(want)
    assert page["cnn_sees"] == "**The CNN sees:** " + describe_labels(want) and "%" in page["cnn_sees"]
    assert seen[0]["cnn_sees"] == "" and seen[1]["cnn_sees"] == page["cnn_sees"]  # cleared, then with the first word
    # Re-decoding, branching and other settings reuse them with the features: the CNN ran once.
    run_page(page, page_caption(attend_handlers, photo_path, page["cache"], strategy="beam"))
    t = 1
    alt = next(a for a in page["decoding"].steps[t].alternatives if a.token != page["decoding"].steps[t].token)
    new, _ = run_page(page, page_redecode(attend_handlers, page["decoding"], t + 1, alt.token, page["cache"]))
    assert new["cnn_sees"] == page["cnn_sees"] and counter.n == 1


def test_no_labels_for_a_model_without_an_imagenet_head(handlers, model, photo_path):
    assert not model.config.imagenet_head
    page, _ = run_page({}, page_caption(handlers, photo_path, max_len=8))
    assert page["cache"].cnn_sees is None and page["cnn_sees"] == ""
    demo = build_demo(model, "tiny")
    (line,) = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "cnn-labels"]
    assert line["props"]["visible"] is False  # hidden, not an empty line
    (note,) = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "training-note"]
    assert "Flickr8k" in note["props"]["value"] and "CNN sees" not in note["props"]["value"]


def test_the_heatmap_follows_the_selected_step(attend_handlers, photo_path):
    page, _ = run_page({}, page_caption(attend_handlers, photo_path))
    decoding, cache = page["decoding"], page["cache"]
    assert cache.photo is not None and decoding.photo is cache.photo  # kept once per photo, shared with the decoding
    steps = decoding.steps
    assert len(steps) >= 3 and all(s.attention is not None and len(s.attention) == 4 for s in steps)  # 2 x 2 regions
    assert steps[0].attention != steps[1].attention
    # After the decode: step 1's heatmap, captioned with its word and probability.
    hm = page["heatmap"]
    assert hm["visible"] is True and hm["label"] == f"Where it looked for “{steps[0].word}”"
    assert np.array_equal(pixels(hm["value"]), pixels(attention_overlay(cache.photo.image(), steps[0].attention)))
    # Next, the slider and the keyboard (select) move it: a step whose attention differs has another image.
    nxt = attend_handlers.select(decoding, 1, +1).heatmap
    assert nxt["label"].startswith(f"Where it looked for “{steps[1].word}”")
    assert np.abs(pixels(nxt["value"]) - pixels(hm["value"])).max() > 20
    assert np.array_equal(pixels(attend_handlers.select(decoding, 2).heatmap["value"]), pixels(nxt["value"]))
    assert np.array_equal(pixels(attend_handlers.select(decoding, 2, -1).heatmap["value"]), pixels(hm["value"]))
    for n in range(1, len(steps) + 1):
        view = inspect(decoding, n).heatmap
        assert np.array_equal(pixels(view["value"]), pixels(attention_overlay(cache.photo.image(), steps[n - 1].attention)))


def test_branching_shows_the_new_captions_heatmaps(attend_handlers, attend, photo_path):
    page, _ = run_page({}, page_caption(attend_handlers, photo_path))
    decoding = page["decoding"]
    t = 1
    alt = next(a for a in decoding.steps[t].alternatives if a.token != decoding.steps[t].token and a.word != "<EOS>")
    new, _ = run_page(page, page_redecode(attend_handlers, decoding, t + 1, alt.token, page["cache"]))
    branched = new["decoding"]
    want = list(stream(attend, photo_path, APP_DEFAULTS, prefix=(*decoding.tokens[:t], alt.token), max_len=attend.config.max_len))[-1]
    assert branched.tokens == want.tokens
    assert np.allclose([s.attention for s in branched.steps], [s.attention for s in want.caption_steps()], atol=1e-5)
    assert new["heatmap"]["label"].startswith(f"Where it looked for “{alt.word}”")  # the branch point is selected
    assert np.array_equal(pixels(new["heatmap"]["value"]), pixels(attention_overlay(page["cache"].photo.image(), branched.steps[t].attention)))
    last = inspect(branched, len(branched.steps)).heatmap
    assert np.array_equal(pixels(last["value"]), pixels(attention_overlay(page["cache"].photo.image(), branched.steps[-1].attention)))


def test_no_heatmap_for_a_model_that_does_not_attend(handlers, model, photo_path):
    page, _ = run_page({}, page_caption(handlers, photo_path, max_len=8))
    assert page["decoding"].steps[0].attention is None and page["cache"].photo is None  # nothing kept that nobody draws
    assert page["heatmap"] == {"__type__": "update", "value": None, "visible": False}
    assert handlers.select(page["decoding"], 1, +1).heatmap["visible"] is False
    demo = build_demo(model, "tiny")
    (image,) = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "heatmap"]
    assert image["props"]["visible"] is False


def test_the_attend_models_page_shows_the_heatmap_and_the_labels(attend):
    demo = build_demo(attend, "tiny attend")
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if c.get("props", {}).get("elem_id")}
    assert props["heatmap"]["visible"] is True and props["cnn-labels"]["visible"] is True
    note = props["training-note"]["value"]
    assert "Flickr8k" in note and "people, dogs and outdoor scenes" in note and "CNN sees" in note and "guided" in note


def test_the_photo_kept_for_the_heatmap_is_what_the_encoder_saw_at_most_512_px(attend_handlers, attend, tmp_path):
    big = Image.fromarray(np.random.RandomState(2).randint(0, 256, (800, 1200, 3), dtype=np.uint8))
    cache = attend_handlers.image_cache(big, None)
    assert cache.photo.size == (PHOTO_MAX_SIDE, round(PHOTO_MAX_SIDE * 800 / 1200))  # squash: the whole photo
    assert max(attend_handlers.image_cache(Image.new("RGB", (40, 30)), None).photo.size) == 40  # never enlarged
    # A model that centre-crops saw only the centre square: the heatmap's grid covers that.
    crop = dataclasses.replace(attend.config, resize="crop", crop_pct=0.875)
    a = np.zeros((800, 1200, 3), np.uint8)
    a[:, 400:800] = 255  # a white centre square, 800 x 400 wide band
    photo = encoder_view(Image.fromarray(a), crop, PHOTO_MAX_SIDE)
    assert photo.size[0] == photo.size[1] <= PHOTO_MAX_SIDE
    side = round(800 * 0.875)  # the crop's side in the photo's pixels (crop_pct of the shorter side)
    assert abs(photo.size[0] - min(PHOTO_MAX_SIDE, side)) <= 1
    inner = pixels(photo)[:, photo.size[0] // 2 - 100 : photo.size[0] // 2 + 100]
    assert inner.min() > 200  # the centre band fills it


def test_the_decoding_download_holds_each_steps_attention(attend_handlers, handlers, photo_path):
    for h in (attend_handlers, handlers):
        page, _ = run_page({}, page_caption(h, photo_path, max_len=8))
        with open(h.download(page["decoding"]), encoding="utf-8") as f:
            record = json.load(f)
        for got, st in zip(record["steps"], page["decoding"].steps, strict=True):
            assert got["attention"] == (None if st.attention is None else list(st.attention))
        if h is attend_handlers:
            assert all(len(s["attention"]) == 4 and sum(s["attention"]) == pytest.approx(1.0, abs=1e-4) for s in record["steps"])


def test_guided_decoding_has_its_threshold_and_the_inspector_says_what_was_required(tmp_path, photo_path):
    m = attend_model(seed=3)
    dog = 207  # golden retriever: one of the dog classes, which map to "dog"
    with torch.no_grad():
        m.encoder.classifier.bias[dog] = 60.0  # the CNN is sure it is a dog
    m.save_pretrained(tmp_path / "m")
    h = Handlers(Captioner.from_pretrained(tmp_path / "m"), word_delay=0)
    assert h.settings(guide_threshold=0.3).guide_threshold == 0.3
    assert h.settings(guide_threshold=None).guide_threshold == GenerationConfig().guide_threshold
    page, _ = run_page({}, page_caption(h, photo_path, strategy="guided", guide_threshold=0.4))
    decoding = page["decoding"]
    assert decoding.settings.strategy == "guided" and decoding.settings.guide_threshold == 0.4
    final = decoding.steps[-1].constraint
    assert final.words == ("dog",) and final.met is True and final.used == "dog"
    assert "golden retriever" in page["cache"].cnn_sees[0][0]
    first_dog = next(i for i, s in enumerate(decoding.steps) if s.word == "dog")
    for n in range(1, len(decoding.steps) + 1):
        info = inspect(decoding, n).info
        assert '**Guided:** required "dog", as the CNN sees' in info and "golden retriever" in info and 'the caption uses "dog"' in info
        assert ("this step's word is the required one" in info) == (n - 1 == first_dog)
    # The download says which constraint was tried and whether it was kept.
    with open(h.download(decoding), encoding="utf-8") as f:
        record = json.load(f)["constraint"]
    assert record["words"] == ["dog"] and record["met"] is True and record["used"] == "dog" and record["unfit"] is False
    # A constraint that does not fit (no margin at all for a less likely caption): the caption without the word,
    # and the inspector says why.
    # This decoder likes "dog" (the caption with it is the likelier one); make "dog" unlikely so that it cannot fit.
    with torch.no_grad():
        h.model.decoder.head.bias[h.model.vocab.stoi["dog"]] -= 6.0
    tight, _ = run_page({}, page_caption(h, photo_path, page["cache"], strategy="guided", guide_threshold=0.4, guide_margin=0))
    c = tight["decoding"].steps[-1].constraint
    assert c.unfit and c.met is False and c.free > c.fit, c
    assert "dog" not in [s.word for s in tight["decoding"].steps] and "could not fit" in inspect(tight["decoding"], 1).info
    # Not guided: no such line.
    plain, _ = run_page({}, page_caption(h, photo_path, page["cache"], strategy="beam"))
    assert "Guided" not in plain["info"]


def test_an_unfamiliar_photo_gets_its_sentence_under_the_caption(handlers, tmp_path):
    """Issue 32: the sentence under the caption, the download's and the API's "familiar"/"confidence"; cleared when
    the next photo comes."""
    grey = tmp_path / "grey.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(grey)
    page, seen = run_page({}, page_caption(handlers, str(grey), max_len=8))
    assert seen[0]["assessment"]["visible"] is False  # cleared first
    shown = page["assessment"]
    assert shown["visible"] and shown["value"].startswith("**This image is a single flat colour, nothing like the photos")
    with open(handlers.download(page["decoding"]), encoding="utf-8") as f:
        record = json.load(f)
    assert record["familiar"] is False and record["confidence"] is None and record["familiarity"]["reason"] == "a single flat colour"
    api = list(handlers.caption(str(grey), max_len=8))
    assert all(u.assessment is None for u in api[:-1]) and api[-1].assessment == page["decoding"].assessment.record()


def test_every_setting_slider_takes_its_range_from_limits(model):
    """Each decoding setting's slider in the built page spans its served range in GenerationConfig.LIMITS: up to
    `served`, from `low` (one step above it where LIMITS excludes it, unless the slider's low end stands for the
    default: guide_threshold's 0 is each word's calibrated threshold), and the server takes both ends."""
    from captioner.generation import LIMITS

    demo = build_demo(model, "tiny")
    settings = {name: c for name, c in demo.controls.items() if isinstance(c, gr.Slider)}
    assert set(settings) == {"beam_size", "max_len", "guide_threshold", "num_alternatives", "temperature", "top_k", "top_p"}
    others = [b.elem_id for b in demo.blocks.values() if isinstance(b, gr.Slider) and all(b is not s for s in settings.values())]
    assert others == ["step-slider"]  # every other slider on the page is a decoding setting's
    for name, s in settings.items():
        limit = LIMITS[name]
        low = limit.low + s.step if limit.open_low and name != "guide_threshold" else limit.low
        high = max(limit.served, model.config.max_len) if name == "max_len" else limit.served
        assert (s.minimum, s.maximum) == pytest.approx((low, high)), name
        defaults = GenerationConfig.make(APP_DEFAULTS, max_len=model.config.max_len)
        for end in (s.minimum, s.maximum):  # as the slider sends them: floats; a ValueError here fails the test
            settings_from({name: float(end)}, defaults)
