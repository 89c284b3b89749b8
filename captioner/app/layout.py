"""The page: Gradio Blocks and the wiring of their events to the handlers, nothing else.

launch_options() is what demo.launch() takes (app.py and the tests); build_demo() is the whole app around one model.
Every decoding setting's control is keyed by GenerationConfig's field name (the handlers take them as keyword
arguments), and every slider's range is the served range of GenerationConfig.LIMITS (`slider_range`).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from .. import tree_view
from ..generation import LIMITS, STRATEGIES
from . import limits
from .errors import ServedBlocks
from .handlers import APP_DEFAULTS, WORD_DELAY, Handlers
from .limits import ClientLimits
from .middleware import RequestLimits
from .session import Decoding
from .views import CONFIDENCE, FILES_HEADERS, HEATMAP_LABEL, INSPECTOR_EMPTY, STEP_HEADING, Inspector, cleared, history_table, on_page

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# What the bundled model learned from, and what that means for other photos (the model card says the same); shown
# under the caption, where a wrong subject is read. The second part only where the CNN's classes are shown.
TRAINING_NOTE = ("The bundled model learned to caption from Flickr8k (about 8,000 photos, mostly people, dogs and outdoor "
                 "scenes), so it often names other subjects wrongly")
TRAINING_NOTE_CNN = ("; *The CNN sees* names what its image classifier recognises, and the *guided* strategy (the "
                     "default; see Decoding settings) makes the caption name what the classifier is sure of")
PHONE = "640px"  # at this width and below the two columns stack: the caption comes right after the photo
STATIC = Path(__file__).resolve().parents[1] / "static"  # the page's style and scripts


def asset(name: str) -> str:
    """A file of captioner/static/, with the phone width filled in (comment lines of scripts dropped)."""
    text = (STATIC / name).read_text(encoding="utf-8").replace("%(phone)s", PHONE)
    return "\n".join(line for line in text.splitlines() if not line.startswith("//"))


def example_descriptions() -> dict[str, str]:
    """file name -> what the example photo shows, from the table in examples/README.md ({} if it is missing)."""
    try:
        text = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    except OSError:
        return {}
    return {m[1]: m[2].replace("`", "") for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", text, re.M)}


def example_paths() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return [str(p) for p in sorted(EXAMPLES_DIR.iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]


def launch_options() -> dict[str, Any]:
    """Keyword arguments for demo.launch() shared by app.py and the tests (Gradio 6: theme, css and js live here)."""
    js = "() => (" + asset("app.js").strip() + ")(" + json.dumps(example_descriptions()) + ")"
    middleware = Middleware(RequestLimits, max_body=limits.MAX_REQUEST_BYTES, max_upload=limits.MAX_UPLOAD_BYTES,
                            max_files=limits.MAX_FILES, idle_timeout=limits.UPLOAD_IDLE_TIMEOUT)
    return dict(theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="sky"), css=asset("app.css") + "\n" + asset("tree.css"), js=js,
                max_file_size=limits.MAX_FILE_SIZE, show_error=False, state_session_capacity=limits.SESSIONS,
                app_kwargs={"middleware": [middleware]})


def model_markdown(model, model_label: str) -> str:
    c = model.config
    vocab = len(model.vocab) if model.vocab is not None else c.vocab_size
    attends = " with soft attention over the CNN's regions" if getattr(model.decoder, "uses_grid", False) else ""
    return (f"**Model:** `{model_label}` · vocabulary {vocab:,} words · `{c.backbone}` encoder + "
            f"{c.num_layers}-layer LSTM ({c.hidden_size}){attends} · up to {c.max_len} words · {getattr(model, 'precision', 'fp32')}")


def slider_range(name: str, step: float, *, low_is_default: bool = False) -> tuple[float, float]:
    """A setting's slider range: its served range in GenerationConfig.LIMITS (what the server enforces), starting
    one step above the low end where that end is excluded (temperature 0 is not a temperature), unless the slider
    sends the low end for the setting's default (`low_is_default`: guide_threshold's 0 is None, calibrated)."""
    limit = LIMITS[name]
    return (limit.low + step if limit.open_low and not low_is_default else limit.low), limit.served


def setting_slider(name: str, step: float, value, *, low_is_default: bool = False, **kw) -> gr.Slider:
    return gr.Slider(*slider_range(name, step, low_is_default=low_is_default), value=value, step=step,
                     **({"precision": 0} if step == 1 else {}), **kw)


def settings_controls(model) -> dict[str, Any]:
    """The "Decoding settings" accordion: every default from APP_DEFAULTS, every range from LIMITS -> the controls
    by GenerationConfig field name (guide_threshold last: API clients that pass settings by position keep working)."""
    d = APP_DEFAULTS
    with gr.Accordion("Decoding settings", open=False, elem_id="settings"):
        strategy = gr.Radio(list(STRATEGIES), value=d.strategy, label="Strategy",
                            info="greedy: most likely word each step · beam: keeps several candidate captions · "
                                 "sample: random, varied · guided: beam search that must use a word for what "
                                 "the CNN is sure of")
        with gr.Row():
            beam_size = setting_slider("beam_size", 1, d.beam_size, label="Beam size", info="beam search and guided")
            low, high = slider_range("max_len", 1)
            max_len = gr.Slider(low, max(high, model.config.max_len), value=model.config.max_len, step=1, precision=0,
                                label="Max length (words)")  # the model's own length is always allowed
        guide_threshold = setting_slider("guide_threshold", 0.05, d.guide_threshold or 0, low_is_default=True, label="Guidance threshold",
                                         info="guided: how sure the CNN must be of a word before the caption must "
                                              "use it; 0 = each word's own, calibrated", elem_id="guide-threshold")
        num_alternatives = setting_slider("num_alternatives", 1, d.num_alternatives, label="Words shown per step")
        with gr.Row():
            temperature = setting_slider("temperature", 0.05, d.temperature, label="Temperature", info="sampling")
            top_k = setting_slider("top_k", 1, d.top_k, label="Top-k", info="sampling; 0 = all words")
        with gr.Row():
            top_p = setting_slider("top_p", 0.05, d.top_p, label="Top-p", info="sampling (nucleus)")
            seed = gr.Number(value=-1 if d.seed is None else d.seed, precision=0, label="Seed", info="sampling; -1 = new each run")
    return dict(strategy=strategy, beam_size=beam_size, max_len=max_len, num_alternatives=num_alternatives,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, guide_threshold=guide_threshold)


def photo_column(model, model_label: str) -> dict[str, Any]:
    """The photo, the Caption button, the examples, the settings and the model's line -> those by name."""
    image = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                     placeholder="Drop a photo here, click to upload, or paste one\n"
                                 "Webcam: take a photo, then press Caption", height=340, elem_id="photo")
    caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-btn")
    paths = example_paths()
    examples = gr.Examples(examples=[[p] for p in paths], inputs=[image], label="Examples (CC0, CC BY 4.0, CC BY-SA 3.0)",
                           examples_per_page=12, cache_examples=False, elem_id="examples") if paths else None
    controls = settings_controls(model)
    gr.Markdown(model_markdown(model, model_label), elem_id="model-info")
    return dict(photo=image, caption_btn=caption_btn, examples=examples, controls=controls)


def caption_column(has_cnn: bool) -> dict[str, Any]:
    """The caption, what is said about it, "This step", the history and the download -> those by name."""
    return dict(
        caption=gr.Textbox(label="Caption", lines=2, interactive=False, buttons=["copy"], elem_id="caption",
                           placeholder="The caption appears here, word by word."),
        # Is the photo like the ones the model learned from, and how sure is the caption (in words)?
        assessment=gr.Markdown("", visible=False, elem_id="assessment"),
        # Why the last request could not be done (an unreadable photo, no word picked), beside the caption.
        status=gr.Markdown("", visible=False, elem_id="status"),
        # What the CNN's own ImageNet classifier sees in the photo (models saved with its head only).
        cnn_sees=gr.Markdown("", visible=has_cnn, elem_id="cnn-labels"),
        training_note=gr.Markdown(TRAINING_NOTE + (TRAINING_NOTE_CNN if has_cnn else "") + ".", elem_id="training-note"),
        heading=gr.Markdown(STEP_HEADING, elem_id="step-heading"),
        current=gr.Label(label="Words", show_label=False, show_heading=False, elem_id="current-step"),
        table=gr.Dataframe(value=history_table([]), label="History", interactive=False, wrap=True, max_height=440,
                           column_widths=["44px", "118px", "70px", "92px", "330px"], elem_id="history"),
        download=gr.Button("Download decoding (JSON)", interactive=False, size="sm", elem_id="download-decoding"),
        download_file=gr.File(visible=False),  # written on the click, then saved by the browser (static/save_download.js)
    )


def inspector_panel(attends: bool) -> dict[str, Any]:
    """The step-by-step inspector and the search tree -> their components by name."""
    p: dict[str, Any] = {}
    with gr.Column(elem_id="inspector"):
        gr.Markdown("## Step-by-step inspector\nEach word coloured by how sure the model was; pick a step to see what "
                    "it weighed there" + (" and where in the photo it looked" if attends else "") +
                    ", then pick another word and re-decode from that point.")
        p["confidence"] = gr.HighlightedText(label="Caption by confidence", color_map={k: v[1] for k, v in CONFIDENCE.items()},
                                             show_legend=True, show_inline_category=False, combine_adjacent=False, elem_id="confidence")
        with gr.Row(elem_id="step-nav"):
            p["prev_btn"] = gr.Button("◀ Prev", size="sm", elem_id="prev-step", scale=0, min_width=70)
            p["slider"] = gr.Slider(1, 2, value=1, step=1, precision=0, label="Step", interactive=False, buttons=[],
                                    elem_id="step-slider", scale=1, min_width=120)
            p["next_btn"] = gr.Button("Next ▶", size="sm", elem_id="next-step", scale=0, min_width=70)
        with gr.Row(equal_height=False):
            # The photo with the selected step's attention over it: only for decoders that attend.
            with gr.Column(scale=3, min_width=240, visible=attends, elem_id="heatmap-column"):
                p["heatmap"] = gr.Image(label=HEATMAP_LABEL, type="pil", interactive=False, height=300,
                                        buttons=["fullscreen"], visible=attends, elem_id="heatmap")
            with gr.Column(scale=3, min_width=240):
                p["prefix"] = gr.Textbox(label="Words before this step", interactive=False, elem_id="prefix",
                                         placeholder="(the start of the caption)")
                p["info"] = gr.Markdown(INSPECTOR_EMPTY, elem_id="step-info")
            with gr.Column(scale=3, min_width=240):
                p["alternatives"] = gr.Label(label="Alternatives at this step", show_heading=False, elem_id="step-alternatives")
            with gr.Column(scale=3, min_width=240):
                p["branch"] = gr.Radio(choices=[], label="Branch: use this word instead", elem_id="branch")
                p["redecode_btn"] = gr.Button("Re-decode from here", variant="primary", elem_id="redecode-btn")
        # The search as a tree (tree_view): every hypothesis beam and guided decoding weighed, step by step.
        gr.Markdown("### The search\nEvery hypothesis the decoder weighed, one column per word: tap one to "
                    "inspect its step, then *Re-decode from here* to continue from it.", elem_id="tree-heading")
        p["tree"] = gr.HTML(tree_view.render(None), js_on_load=asset("tree.js"), elem_id="search-tree")
        p["tree_info"] = gr.Markdown("", elem_id="tree-info")
        p["pick"] = gr.State(None)  # the node picked in the tree (its id): where Re-decode continues from
    return p


def files_tab() -> dict[str, Any]:
    """The "Several photos" tab -> its components by name."""
    gr.Markdown("Caption a folder's worth of photos at once (up to %d), with the decoding settings of the "
                "*One photo* tab. A file that is not a readable image is listed with the reason; the others "
                "still get their captions." % limits.MAX_FILES)
    return dict(files=gr.File(label="Photos", file_count="multiple", file_types=["image"], type="filepath", elem_id="files"),
                files_btn=gr.Button("Caption all", variant="primary", elem_id="files-btn"),
                files_table=gr.Dataframe(value={"headers": FILES_HEADERS, "data": []}, label="Captions", interactive=False,
                                         wrap=True, column_widths=["38%", "30%", "10%", "11%", "11%"], elem_id="files-table"),
                files_out=gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="files-download"))


def page_parts(model, model_label: str, attends: bool) -> dict[str, Any]:
    """Every component of the page, by name (the page's outputs by the names the handlers' updates use)."""
    has_cnn = bool(getattr(model.config, "imagenet_head", False))
    gr.Markdown("# Captioner", elem_id="title")
    gr.Markdown(
        f"Drop a photo and a CNN+LSTM ({'Show, Attend and Tell' if attends else 'Show and Tell'}) writes its caption "
        "word by word; then step through its decoding, see which words it weighed at each step"
        f"{' and where in the photo it looked' if attends else ''}, and branch from any word."
    )
    # Per-session state ends: limits.STATE_TTL after the session's last request, or when limits.SESSIONS more
    # recently used sessions hold state (launch_options; session.SessionStates).
    p: dict[str, Any] = dict(cache=gr.State(None, time_to_live=limits.STATE_TTL),  # ImageCache: the session's encoded photo
                             decoding=gr.State(None, time_to_live=limits.STATE_TTL))  # Decoding: what the inspector reads
    with gr.Tabs():
        with gr.Tab("One photo", id="one", elem_id="tab-one"):
            with gr.Row(equal_height=False, elem_id="main-row"):
                with gr.Column(scale=5):
                    p.update(photo_column(model, model_label))
                with gr.Column(scale=6):
                    p.update(caption_column(has_cnn))
            p.update(inspector_panel(attends))
        with gr.Tab("Several photos", id="many", elem_id="tab-many"):
            p.update(files_tab())
    with gr.Row(visible=False):  # /branch's own inputs (API only)
        p["api_step"] = gr.Number(label="step", precision=0, value=None)
        p["api_word"] = gr.Textbox(label="word", value=None)
        # /caption's and /branch's last output: {"familiar", "confidence", "familiarity"} of the finished caption
        p["api_assessment"] = gr.JSON(label="Assessment", value=None)
    return p


PAGE_OUTPUTS = (*Inspector._fields, "caption", "table", "decoding", "cache", "cnn_sees", "download", "status", "photo",
                "tree", "tree_info", "pick", "assessment")  # what the page's decoding events update, by name


def wire_events(h: Handlers, p: dict[str, Any]) -> None:
    """Every event of the page and the API, each to its one handler."""
    controls = p["controls"]  # keyword arguments of the decoding handlers, by GenerationConfig field
    page = {name: p[name] for name in PAGE_OUTPUTS}
    outputs = list(page.values())
    streamed = [p[k] for k in ("caption", "current", "table", "decoding", "cache", "api_assessment")]  # in Update's order
    inspector = [page[k] for k in Inspector._fields]

    def by_component(fn):
        """A handler whose updates name their outputs -> one keyed by component, as Gradio takes them."""
        @functools.wraps(fn)  # Gradio reads the handler's own signature
        def run(*args, **kw):
            for update in fn(*args, **kw):
                yield {page[name]: value for name, value in update.items()}
        return run

    # preprocess=False: the handlers get the upload undecoded and open it themselves (see limits.read_upload)
    common = dict(concurrency_id="decode", show_progress="minimal", preprocess=False, inputs_kwargs=controls)
    private = dict(api_visibility="private")
    # The API: /caption and /branch (streamed; events with no trigger in the page), /caption_files (the tab's button).
    gr.on([], h.caption, [p["photo"], p["cache"]], streamed, api_name="caption", **common)
    gr.on([], h.branch, [p["photo"], p["api_step"], p["api_word"], p["cache"]], streamed, api_name="branch", **common)
    # preprocess=False: the handler reads each upload's FileData (gr.File's preprocess would leave an empty
    # temporary file behind for every photo, and its file-type check is open_image's, with the reason named)
    p["files_btn"].click(h.caption_files, [p["files"]], [p["files_table"], p["files_out"]], api_name="caption_files",
                         concurrency_id="decode", show_progress="full", inputs_kwargs=controls, preprocess=False)
    # The page: a new photo captions itself, on upload, drop or paste, and on picking an example. (Not on .change:
    # Gradio's frontend fires it twice when a photo replaces another, which would run two decodes. A webcam
    # snapshot only fires .change, so there the Caption button does it.) Each clears the previous caption first.
    # The progress shows on the caption alone, not on every output of the page. The same handlers as the API's.
    auto = dict(fn=by_component(on_page(h.caption, clear_first=True)), inputs=[p["photo"], p["cache"]], outputs=outputs,
                trigger_mode="always_last", show_progress_on=[p["caption"]], **common, **private)
    gr.on([p["caption_btn"].click, p["photo"].upload], **auto)
    p["photo"].clear(lambda: {page[k]: v for k, v in cleared().items()}, None, outputs, queue=False, **private)
    if p["examples"] is not None:
        p["examples"].load_input_event.then(**auto)
    # Branching reads choices the inspector put in this page's session (the API has /branch).
    p["redecode_btn"].click(by_component(on_page(h.redecode, clear_first=False)),
                            [p["decoding"], p["slider"], p["branch"], p["cache"], p["pick"], p["caption"]], outputs,
                            show_progress_on=[p["caption"]], **common, **private)
    wire_inspector(h, p, page, inspector)


def wire_inspector(h: Handlers, p: dict[str, Any], page: dict[str, Any], inspector: list) -> None:
    """The inspector's and the search tree's events (they read the session's decoding, and run no model)."""
    outputs = list(page.values())
    private = dict(api_visibility="private")

    # The search tree: a node clicked or tapped (tree.js sends its id) is inspected and picked for Re-decode; a word
    # picked in the inspector afterwards takes its place (Re-decode prefers the picked word).
    def pick_node(decoding: Decoding | None, evt: gr.EventData):
        return {page[name]: value for name, value in h.pick(decoding, (evt._data or {}).get("node")).items()}

    p["tree"].click(pick_node, [p["decoding"]], outputs, show_progress="hidden", **private)
    p["branch"].input(lambda: (None, ""), None, [p["pick"], p["tree_info"]], queue=False, show_progress="hidden", **private)
    # One selected step: "This step" follows the slider (mouse, arrow keys, a typed number) and Prev / Next.
    # .input fires on the user's changes only, never on the updates these handlers send, so nothing loops.
    # These read the session's decoding; the caption the page shows tells an expired one from none (Handlers.select).
    # preprocess=False: the step number as sent, never Gradio's range check against a slider whose range the
    # session no longer holds ("Value 3 is greater than maximum value 2" after the state was evicted).
    nav = dict(show_progress="hidden", preprocess=False, **private)
    read = [p["decoding"], p["slider"], p["caption"]]
    p["slider"].input(lambda d, s, c: h.select(d, s, 0, c), read, inspector, trigger_mode="always_last", **nav)
    p["prev_btn"].click(lambda d, s, c: h.select(d, s, -1, c), read, inspector, **nav)
    p["next_btn"].click(lambda d, s, c: h.select(d, s, +1, c), read, inspector, **nav)
    p["download"].click(h.download, [p["decoding"], p["caption"]], p["download_file"], **private).success(
        None, [p["download_file"]], None, js=asset("save_download.js"), **private)


def build_demo(model, model_label: str, *, word_delay: float = WORD_DELAY) -> gr.Blocks:
    """The whole app around one loaded model, with its queue set up; launch it with demo.launch(**launch_options()).
    demo.controls: the decoding settings' controls by GenerationConfig field name."""
    h = Handlers(model, word_delay=word_delay, model_id=model_label)
    # delete_cache: heatmaps, downloads and uploads are temporary files; a long-running server drops those over an hour old.
    with ServedBlocks(title="Captioner: watch a CNN+LSTM caption a photo", delete_cache=(1800, 3600)) as demo:
        parts = page_parts(model, model_label, h.uses_grid)
        wire_events(h, parts)
    demo.controls = parts["controls"]
    # api_open=False: the /gradio_api/run and /gradio_api/api routes, which would run a decode outside the queue and
    # its limits, refuse every queued event (404); the page, /call and gradio_client all join the queue.
    demo.client_limits = ClientLimits(limits.PER_SESSION, limits.PER_ADDRESS, {"decode"})
    demo.queue(default_concurrency_limit=limits.CONCURRENCY, max_size=limits.MAX_QUEUE, api_open=False)
    return demo
