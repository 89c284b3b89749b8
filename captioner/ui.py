"""The Gradio app: handlers and layout (app.py only parses arguments, loads the model and launches).

One model is loaded at start-up and shared by every user; everything per user lives in two gr.State
values of that user's session: an ImageCache (the last image's encoder output, so re-decoding with other
settings or branching never re-runs the CNN) and the finished Decoding (decode's own Step records) that the
inspector reads. Decoding settings are one GenerationConfig, built from the controls by field name.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
import torch

from .decode import Step, encode, stream
from .generation import STRATEGIES, GenerationConfig
from .model import ImageFeatures
from .preprocess import ImageError, open_image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

CONCURRENCY = 4  # decodes running at once (shared by /caption, auto-caption and /redecode)
MAX_QUEUE = 64  # requests waiting beyond that are refused with "queue is full"
MAX_FILE_SIZE = "20mb"  # uploads above this are refused before they reach a handler
WORD_DELAY = 0.04  # seconds between streamed words: a word decodes in a few ms, so unpaced the caption lands at once

TABLE_HEADERS = ["#", "word", "p", "p(<EOS>)", "alternatives (p)"]
CONFIDENCE = {  # HighlightedText categories of per-word probability, most confident first
    "confident (≥ 50%)": (0.5, "#86efac"),
    "unsure (20–50%)": (0.2, "#fde68a"),
    "guess (< 20%)": (0.0, "#fca5a5"),
}
INSPECTOR_EMPTY = "Caption an image, then step through its decoding here."

CSS = """
#title { margin-bottom: 0; }
#caption textarea { font-size: 1.35rem !important; line-height: 1.5 !important; font-weight: 500; }
#inspector { margin-top: 1.2rem; }
#step-nav { align-items: center; }
#step-nav button { max-width: 7rem; }
"""


def launch_options() -> dict[str, Any]:
    """Keyword arguments for demo.launch() shared by app.py and the tests (Gradio 6: theme and css live here)."""
    return dict(theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="sky"), css=CSS, max_file_size=MAX_FILE_SIZE, show_error=False)


def configure_torch(threads: int | None = None) -> int:
    """Intra-op threads for inference: by default half the cores (at least 1), since up to CONCURRENCY
    requests run side by side and an oversubscribed CPU serves everyone more slowly."""
    n = threads or max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(n)
    return n


def example_paths() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return [str(p) for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]


# ----------------------------------------------------------------------------------------------------
# What a session keeps (in gr.State): the last image's features, and the finished decode the inspector reads


@dataclass(frozen=True)
class ImageCache:
    """The last image of a session and its encoder output: re-decoding or branching never re-runs the CNN."""

    key: str  # sha256 of the image's bytes (or pixels)
    features: ImageFeatures  # batch of 1


@dataclass(frozen=True)
class Decoding:
    """A finished decode: the final caption's records, and how it was made."""

    steps: tuple[Step, ...]  # one record per word of the final caption
    stop: str  # "eos" or "max_len"
    settings: GenerationConfig
    prefix: tuple[int, ...]  # forced first words (a branch), else ()
    focus: int  # the step the inspector opens at (0-based): the first, or where a branch was made
    image_key: str  # ImageCache.key of the image it describes

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.steps[-1].tokens

    @property
    def text(self) -> str:
        return self.steps[-1].text


# ----------------------------------------------------------------------------------------------------
# Views of the decoder's records


def top_words(step: Step) -> dict[str, float]:
    """A step's alternatives as gr.Label data: word -> probability."""
    return {a.word: a.prob for a in step.alternatives}


def table_row(step: Step) -> list:
    alts = ", ".join(f"{a.word} {a.prob:.0%}" for a in step.alternatives)
    return [step.t + 1, step.word, f"{step.prob:.1%}", f"{step.eos_prob:.1%}", alts]


def history_table(steps: Sequence[Step]) -> dict:
    return {"headers": TABLE_HEADERS, "data": [table_row(s) for s in steps]}


def confidence_of(prob: float) -> str:
    for name, (low, _) in CONFIDENCE.items():
        if prob >= low:
            return name
    return name


def highlighted(steps: Sequence[Step]) -> list[tuple[str, str | None]]:
    """The caption as HighlightedText data: each word tagged with its confidence, spaces untagged."""
    out: list[tuple[str, str | None]] = []
    prev = ""
    for s in steps:
        piece = s.text[len(prev):] if s.text.startswith(prev) else " " + s.word
        prev = s.text
        stripped = piece.lstrip(" ")
        if len(stripped) < len(piece):
            out.append((piece[: len(piece) - len(stripped)], None))
        out.append((stripped, confidence_of(s.prob)))
    return out


# ----------------------------------------------------------------------------------------------------
# Handlers


def image_source(image):
    """What the image input hands a handler -> (something open_image reads, a file path or None).

    The decoding events run with preprocess=False, so Gradio passes the upload as its FileData dict
    without decoding it: plain gr.Image would open it with PIL first, and a text file named .jpg would fail
    there with an unhelpful error instead of captioner's clear ImageError message. Paths and PIL images
    (direct calls, tests) pass through.
    """
    if isinstance(image, dict):
        url, path = image.get("url") or "", image.get("path")
        if url.startswith("data:"):  # base64 data sent by an API client
            import base64

            try:
                return base64.b64decode(url.split(",", 1)[1], validate=False), None
            except (IndexError, ValueError):
                raise gr.Error("the image data sent could not be decoded; send a JPEG, PNG, WebP or GIF file", print_exception=False) from None
        image = path
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image), os.fspath(image)
    return image, None


def _clear_error(e: Exception, path: str | None = None) -> gr.Error:
    msg = str(e)
    if path:  # name the file the user chose, not Gradio's temporary path
        msg = msg.replace(path, os.path.basename(path))
    return gr.Error(msg, title="Cannot caption this image", print_exception=False)


def settings_from(values: dict[str, Any], default_max_len: int) -> GenerationConfig:
    """The app's control values (any of them None or missing from an API client) -> a GenerationConfig.
    Sliders send floats: integer settings are rounded; a negative or empty seed means a new one each run."""
    defaults = GenerationConfig(max_len=default_max_len)
    kinds = {f.name: f.type for f in fields(GenerationConfig)}
    out: dict[str, Any] = {}
    try:
        for name, value in values.items():
            if value is None or value == "":
                continue
            if name == "seed":
                out[name] = None if int(value) < 0 else int(value)
            elif kinds[name].startswith("int"):
                out[name] = int(round(float(value)))
            elif kinds[name] == "float":
                out[name] = float(value)
            else:
                out[name] = value
        return GenerationConfig.make(defaults, **out)
    except (TypeError, ValueError) as e:
        raise gr.Error(f"bad decoding setting: {e}", title="Bad decoding setting", print_exception=False) from None


class Handlers:
    """The app's event handlers around one shared, read-only model. Per-user data only passes through
    arguments and return values (gr.State), never through attributes, so nothing leaks between users."""

    def __init__(self, model, *, word_delay: float = WORD_DELAY):
        self.model = model
        self.word_delay = word_delay

    def settings(self, **values) -> GenerationConfig:
        return settings_from(values, self.model.config.max_len)

    # --- the image feature cache (per session, in a gr.State) ---

    def features(self, image, cache: ImageCache | None) -> ImageCache:
        """The ImageCache of `image` (an upload, a path or a PIL image): `cache` itself when it holds that image."""
        if image is None:
            raise gr.Error("No image yet: drop a photo on the image box, upload or paste one, or pick an example.",
                           title="No image", print_exception=False)
        image, path = image_source(image)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    key = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                raise gr.Error(f"{os.path.basename(path)}: cannot read the uploaded file ({e.strerror}); upload it again",
                               print_exception=False) from None
        elif isinstance(image, (bytes, bytearray)):
            key = hashlib.sha256(image).hexdigest()
        else:
            key = "pil:" + hashlib.sha256(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()
        if cache and cache.key == key:
            return cache
        try:
            img = open_image(image)  # decoded once: encode() preprocesses this PIL image as it is
        except ImageError as e:
            raise _clear_error(e, path) from None
        with torch.inference_mode():
            return ImageCache(key, encode(self.model, img))

    # --- decoding, streamed ---

    def _decode(self, cache: ImageCache, settings: GenerationConfig, prefix: tuple[int, ...], focus: int) -> Iterator[tuple]:
        """Yield (caption, top words, table, decoding, cache) once per Step of decode.stream; the last yield
        carries the finished Decoding for the inspector."""
        rows: list[Step] = []
        last = 0.0
        try:
            for step in stream(self.model, config=settings, features=cache.features, prefix=prefix):
                decoding = None
                if step.stop is None:
                    rows.append(step)
                    table = history_table(rows)
                else:
                    steps = step.caption_steps()  # beam search: the winner's records, which the stream may not have shown
                    decoding = Decoding(steps, step.stop, settings, prefix, min(focus, len(steps) - 1), cache.key)
                    table = history_table(steps)
                if self.word_delay:
                    wait = self.word_delay - (time.monotonic() - last)
                    if wait > 0 and rows:
                        time.sleep(wait)
                    last = time.monotonic()
                yield step.text, top_words(step), table, decoding, cache
        except ValueError as e:  # a setting out of range (decode.stream says which and why)
            raise gr.Error(str(e), title="Bad decoding setting", print_exception=False) from None

    def caption(self, image, settings: GenerationConfig | None = None, cache: ImageCache | None = None) -> Iterator[tuple]:
        """/caption: stream the caption of `image` word by word."""
        settings = settings or self.settings()
        yield from self._decode(self.features(image, cache), settings, (), 0)

    def auto_caption(self, image, settings: GenerationConfig | None = None, cache: ImageCache | None = None) -> Iterator[tuple]:
        """A new image (upload, paste, webcam, example): caption it; a cleared image clears the outputs."""
        if image is None:
            yield "", None, history_table([]), None, cache
            return
        yield from self.caption(image, settings, cache)

    def redecode(self, decoding: Decoding | None, step_number, choice, settings: GenerationConfig | None = None,
                 cache: ImageCache | None = None) -> Iterator[tuple]:
        """Branch: force the inspected step's word to `choice` (a token id), keep the words before it, and
        decode the rest again from the cached image features."""
        if not decoding:
            raise gr.Error("Caption an image first, then pick a step and a word to branch from.", print_exception=False)
        if not cache or cache.key != decoding.image_key:
            raise gr.Error("The image changed since this caption; caption it again before branching.", print_exception=False)
        if choice is None or choice == "":
            raise gr.Error("Pick one of this step's words first, then re-decode.", title="No word picked", print_exception=False)
        t = self._index(decoding, step_number)
        if int(choice) not in {a.token for a in decoding.steps[t].alternatives}:
            raise gr.Error(f"word id {choice} is not among step {t + 1}'s alternatives", print_exception=False)
        settings = settings or self.settings()
        prefix = (*decoding.tokens[:t], int(choice))
        settings = replace(settings, max_len=max(settings.resolved_max_len(self.model.config.max_len), len(prefix)))
        yield from self._decode(cache, settings, prefix, t)

    # --- the inspector ---

    @staticmethod
    def _index(decoding: Decoding, step_number) -> int:
        n = len(decoding.steps)
        try:
            t = int(round(float(step_number))) - 1
        except (TypeError, ValueError):
            t = 0
        return min(max(t, 0), n - 1)

    def inspect(self, decoding: Decoding | None, step_number=1) -> tuple:
        """The inspector at step `step_number` (1-based): slider, prefix, chosen word and <EOS> probability,
        alternatives, confidence-coloured caption, branch choices."""
        if not decoding:
            return (gr.Slider(minimum=1, maximum=2, value=1, interactive=False), "", INSPECTOR_EMPTY, None, None,
                    gr.Radio(choices=[], value=None))
        steps = decoding.steps
        t = self._index(decoding, step_number)
        s = steps[t]
        prefix = steps[t - 1].text if t else ""
        ended = {"eos": "the model ended it (`<EOS>` won)", "max_len": "it reached the maximum length"}.get(decoding.stop, "")
        info = (
            f"**Step {t + 1} of {len(steps)}** · chose **{s.word}** with p = {s.prob:.1%} · "
            f"p(`<EOS>`) here = {s.eos_prob:.1%} (the chance the model ends the caption instead)"
        )
        if t == len(steps) - 1 and ended:
            info += f"  \nThe caption stops after this word: {ended}."
        if decoding.prefix:
            info += f"  \nBranched: word {len(decoding.prefix)} was forced to **{steps[len(decoding.prefix) - 1].word}**."
        choices = [(f"{a.word}  ({a.prob:.0%})", a.token) for a in s.alternatives]
        return (
            gr.Slider(minimum=1, maximum=max(len(steps), 2), value=t + 1, step=1, interactive=len(steps) > 1),
            prefix,
            info,
            top_words(s),
            highlighted(steps),
            gr.Radio(choices=choices, value=None),
        )

    def inspect_focus(self, decoding: Decoding | None) -> tuple:
        """After a decode: the inspector at its focus (step 1, or the step a branch was made at)."""
        return self.inspect(decoding, (decoding.focus if decoding else 0) + 1)

    def move(self, decoding: Decoding | None, step_number, delta: int) -> tuple:
        return self.inspect(decoding, (step_number or 1) + delta)


def with_settings(fn: Callable, settings_of: Callable[..., GenerationConfig], before: Sequence[str],
                  controls: dict[str, Any], after: Sequence[str]) -> Callable:
    """A Gradio handler for fn(*before, settings, *after) whose inputs are (*before, *control values, *after).
    Its signature names every setting, with the control's value as default, so the API documents them."""
    names = list(controls)

    def handler(*args):
        head, values, tail = args[: len(before)], args[len(before) : len(before) + len(names)], args[len(before) + len(names) :]
        yield from fn(*head, settings_of(**dict(zip(names, values))), *tail)

    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in before]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=getattr(c, "value", None)) for n, c in controls.items()]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in after]
    handler.__signature__ = inspect.Signature(params)
    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


# ----------------------------------------------------------------------------------------------------
# Layout


def model_markdown(model, model_label: str) -> str:
    c = model.config
    vocab = len(model.vocab) if model.vocab is not None else c.vocab_size
    return (
        f"**Model:** `{model_label}` · vocabulary {vocab:,} words · `{c.backbone}` encoder + "
        f"{c.num_layers}-layer LSTM ({c.hidden_size}) · up to {c.max_len} words"
    )


def build_demo(model, model_label: str, *, word_delay: float = WORD_DELAY) -> gr.Blocks:
    """The whole app around one loaded model, with its queue set up; launch it with demo.launch(**launch_options())."""
    h = Handlers(model, word_delay=word_delay)
    default_max_len = model.config.max_len
    with gr.Blocks(title="Captioner: watch a CNN+LSTM caption a photo") as demo:
        gr.Markdown("# Captioner", elem_id="title")
        gr.Markdown(
            "Drop a photo and a CNN+LSTM (Show and Tell) writes its caption word by word; then step through "
            "its decoding, see which words it weighed at each step, and branch from any word."
        )
        cache = gr.State(None)  # ImageCache: this session's last image and its encoder output
        decode_state = gr.State(None)  # Decoding: the finished decode the inspector reads
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                 placeholder="Drop a photo here, click to upload, or paste one\n"
                                             "Webcam: take a photo, then press Caption", height=340, elem_id="photo")
                caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                paths = example_paths()
                examples = None
                if paths:
                    examples = gr.Examples(examples=[[p] for p in paths], inputs=[image], label="Examples (public-domain and CC0 photos)",
                                           examples_per_page=8, cache_examples=False)
                with gr.Accordion("Decoding settings", open=False):
                    d = GenerationConfig()  # every default comes from the one settings object
                    strategy = gr.Radio(list(STRATEGIES), value=d.strategy, label="Strategy",
                                        info="greedy: most likely word each step · beam: keeps several candidate captions · sample: random, varied")
                    with gr.Row():
                        beam_size = gr.Slider(1, 10, value=d.beam_size, step=1, label="Beam size", info="beam search")
                        max_len = gr.Slider(1, max(50, default_max_len), value=default_max_len, step=1, label="Max length (words)")
                    num_alternatives = gr.Slider(1, 10, value=d.num_alternatives, step=1, label="Alternatives shown per step")
                    with gr.Row():
                        temperature = gr.Slider(0.1, 2.0, value=d.temperature, step=0.05, label="Temperature", info="sampling")
                        top_k = gr.Slider(0, 100, value=d.top_k, step=1, label="Top-k", info="sampling; 0 = all words")
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p", info="sampling (nucleus)")
                        seed = gr.Number(value=-1 if d.seed is None else d.seed, precision=0, label="Seed", info="sampling; -1 = new each run")
                gr.Markdown(model_markdown(model, model_label), elem_id="model-info")
            with gr.Column(scale=6):
                caption = gr.Textbox(label="Caption", lines=2, interactive=False, buttons=["copy"], elem_id="caption",
                                     placeholder="The caption appears here, word by word.")
                current = gr.Label(label="This step: the words the model weighed", show_heading=False, elem_id="current-step")
                table = gr.Dataframe(value=history_table([]), label="Decoding history: each word, its probability, the chance of "
                                     "ending there, and the words it beat", interactive=False, wrap=True, max_height=440,
                                     column_widths=["7%", "15%", "11%", "14%", "53%"], elem_id="history")

        with gr.Column(elem_id="inspector"):
            gr.Markdown("## Step-by-step inspector\nEach word coloured by how sure the model was; pick a step to see what "
                        "it weighed there, then pick another word and re-decode from that point.")
            confidence = gr.HighlightedText(label="Caption by confidence", color_map={k: v[1] for k, v in CONFIDENCE.items()},
                                            show_legend=True, show_inline_category=False, combine_adjacent=False, elem_id="confidence")
            with gr.Row(elem_id="step-nav"):
                prev_btn = gr.Button("◀ Prev", size="sm", elem_id="prev-step", scale=0, min_width=90)
                step = gr.Slider(1, 2, value=1, step=1, label="Step", interactive=False, buttons=[], elem_id="step-slider", scale=1)
                next_btn = gr.Button("Next ▶", size="sm", elem_id="next-step", scale=0, min_width=90)
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    prefix = gr.Textbox(label="Prefix so far (the words before this step)", interactive=False, elem_id="prefix",
                                        placeholder="(the start of the caption)")
                    step_info = gr.Markdown(INSPECTOR_EMPTY, elem_id="step-info")
                with gr.Column(scale=3):
                    step_alts = gr.Label(label="Alternatives at this step", show_heading=False, elem_id="step-alternatives")
                with gr.Column(scale=3):
                    branch = gr.Radio(choices=[], label="Branch: use this word here instead", elem_id="branch")
                    redecode_btn = gr.Button("Re-decode from here", variant="primary", elem_id="redecode-btn")

        # Keyed by GenerationConfig's field names: a new decoding setting is its field plus its control here.
        controls = dict(strategy=strategy, beam_size=beam_size, max_len=max_len, num_alternatives=num_alternatives,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        caption_fn = with_settings(h.caption, h.settings, ["image"], controls, ["cache"])
        auto_fn = with_settings(h.auto_caption, h.settings, ["image"], controls, ["cache"])
        redecode_fn = with_settings(h.redecode, h.settings, ["decoding", "step_number", "choice"], controls, ["cache"])
        streamed = [caption, current, table, decode_state, cache]
        inspector = [step, prefix, step_info, step_alts, confidence, branch]
        # preprocess=False: the handlers get the upload undecoded and open it themselves (see image_source)
        common = dict(concurrency_id="decode", show_progress="minimal", preprocess=False)

        caption_btn.click(caption_fn, [image, *controls.values(), cache], streamed, api_name="caption", **common).success(
            h.inspect_focus, [decode_state], inspector, api_visibility="private")
        # A new photo captions itself: on upload, drop or paste, and on picking an example. (Not on .change:
        # Gradio's frontend fires it twice when a photo replaces another, which would run two decodes. A webcam
        # snapshot only fires .change, so there the Caption button does it.)
        auto = dict(fn=auto_fn, inputs=[image, *controls.values(), cache], outputs=streamed, api_visibility="private",
                    trigger_mode="always_last", **common)
        image.upload(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        image.clear(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")  # clears the outputs
        if examples is not None:
            examples.load_input_event.then(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        # Branching reads choices the inspector put in this page's session: a page action, not an API endpoint.
        redecode_btn.click(redecode_fn, [decode_state, step, branch, *controls.values(), cache], streamed, api_visibility="private",
                           **common).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        step.release(h.inspect, [decode_state, step], inspector, api_visibility="private", trigger_mode="always_last")
        prev_btn.click(lambda d, s: h.move(d, s, -1), [decode_state, step], inspector, api_visibility="private")
        next_btn.click(lambda d, s: h.move(d, s, +1), [decode_state, step], inspector, api_visibility="private")

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE)
    return demo
