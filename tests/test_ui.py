"""The Gradio app's handlers (captioner/ui.py), called directly: streaming, inspector, branching, bad input."""
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

from captioner import load
from captioner.decode import Step, caption, stream
from captioner.generation import GenerationConfig
from captioner.ui import Decoding, Handlers, ImageCache, build_demo, highlighted
from tiny import tiny_model

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
    return load(folder)


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
    return list(handlers.caption(image, handlers.settings(**controls), cache))


def branch(handlers, decoding, step_number, choice, cache=None, **controls):
    return list(handlers.redecode(decoding, step_number, choice, handlers.settings(**controls), cache))


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


def test_defaults_are_greedy_and_the_models_max_len(handlers, model, photo_path):
    outs = list(handlers.caption(photo_path))
    assert outs[-1][0] == caption(model, photo_path, strategy="greedy", max_len=model.config.max_len)
    assert outs[-1][3].settings.strategy == "greedy" and outs[-1][3].settings.max_len == model.config.max_len
    assert handlers.settings() == GenerationConfig(max_len=model.config.max_len)


def test_settings_from_control_values(handlers, model):
    """Sliders send floats, an API client may leave a setting out or send None; the seed -1 means a new one."""
    got = handlers.settings(strategy="sample", beam_size=3.0, max_len=7.0, top_k=2.6, top_p=0.5, seed=-1, temperature=None)
    assert got == GenerationConfig(strategy="sample", beam_size=3, max_len=7, top_k=3, top_p=0.5, seed=None)
    assert isinstance(got.beam_size, int) and isinstance(got.top_k, int)
    assert handlers.settings(seed=12.0).seed == 12 and handlers.settings(seed="").seed is None
    assert handlers.settings(top_p=None).top_p == GenerationConfig().top_p == 0.9


# ---------------------------------------------------------------- inspector and branching


def test_inspector_step_view_equals_the_core_records(handlers, model, photo_path):
    decoding = cap(handlers, photo_path, strategy="greedy", max_len=8, num_alternatives=4)[-1][3]
    steps = list(stream(model, photo_path, strategy="greedy", max_len=8, num_alternatives=4))
    for t, st in enumerate(steps):
        slider, prefix, info, alts, words, radio = handlers.inspect(decoding, t + 1)[:6]
        assert slider.value == t + 1 and slider.maximum == max(len(steps), 2)
        assert prefix == (steps[t - 1].text if t else "")
        assert alts == {a.word: a.prob for a in st.alternatives}
        assert f"**{st.word}**" in info and f"p(`<EOS>`) here = {st.eos_prob:.1%}" in info and f"p = {st.prob:.1%}" in info
        assert [value for _, value in radio.choices] == [a.token for a in st.alternatives]
        assert "".join(text for text, _ in words) == steps[-1].text
    # Out of range steps are clamped; prev/next move by one.
    assert handlers.inspect(decoding, 99)[0].value == len(steps)
    assert handlers.inspect(decoding, -3)[0].value == 1
    assert handlers.move(decoding, 2, +1)[0].value == 3 and handlers.move(decoding, 1, -1)[0].value == 1


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
    slider, prefix_text, info, alts, words = handlers.inspect_focus(new)[:5]
    assert slider.value == t + 1 and "".join(w for w, _ in words) == want[-1].text
    assert prefix_text == (new.steps[t - 1].text if t else "") and f"**{alt.word}**" in info


def test_branch_to_eos_ends_the_caption_there(handlers, model, photo_path):
    first = cap(handlers, photo_path, strategy="greedy", max_len=8)
    decoding, cache = first[-1][3], first[-1][4]
    eos = next((a for a in decoding.steps[3].alternatives if a.word == "<EOS>"), None)
    if eos is None:
        pytest.skip("<EOS> not among this step's alternatives")
    outs = branch(handlers, decoding, 4, eos.token, cache, strategy="greedy", max_len=8)
    assert outs[-1][3].tokens == decoding.tokens[:3] and outs[-1][3].stop == "eos"


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
    slider, prefix, info, alts, words, radio = handlers.inspect(None, 3)[:6]
    assert slider.value == 1 and prefix == "" and "Caption an image" in info and alts is None and radio.choices == []


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
    outs = list(handlers.auto_caption(None, handlers.settings(strategy="beam"), None))
    assert outs == [("", None, {"headers": outs[0][2]["headers"], "data": []}, None, None)]


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
    assert defaults["strategy"] == "greedy" and defaults["beam_size"] == 3 and defaults["max_len"] == model.config.max_len
    assert defaults["temperature"] == 1.0 and defaults["top_k"] == 0 and defaults["top_p"] == 0.9 and defaults["seed"] == -1
    assert demo._queue.default_concurrency_limit == 4 and demo._queue.max_size == 64
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
