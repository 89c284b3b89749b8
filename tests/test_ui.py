"""The Gradio app's handlers (captioner/ui.py), called directly: streaming, inspector, branching, bad input."""
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
from captioner.decode import caption, stream
from captioner.ui import Handlers, build_demo, highlighted
from tiny import tiny_model

SETTINGS = [
    dict(strategy="greedy"),
    dict(strategy="beam", beam_size=3),
    dict(strategy="beam", beam_size=1),
    dict(strategy="sample", seed=7, temperature=0.8, top_k=3, top_p=0.9),
]


def ui_kwargs(s, max_len, k=5):
    """The same settings as the handlers' arguments (their defaults fill the rest, as in the app)."""
    return dict(strategy=s["strategy"], beam_size=s.get("beam_size", 3), max_len=max_len, num_alternatives=k,
                temperature=s.get("temperature", 1.0), top_k=s.get("top_k", 0), top_p=s.get("top_p", 0.9), seed=s.get("seed", 0))


def core_kwargs(s, max_len, k=5):
    return dict(ui_kwargs(s, max_len, k))


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


class EncodeCounter:
    """Counts the model's encoder runs."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        original = model.encode

        def encode(x):
            self.n += 1
            return original(x)

        monkeypatch.setattr(model, "encode", encode)


def run(gen):
    return list(gen)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s["strategy"] + str(s.get("beam_size", "")))
def test_caption_streams_the_texts_of_decode_stream(handlers, model, photo_path, s):
    outs = run(handlers.caption(photo_path, **ui_kwargs(s, 8)))
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
def test_finished_decode_state_is_json_and_matches_the_core(handlers, model, photo_path, s):
    outs = run(handlers.caption(photo_path, **ui_kwargs(s, 8)))
    assert all(o[3] is None for o in outs[:-1])  # the state is only set when the decode is finished
    state = outs[-1][3]
    json.dumps(state)  # plain JSON-able data
    steps = list(stream(model, photo_path, **core_kwargs(s, 8)))
    final = steps[-1]
    assert state["tokens"] == list(final.tokens) and state["text"] == final.text and state["stop"] == final.stop
    assert [st["word"] for st in state["steps"]] == [model.vocab.itos[t] for t in final.tokens]
    # The per-step records are those of the final caption: what rescoring its words gives.
    ref = list(stream(model, photo_path, strategy="greedy", prefix=list(final.tokens), max_len=len(final.tokens)))
    for got, want in zip(state["steps"], ref, strict=True):
        assert got["text"] == want.text and got["token"] == want.token
        assert got["prob"] == pytest.approx(want.prob, abs=1e-5) and got["eos_prob"] == pytest.approx(want.eos_prob, abs=1e-5)
        assert [a["word"] for a in got["alternatives"]] == [a.word for a in want.alternatives]
    table = outs[-1][2]
    assert [row[1] for row in table["data"]] == [st["word"] for st in state["steps"]]
    assert table["headers"][:4] == ["#", "word", "p", "p(<EOS>)"]


def test_stream_with_eos_possible_ends_on_eos_somewhere(handlers, photo_path):
    """Sanity of the fixture: not every caption runs to max_len, so 'stop' takes both values across settings."""
    stops = {run(handlers.caption(photo_path, strategy="sample", seed=i, top_p=1.0, max_len=8))[-1][3]["stop"] for i in range(30)}
    assert "eos" in stops


def test_settings_change_never_reruns_the_encoder(handlers, model, photo_path, monkeypatch):
    counter = EncodeCounter(model, monkeypatch)
    outs = run(handlers.caption(photo_path, strategy="greedy", max_len=8))
    cache = outs[-1][4]
    assert counter.n == 1 and cache["feature"].shape == (1, model.config.embed_size)
    for s in SETTINGS:
        outs = run(handlers.caption(photo_path, **ui_kwargs(s, 6), cache=cache))
        assert outs[-1][4] is cache
    state = outs[-1][3]
    run(handlers.redecode(state, 2, state["steps"][1]["alternatives"][-1]["token"], cache=cache))
    assert counter.n == 1
    # Another image (or another user's cache) is encoded anew; the cache follows the image, not the session.
    other = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    outs2 = run(handlers.caption(other, strategy="greedy", cache=cache))
    assert counter.n == 2 and outs2[-1][4]["key"] != cache["key"]


def test_defaults_are_greedy_and_the_models_max_len(handlers, model, photo_path):
    outs = run(handlers.caption(photo_path))
    assert outs[-1][0] == caption(model, photo_path, strategy="greedy", max_len=model.config.max_len)
    assert outs[-1][3]["settings"]["strategy"] == "greedy" and outs[-1][3]["settings"]["max_len"] == model.config.max_len


# ---------------------------------------------------------------- inspector and branching


def test_inspector_step_view_equals_the_core_records(handlers, model, photo_path):
    state = run(handlers.caption(photo_path, strategy="greedy", max_len=8, num_alternatives=4))[-1][3]
    steps = list(stream(model, photo_path, strategy="greedy", max_len=8, num_alternatives=4))
    for t, st in enumerate(steps):
        slider, prefix, info, alts, words, branch = handlers.inspect(state, t + 1)
        assert slider.value == t + 1 and slider.maximum == max(len(steps), 2)
        assert prefix == (steps[t - 1].text if t else "")
        assert alts == {a.word: a.prob for a in st.alternatives}
        assert f"**{st.word}**" in info and f"p(`<EOS>`) here = {st.eos_prob:.1%}" in info and f"p = {st.prob:.1%}" in info
        assert [value for _, value in branch.choices] == [a.token for a in st.alternatives]
        assert "".join(text for text, _ in words) == steps[-1].text
    # Out of range steps are clamped; prev/next move by one.
    assert handlers.inspect(state, 99)[0].value == len(steps)
    assert handlers.inspect(state, -3)[0].value == 1
    assert handlers.move(state, 2, +1)[0].value == 3 and handlers.move(state, 1, -1)[0].value == 1


def test_confidence_colouring_follows_each_words_probability():
    steps = [{"word": "a", "text": "A", "prob": 0.9}, {"word": "dog", "text": "A dog", "prob": 0.3},
             {"word": ".", "text": "A dog.", "prob": 0.05}]
    assert highlighted(steps) == [("A", "confident (≥ 50%)"), (" ", None), ("dog", "unsure (20–50%)"), (".", "guess (< 20%)")]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s["strategy"] + str(s.get("beam_size", "")))
def test_branching_equals_stream_with_a_prefix(handlers, model, photo_path, s, monkeypatch):
    first = run(handlers.caption(photo_path, **ui_kwargs(s, 8)))
    state, cache = first[-1][3], first[-1][4]
    t = min(2, len(state["steps"]) - 1)  # branch at the third word (or the last)
    original = state["steps"][t]
    alt = next(a for a in original["alternatives"] if a["token"] != original["token"] and a["word"] != "<EOS>")
    counter = EncodeCounter(model, monkeypatch)
    outs = run(handlers.redecode(state, t + 1, alt["token"], **ui_kwargs(s, 8), cache=cache))
    assert counter.n == 0  # the cached feature is used
    prefix = state["tokens"][:t] + [alt["token"]]
    want = list(stream(model, photo_path, prefix=prefix, **core_kwargs(s, 8)))
    assert [o[0] for o in outs] == [w.text for w in want]
    new = outs[-1][3]
    assert new["tokens"] == list(want[-1].tokens) and new["tokens"][: t + 1] == prefix
    assert new["prefix"] == prefix and new["focus"] == t
    # The inspector then shows the new caption, at the step where it branched.
    slider, prefix_text, info, alts, words, _ = handlers.inspect_focus(new)
    assert slider.value == t + 1 and "".join(w for w, _ in words) == want[-1].text
    assert prefix_text == (new["steps"][t - 1]["text"] if t else "") and f"**{alt['word']}**" in info


def test_branch_to_eos_ends_the_caption_there(handlers, model, photo_path):
    first = run(handlers.caption(photo_path, strategy="greedy", max_len=8))
    state, cache = first[-1][3], first[-1][4]
    eos = next((a for a in state["steps"][3]["alternatives"] if a["word"] == "<EOS>"), None)
    if eos is None:
        pytest.skip("<EOS> not among this step's alternatives")
    outs = run(handlers.redecode(state, 4, eos["token"], strategy="greedy", max_len=8, cache=cache))
    assert outs[-1][3]["tokens"] == state["tokens"][:3] and outs[-1][3]["stop"] == "eos"


def test_redecode_without_a_caption_or_a_word_is_a_clear_error(handlers, photo_path):
    with pytest.raises(gr.Error, match="Caption an image first"):
        run(handlers.redecode(None, 1, 5))
    first = run(handlers.caption(photo_path, strategy="greedy"))
    state, cache = first[-1][3], first[-1][4]
    with pytest.raises(gr.Error, match="Pick one of this step's words"):
        run(handlers.redecode(state, 1, None, cache=cache))
    with pytest.raises(gr.Error, match="not among step 1's alternatives"):
        run(handlers.redecode(state, 1, 1, cache=cache))  # <SOS> is never an alternative
    with pytest.raises(gr.Error, match="image changed"):
        run(handlers.redecode(state, 1, state["tokens"][0], cache={"key": "other", "feature": cache["feature"]}))


def test_inspector_before_any_caption_is_empty_not_an_error(handlers):
    slider, prefix, info, alts, words, branch = handlers.inspect(None, 3)
    assert slider.value == 1 and prefix == "" and "Caption an image" in info and alts is None and branch.choices == []


# ---------------------------------------------------------------- bad input


def png_header(w, h):
    """A PNG that declares w x h pixels (no pixel data): enough for a decompression-bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_no_image_is_a_clear_error(handlers):
    with pytest.raises(gr.Error, match="No image yet"):
        run(handlers.caption(None))


def test_cleared_image_just_clears_the_outputs(handlers):
    outs = run(handlers.auto_caption(None, "beam", 3, 8, 5, 1.0, 0, 0.9, 0, None))
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
        run(handlers.caption(str(path)))
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
        run(handlers.caption(photo_path, **kwargs))


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
    assert defaults["temperature"] == 1.0 and defaults["top_k"] == 0 and defaults["top_p"] == 0.9
    assert demo._queue.default_concurrency_limit == 4 and demo._queue.max_size == 64
    assert any("tiny @ test" in str(c.get("props", {}).get("value")) for c in demo.config["components"])


def test_gradio_upload_payloads_are_opened_by_the_handler(handlers, model, photo_path):
    """The decoding events get Gradio's undecoded FileData dict (preprocess=False), or a data: URL."""
    import base64

    want = caption(model, photo_path, strategy="greedy", max_len=model.config.max_len)
    payload = {"path": photo_path, "url": None, "orig_name": "photo.jpg", "meta": {"_type": "gradio.FileData"}}
    assert run(handlers.caption(payload, strategy="greedy"))[-1][0] == want
    data = base64.b64encode(open(photo_path, "rb").read()).decode()
    assert run(handlers.caption({"path": None, "url": "data:image/jpeg;base64," + data}, strategy="greedy"))[-1][0] == want
    with pytest.raises(gr.Error, match="not an image file"):
        run(handlers.caption({"path": None, "url": "data:image/jpeg;base64," + base64.b64encode(b"nope").decode()}))
