"""The Gradio app: handlers and layout (app.py only parses arguments, loads the model and launches).

One model is loaded at start-up and shared by every user; everything per user lives in two gr.State
values of that user's session: the image feature cache ({"key", "feature"}: the encoder's (1, E) output
for the last image, so re-decoding with other settings or branching never re-runs the encoder) and the
finished decode (plain JSON-able dicts: tokens, per-step records, settings) that the inspector reads.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import torch

from .decode import STRATEGIES, Step, encode_image, stream
from .preprocess import ImageError, open_image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

CONCURRENCY = 4  # decodes running at once (shared by /caption, auto-caption and /redecode)
MAX_QUEUE = 64  # requests waiting beyond that are refused with "queue is full"
MAX_FILE_SIZE = "20mb"  # uploads above this are refused before they reach a handler
# Greedy: the bundled model's best decoding on the dev split (CIDEr-D 0.460 against 0.451 for beam 3; self-critical
# training tunes the model for it), and what it streams is exactly the caption it keeps.
DEFAULT_STRATEGY = "greedy"
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
# Plain-data views of the decoder's records


def step_to_dict(s: Step) -> dict:
    return {
        "t": s.t,
        "token": s.token,
        "word": s.word,
        "prob": s.prob,
        "logprob": s.logprob,
        "eos_prob": s.eos_prob,
        "text": s.text,
        "alternatives": [{"token": a.token, "word": a.word, "prob": a.prob} for a in s.alternatives],
    }


def _alts(step: dict | Step) -> list[tuple[int, str, float]]:
    alts = step["alternatives"] if isinstance(step, dict) else [a.__dict__ for a in step.alternatives]
    return [(a["token"], a["word"], a["prob"]) for a in alts]


def top_words(step: dict | Step) -> dict[str, float]:
    """A step's alternatives as gr.Label data: word -> probability."""
    return {word: prob for _, word, prob in _alts(step)}


def table_row(step: dict) -> list:
    alts = ", ".join(f"{w} {p:.0%}" for _, w, p in _alts(step))
    return [step["t"] + 1, step["word"], f"{step['prob']:.1%}", f"{step['eos_prob']:.1%}", alts]


def history_table(steps: list[dict]) -> dict:
    return {"headers": TABLE_HEADERS, "data": [table_row(s) for s in steps]}


def confidence_of(prob: float) -> str:
    for name, (low, _) in CONFIDENCE.items():
        if prob >= low:
            return name
    return name


def highlighted(steps: list[dict]) -> list[tuple[str, str | None]]:
    """The caption as HighlightedText data: each word tagged with its confidence, spaces untagged."""
    out: list[tuple[str, str | None]] = []
    prev = ""
    for s in steps:
        piece = s["text"][len(prev):] if s["text"].startswith(prev) else " " + s["word"]
        prev = s["text"]
        stripped = piece.lstrip(" ")
        if len(stripped) < len(piece):
            out.append((piece[: len(piece) - len(stripped)], None))
        out.append((stripped, confidence_of(s["prob"])))
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


def _settings(strategy, beam_size, max_len, num_alternatives, temperature, top_k, top_p, seed, default_max_len) -> dict:
    """Controls (possibly None from an API client) to keyword arguments of decode.stream."""
    try:
        seed = None if seed is None or seed == "" or int(seed) < 0 else int(seed)
        return dict(
            strategy=strategy or DEFAULT_STRATEGY,
            beam_size=int(beam_size if beam_size is not None else 3),
            max_len=int(max_len if max_len is not None else default_max_len),
            num_alternatives=int(num_alternatives if num_alternatives is not None else 5),
            temperature=float(temperature if temperature is not None else 1.0),
            top_k=int(top_k or 0),
            top_p=float(top_p if top_p is not None else 0.9),
            seed=seed,
        )
    except (TypeError, ValueError) as e:
        raise gr.Error(f"bad decoding setting: {e}", print_exception=False) from None


class Handlers:
    """The app's event handlers around one shared, read-only model. Per-user data only passes through
    arguments and return values (gr.State), never through attributes, so nothing leaks between users."""

    def __init__(self, model, *, word_delay: float = WORD_DELAY):
        self.model = model
        self.word_delay = word_delay

    # --- the image feature cache (per session, in a gr.State) ---

    def feature(self, image, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """The (1, E) encoder output for `image` (a path, or a PIL image), from `cache` when it holds it."""
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
        if cache and cache.get("key") == key:
            return cache["feature"], cache
        try:
            img = open_image(image)
        except ImageError as e:
            raise _clear_error(e, path) from None
        with torch.inference_mode():
            feature = encode_image(self.model, img).detach().clone()  # (1, E)
        return feature, {"key": key, "feature": feature}

    # --- decoding, streamed ---

    def _decode(self, feature, settings: dict, prefix: list[int], focus: int, image_key: str, cache: dict) -> Iterator[tuple]:
        """Yield (caption, top words, table, decode state, cache) once per Step of decode.stream; the last
        yield carries the finished decode (its per-step records) for the inspector."""
        rows: list[dict] = []
        last = 0.0
        try:
            for step in stream(self.model, feature, prefix=prefix, **settings):
                if step.stop is None:
                    rows.append(step_to_dict(step))
                    state = None
                    table = history_table(rows)
                else:
                    state = self._finish(feature, step, settings, prefix, focus, image_key, rows)
                    table = history_table(state["steps"])
                if self.word_delay:
                    wait = self.word_delay - (time.monotonic() - last)
                    if wait > 0 and rows:
                        time.sleep(wait)
                    last = time.monotonic()
                yield step.text, top_words(step), table, state, cache
        except ValueError as e:  # a setting out of range (decode.stream says which and why)
            raise gr.Error(str(e), title="Bad decoding setting", print_exception=False) from None

    def _finish(self, feature, final: Step, settings, prefix, focus, image_key, rows) -> dict:
        tokens = list(final.tokens)
        if settings["strategy"] == "beam":
            # Beam search streams whichever hypothesis leads at each step; the inspector needs the
            # records of the one that won: re-run the decoder along its words (cheap: no encoder).
            steps = [step_to_dict(s) for s in stream(self.model, feature, strategy="greedy", prefix=tokens, max_len=len(tokens),
                                                      num_alternatives=settings["num_alternatives"])]
        else:
            steps = rows + [step_to_dict(final)]
        return {
            "tokens": tokens,
            "text": final.text,
            "stop": final.stop,
            "steps": steps,
            "settings": dict(settings),
            "prefix": list(prefix),
            "focus": min(focus, len(steps) - 1),
            "image_key": image_key,
        }

    def caption(self, image, strategy=DEFAULT_STRATEGY, beam_size=3, max_len=None, num_alternatives=5, temperature=1.0,
                top_k=0, top_p=0.9, seed=0, cache=None):
        """/caption: stream the caption of `image` word by word."""
        settings = _settings(strategy, beam_size, max_len, num_alternatives, temperature, top_k, top_p, seed, self.model.config.max_len)
        feature, cache = self.feature(image, cache)
        yield from self._decode(feature, settings, [], 0, cache["key"], cache)

    def auto_caption(self, image, *args):
        """A new image (upload, paste, webcam, example): caption it; a cleared image clears the outputs."""
        if image is None:
            yield "", None, history_table([]), None, args[-1]
            return
        yield from self.caption(image, *args)

    def redecode(self, decode: dict | None, step_number, choice, strategy=DEFAULT_STRATEGY, beam_size=3, max_len=None, num_alternatives=5,
                 temperature=1.0, top_k=0, top_p=0.9, seed=0, cache=None):
        """Branch: force the inspected step's word to `choice` (a token id), keep the words before it, and
        decode the rest again from the cached image feature."""
        if not decode or not decode.get("steps"):
            raise gr.Error("Caption an image first, then pick a step and a word to branch from.", print_exception=False)
        if not cache or cache.get("key") != decode.get("image_key"):
            raise gr.Error("The image changed since this caption; caption it again before branching.", print_exception=False)
        if choice is None or choice == "":
            raise gr.Error("Pick one of this step's words first, then re-decode.", title="No word picked", print_exception=False)
        t = self._index(decode, step_number)
        step = decode["steps"][t]
        allowed = {tok for tok, _, _ in _alts(step)}
        if int(choice) not in allowed:
            raise gr.Error(f"word id {choice} is not among step {t + 1}'s alternatives", print_exception=False)
        settings = _settings(strategy, beam_size, max_len, num_alternatives, temperature, top_k, top_p, seed, self.model.config.max_len)
        prefix = list(decode["tokens"][:t]) + [int(choice)]
        settings["max_len"] = max(settings["max_len"], len(prefix))
        yield from self._decode(cache["feature"], settings, prefix, t, cache["key"], cache)

    # --- the inspector ---

    @staticmethod
    def _index(decode: dict, step_number) -> int:
        n = len(decode["steps"])
        try:
            t = int(round(float(step_number))) - 1
        except (TypeError, ValueError):
            t = 0
        return min(max(t, 0), n - 1)

    def inspect(self, decode: dict | None, step_number=1) -> tuple:
        """The inspector at step `step_number` (1-based): slider, prefix, chosen word and <EOS> probability,
        alternatives, confidence-coloured caption, branch choices."""
        if not decode or not decode.get("steps"):
            return (gr.Slider(minimum=1, maximum=2, value=1, interactive=False), "", INSPECTOR_EMPTY, None, None,
                    gr.Radio(choices=[], value=None))
        steps = decode["steps"]
        t = self._index(decode, step_number)
        s = steps[t]
        prefix = steps[t - 1]["text"] if t else ""
        ended = {"eos": "the model ended it (`<EOS>` won)", "max_len": "it reached the maximum length"}.get(decode.get("stop"), "")
        info = (
            f"**Step {t + 1} of {len(steps)}** · chose **{s['word']}** with p = {s['prob']:.1%} · "
            f"p(`<EOS>`) here = {s['eos_prob']:.1%} (the chance the model ends the caption instead)"
        )
        if t == len(steps) - 1 and ended:
            info += f"  \nThe caption stops after this word: {ended}."
        if decode.get("prefix"):
            info += f"  \nBranched: word {len(decode['prefix'])} was forced to **{steps[len(decode['prefix']) - 1]['word']}**."
        choices = [(f"{w}  ({p:.0%})", tok) for tok, w, p in _alts(s)]
        return (
            gr.Slider(minimum=1, maximum=max(len(steps), 2), value=t + 1, step=1, interactive=len(steps) > 1),
            prefix,
            info,
            top_words(s),
            highlighted(steps),
            gr.Radio(choices=choices, value=None),
        )

    def inspect_focus(self, decode: dict | None) -> tuple:
        """After a decode: the inspector at its focus (step 1, or the step a branch was made at)."""
        return self.inspect(decode, (decode or {}).get("focus", 0) + 1)

    def move(self, decode: dict | None, step_number, delta: int) -> tuple:
        return self.inspect(decode, (step_number or 1) + delta)


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
        cache = gr.State(None)  # {"key": sha256 of the image, "feature": (1, E) tensor}: this session's encoder output
        decode_state = gr.State(None)  # the finished decode, JSON-able (see Handlers._finish)
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
                    strategy = gr.Radio(list(STRATEGIES), value=DEFAULT_STRATEGY, label="Strategy",
                                        info="greedy: most likely word each step · beam: keeps several candidate captions · sample: random, varied")
                    with gr.Row():
                        beam_size = gr.Slider(1, 10, value=3, step=1, label="Beam size", info="beam search")
                        max_len = gr.Slider(1, max(50, default_max_len), value=default_max_len, step=1, label="Max length (words)")
                    num_alternatives = gr.Slider(1, 10, value=5, step=1, label="Alternatives shown per step")
                    with gr.Row():
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature", info="sampling")
                        top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k", info="sampling; 0 = all words")
                    with gr.Row():
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", info="sampling (nucleus)")
                        seed = gr.Number(value=0, precision=0, label="Seed", info="sampling; -1 = new each run")
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

        controls = [strategy, beam_size, max_len, num_alternatives, temperature, top_k, top_p, seed]
        streamed = [caption, current, table, decode_state, cache]
        inspector = [step, prefix, step_info, step_alts, confidence, branch]
        # preprocess=False: the handlers get the upload undecoded and open it themselves (see image_source)
        common = dict(concurrency_id="decode", show_progress="minimal", preprocess=False)

        caption_btn.click(h.caption, [image, *controls, cache], streamed, api_name="caption", **common).success(
            h.inspect_focus, [decode_state], inspector, api_visibility="private")
        # A new photo captions itself: on upload, drop or paste, and on picking an example. (Not on .change:
        # Gradio's frontend fires it twice when a photo replaces another, which would run two decodes. A webcam
        # snapshot only fires .change, so there the Caption button does it.)
        auto = dict(fn=h.auto_caption, inputs=[image, *controls, cache], outputs=streamed, api_visibility="private",
                    trigger_mode="always_last", **common)
        image.upload(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        image.clear(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")  # clears the outputs
        if examples is not None:
            examples.load_input_event.then(**auto).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        # Branching reads choices the inspector put in this page's session: a page action, not an API endpoint.
        redecode_btn.click(h.redecode, [decode_state, step, branch, *controls, cache], streamed, api_visibility="private",
                           **common).success(h.inspect_focus, [decode_state], inspector, api_visibility="private")
        step.release(h.inspect, [decode_state, step], inspector, api_visibility="private", trigger_mode="always_last")
        prev_btn.click(lambda d, s: h.move(d, s, -1), [decode_state, step], inspector, api_visibility="private")
        next_btn.click(lambda d, s: h.move(d, s, +1), [decode_state, step], inspector, api_visibility="private")

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE)
    return demo
