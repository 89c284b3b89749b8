"""The Gradio app: handlers and layout (app.py only parses arguments, loads the model and launches).

One model is loaded at start-up and shared by every user; everything per user lives in two gr.State
values of that user's session: an ImageCache (the last image's encoder output, so re-decoding with other
settings or branching never re-runs the CNN) and the finished Decoding (decode's own Step records) that the
inspector reads. Decoding settings are one GenerationConfig, built from the controls by field name.

The page's events (upload, example, Caption, Re-decode) update the page's outputs by name: they clear what belonged
to the previous caption first, stream the new one, and end with the inspector at the focus step. The API endpoints
(/caption, /branch, /caption_files) stream only the caption, its words and its history (Update).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import gradio as gr
import torch
from PIL import Image
from starlette.middleware import Middleware

from . import tree_view
from .confidence import Assessment, Assessor, expected_words
from .decode import SearchStep, Step, caption_batch, describe_stop, encode, stream
from .familiarity import degenerate
from .formatting import decode_record
from .generation import STRATEGIES, GenerationConfig
from .heatmap import attention_overlay
from .imagenet import Constraint, constraint_for, describe_labels, percent
from .imagenet import labels as imagenet_labels
from .model import ImageFeatures, device_of
from .preprocess import ImageError, encoder_view, open_image, to_tensor
from .serving import (
    MAX_REQUEST_BYTES,
    MAX_UPLOAD_BYTES,
    REQUEST_PIXELS,
    ClientLimits,
    FairShare,
    Job,
    PhotoError,
    RequestLimits,
    ServedBlocks,
    header_pixels,
    read_upload,
    settings_from,
    shown,
    whole_number,
)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# Decoding requests in progress at once (one concurrency group for every decoding event). Their model work runs in
# CPU turns (serving.FairShare: cores / torch threads at once, the least served first), and a streamed caption waits
# between words outside its turn, so this can be well above the cores: a normal caption is never queued behind a few
# long ones. Each request in progress holds one photo's features (a few hundred kB) and a worker thread.
CONCURRENCY = 16
MAX_QUEUE = 64  # requests waiting beyond that are refused with "queue is full"
# One client's share of those (serving.ClientLimits), in progress and waiting together: a session (a page, a
# gradio_client Client, a /call's session_hash) holds at most PER_SESSION decoding requests, and one address at most
# PER_ADDRESS (generous: many people can share one address behind a proxy; 64 clients on one machine are all served).
PER_SESSION = 4
PER_ADDRESS = 64
MAX_FILE_SIZE = "20mb"  # uploads above this are refused before they reach a handler
MAX_FILES = 64  # photos per request of the "Several photos" tab
UPLOAD_IDLE_TIMEOUT = 30.0  # seconds a request body may send nothing before it is answered 408 and closed
SESSIONS = 48  # served sessions whose state the server keeps (about 0.5 MB each with the bundled model); the least recently used goes first
STATE_TTL = 1800  # seconds a session's photo and decode are kept after its last request (serving.SessionStates)
FILES_BATCH = 8  # photos of a "Several photos" request encoded together
WORD_DELAY = 0.04  # seconds between streamed words: a word decodes in a few ms, so unpaced the caption lands at once
# The search tree grows with the caption, redrawn whole (about 400 bytes a node) at every search step while it has up
# to TREE_EVERY_STEP nodes; a larger one at most every TREE_REDRAW seconds per TREE_EVERY_STEP nodes. Guided beam 10
# over 60 words is about 3,400 nodes (1.3 MB): redrawn at all 60 steps it sent 39 MB, and the browser, which takes
# a few hundred ms to draw it once, fell seconds behind (benchmarks/tree.py, docs/search-tree.md).
TREE_EVERY_STEP = 300
TREE_REDRAW = 0.25
DOWNLOADS = Path(tempfile.gettempdir()) / "captioner-downloads"  # files offered for download (Gradio copies them)
DOWNLOAD_MAX_AGE = 3600  # seconds a download file is kept here

TABLE_HEADERS = ["#", "word", "p", "p(<EOS>)", "alternatives (p)"]
FILES_HEADERS = ["image", "caption", "familiar", "confidence", "error"]
CONFIDENCE = {  # HighlightedText categories of per-word probability, most confident first
    "confident (≥ 50%)": (0.5, "#86efac"),
    "unsure (20–50%)": (0.2, "#fde68a"),
    "guess (< 20%)": (0.0, "#fca5a5"),
}
INSPECTOR_EMPTY = "Caption an image, then step through its decoding here."
# What every control that needs a session's caption says when the server no longer has it (the page still shows it).
EXPIRED = "This caption has expired on the server (it keeps each caption for a while after its last use): caption the photo again."
STEP_HEADING = "**This step:** the words the model weighed"
HEATMAP_LABEL = "Where it looked"
PHOTO_MAX_SIDE = 512  # the photo a session keeps for the inspector's heatmap is at most this many pixels a side
NUM_LABELS = 5  # ImageNet labels shown under "The CNN sees"
# The app's decoding defaults: guided decoding, which on dev scored level with greedy and named more of the subjects
# that the CNN is sure of (docs/guided.md); for a model without an ImageNet head it is plain beam search. The library
# and the CLI keep GenerationConfig's own defaults (greedy), the reference for evaluation.
APP_DEFAULTS = GenerationConfig(strategy="guided")
# What the bundled model learned from, and what that means for other photos (the model card says the same); shown
# under the caption, where a wrong subject is read. The second part only where the CNN's labels are shown.
TRAINING_NOTE = ("The bundled model learned to caption from Flickr8k (about 8,000 photos, mostly people, dogs and outdoor "
                 "scenes), so it often names other subjects wrongly")
TRAINING_NOTE_LABELS = ("; *The CNN sees* names what its image classifier recognises, and the *guided* strategy (the "
                        "default; see Decoding settings) makes the caption name what the classifier is sure of")
PHONE = "640px"  # at this width and below the two columns stack: the caption comes right after the photo
STATIC = Path(__file__).resolve().parent / "static"  # the page's style and scripts


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


def launch_options() -> dict[str, Any]:
    """Keyword arguments for demo.launch() shared by app.py and the tests (Gradio 6: theme, css and js live here)."""
    js = "() => (" + asset("app.js").strip() + ")(" + json.dumps(example_descriptions()) + ")"
    limits = Middleware(RequestLimits, max_body=MAX_REQUEST_BYTES, max_upload=MAX_UPLOAD_BYTES, max_files=MAX_FILES,
                        idle_timeout=UPLOAD_IDLE_TIMEOUT)
    return dict(theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="sky"), css=asset("app.css") + "\n" + asset("tree.css"), js=js,
                max_file_size=MAX_FILE_SIZE, show_error=False, state_session_capacity=SESSIONS,
                app_kwargs={"middleware": [limits]})


def cpu_slots() -> int:
    """Requests computing at once (FairShare): as many as the cores hold at this process's torch threads each."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


def configure_torch(threads: int | None = None) -> int:
    """Intra-op threads for inference: by default half the cores (at least 1), since up to CONCURRENCY
    requests run side by side and an oversubscribed CPU serves everyone more slowly (measured: the comment above app.py's THREADS_HELP)."""
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
class Photo:
    """The photo a session keeps for its heatmaps, stored as a JPEG (quality 90): about a tenth of its pixels' size,
    and the server keeps up to SESSIONS of them. Decoded (a few ms) when a heatmap is drawn."""

    data: bytes
    size: tuple[int, int]

    @classmethod
    def of(cls, img: Image.Image) -> "Photo":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        return cls(buf.getvalue(), img.size)

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class ImageCache:
    """The last image of a session and its encoder output: re-decoding or branching never re-runs the CNN."""

    key: str  # sha256 of the image's bytes (or pixels)
    features: ImageFeatures  # batch of 1
    # What the CNN sees: the top ImageNet labels (name, probability), likeliest first; None without an ImageNet head.
    labels: tuple[tuple[str, float], ...] | None = None
    # The photo as the encoder saw it, at most PHOTO_MAX_SIDE a side: the heatmaps' base (None: nothing attends).
    photo: Photo | None = None
    constraints: dict = field(default_factory=dict, compare=False)  # guide_threshold -> guided decoding's Constraint
    rule: str | None = None  # familiarity.degenerate's reason for an image with nothing to caption ("only 1×1 pixels")

    def constraint(self, vocab, threshold: float | None, expected: dict[str, float] | None = None) -> Constraint:
        """Guided decoding's requirement for this image (`expected`: the model's word probe on it, the same for every
        call): it depends on nothing else, so it is worked out once."""
        if threshold not in self.constraints:
            self.constraints[threshold] = constraint_for(self.features, vocab, threshold, expected)
        return self.constraints[threshold]


@dataclass(frozen=True)
class Decoding:
    """A finished decode: the final caption's records, and how it was made."""

    steps: tuple[Step, ...]  # one record per word of the final caption
    stop: str  # "eos", "unk" or "max_len" (Step.stop)
    settings: GenerationConfig
    prefix: tuple[int, ...]  # forced first words (a branch), else ()
    focus: int  # the selected step after the decode (0-based): the first, or where a branch was made
    image_key: str  # ImageCache.key of the image it describes
    photo: Photo | None = None  # ImageCache.photo of that image: the heatmaps' base (same object, not a copy)
    tree: tuple | None = None  # the recorded search (decode.Node, the last Step's tree): the page's tree view
    assessment: Assessment | None = None  # familiar? how sure? (captioner.confidence)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.steps[-1].tokens

    @property
    def text(self) -> str:
        return self.steps[-1].text


class Update(NamedTuple):
    """One streamed update of a decode: what /caption and /branch send (caption, words, history), and the states."""

    caption: str
    words: dict[str, float]  # this step's alternatives (gr.Label data)
    table: dict  # the history so far
    decoding: Decoding | None  # set on the last update only
    cache: ImageCache
    assessment: dict | None = None  # on the last update: {"familiar", "confidence", "familiarity"} (Assessment.record)


class Inspector(NamedTuple):
    """The selected step, as the page shows it: "This step" (its words and heading) and the inspector."""

    current: Any  # "This step": the step's alternatives (gr.Label data)
    heading: str  # "This step"'s heading: which step it is
    slider: Any  # gr.Slider update: the step number
    prefix: str  # the caption before this step
    info: str  # the step's word, its probability and p(<EOS>)
    alternatives: Any  # the inspector's alternatives (gr.Label data)
    confidence: Any  # the caption, coloured by confidence
    branch: Any  # gr.Radio update: the words to branch on
    heatmap: Any  # gr.update of the heatmap image: the photo with this step's attention over it (grid decoders)


# ----------------------------------------------------------------------------------------------------
# Views of the decoder's records


def quoted(word: str) -> str:
    """A word as a list of words shows it: punctuation in quotes ("“,” 2%"), which bare reads as the list's own."""
    return word if any(c.isalnum() for c in word) else f"“{word}”"


def top_words(step: Step) -> dict[str, float]:
    """A step's alternatives as gr.Label data: word -> probability."""
    return {a.word: a.prob for a in step.alternatives}


def table_row(step: Step) -> list:
    # a no-break space inside "word 12%": a narrow column wraps between alternatives, not inside one
    alts = ", ".join(f"{quoted(a.word)}\u00a0{percent(a.prob)}" for a in step.alternatives)
    return [step.t + 1, step.word, percent(step.prob, 1), percent(step.eos_prob, 1), alts]


def history_table(steps: Sequence[Step]) -> dict:
    return {"headers": TABLE_HEADERS, "data": [table_row(s) for s in steps]}


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
        out.append((stripped, next(name for name, (low, _) in CONFIDENCE.items() if s.prob >= low)))
    return out


def labels_markdown(cache: ImageCache | None) -> str:
    """What the CNN sees in the session's photo, as one line beside the caption ("" before a photo, or without an
    ImageNet head: then the line is hidden)."""
    return f"**The CNN sees:** {describe_labels(cache.labels)}" if cache and cache.labels else ""


def heatmap_view(step: Step | None, photo: Photo | None) -> dict:
    """The inspector's heatmap for one step: the photo with the step's attention weights over it, labelled with the
    word (its probability is in the step's line beside it); hidden for decoders that do not attend."""
    if step is None:
        return gr.update(value=None, label=HEATMAP_LABEL)
    if step.attention is None or photo is None:
        return gr.update(value=None, visible=False)
    return gr.update(value=attention_overlay(photo.image(), step.attention), label=f"Where it looked for “{step.word}”", visible=True,
                     alt_text=f"The photo with a heatmap of where the model looked when it chose the word {step.word}")


def assessment_markdown(decoding: Decoding | None) -> dict:
    """Under the caption: the sentence for an unfamiliar photo and how sure the caption is, in words (hidden when
    there is nothing to say)."""
    text = decoding.assessment.markdown() if decoding is not None and decoding.assessment is not None else ""
    return gr.update(value=text, visible=bool(text))


def decoding_record(decoding: Decoding, model_id: str, precision: str = "fp32") -> dict:
    """What "Download decoding (JSON)" holds: the caption, whether its photo is familiar and how sure it is, every
    step's record (Step.record), guided decoding's constraint (which word was tried, whether it was kept, and why),
    the settings, the model and its precision."""
    constraint = decoding.steps[-1].constraint if decoding.steps else None
    assessed = (decoding.assessment or Assessment(None, None)).record()
    return {"model": model_id, "precision": precision, "caption": decoding.text, **assessed, "stop": decoding.stop,
            "settings": asdict(decoding.settings), "prefix": list(decoding.prefix),
            "constraint": None if constraint is None else constraint.record(), "steps": [s.record() for s in decoding.steps],
            "tree": None if decoding.tree is None else [n.record() for n in decoding.tree]}


def familiar_cell(familiar: bool | None) -> str:
    """The several-photos table's "familiar" column: yes, no (an unfamiliar photo: its caption is likely wrong) or
    blank (not known: a model without familiarity statistics, or no caption)."""
    return "" if familiar is None else "yes" if familiar else "no"


def write_download(name: str, text: str) -> str:
    """Write `text` to a fresh temporary folder as `name` (the name the browser saves it under); returns the path.
    Gradio copies returned files into its own cache, so these are pruned after DOWNLOAD_MAX_AGE."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    for old in DOWNLOADS.iterdir():
        with contextlib.suppress(OSError):  # another request's pruning may remove it first
            if time.time() - old.stat().st_mtime > DOWNLOAD_MAX_AGE:
                shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=DOWNLOADS)) / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------------
# Handlers


class Handlers:
    """The app's event handlers around one shared, read-only model. Per-user data only passes through
    arguments and return values (gr.State), never through attributes, so nothing leaks between users.
    Decoding settings arrive as keyword arguments named after GenerationConfig's fields (`**controls`)."""

    def __init__(self, model, *, word_delay: float = WORD_DELAY, model_id: str = "captioner"):
        self.model = model
        self.turns = FairShare(cpu_slots())  # every request's model work, in CPU turns
        self.word_delay = word_delay
        self.model_id = model_id
        # Heatmaps for decoders whose steps attend over the image's grid of regions.
        self.uses_grid = bool(getattr(model.decoder, "uses_grid", False))
        self.assessor = Assessor.of(model)  # familiarity and confidence, read once from the model's folder

    def settings(self, **controls) -> GenerationConfig:
        return settings_from(controls, replace(APP_DEFAULTS, max_len=self.model.config.max_len))

    # --- the image feature cache (per session, in a gr.State) ---

    def features(self, image, cache: ImageCache | None, job: Job | None = None) -> ImageCache:
        """The ImageCache of `image` (an upload, a path or a PIL image): `cache` itself when it holds that image.
        The photo is read and decoded once; the encoder's input and the heatmaps' base are both made from it, in
        one CPU turn of `job`."""
        if image is None:
            raise gr.Error("No image yet: drop a photo on the image box, upload or paste one, or pick an example.",
                           title="No image", print_exception=False)
        data, name = read_upload(image)
        key = hashlib.sha256(data if isinstance(data, bytes) else data.tobytes() + repr((data.size, data.mode)).encode()).hexdigest()
        if cache and cache.key == key:
            return cache
        with self.turns.turn(job or Job()):
            try:
                img = open_image(data, name)
            except ImageError as e:
                raise PhotoError(str(e)) from None
            config = self.model.config
            features = encode(self.model, to_tensor(img, config))
            labels = None if features.labels is None else tuple(imagenet_labels(features, NUM_LABELS))
            return ImageCache(key, features, labels, Photo.of(encoder_view(img, config, PHOTO_MAX_SIDE)) if self.uses_grid else None,
                              rule=degenerate(img))

    # --- decoding, streamed: the API's outputs (caption, words, history) and the states ---

    def _stream(self, cache: ImageCache, settings: GenerationConfig, job: Job, prefix: Sequence[int] = ()) -> Iterator[Step]:
        """decode.stream's records, each computed in a CPU turn of `job`."""
        yield from self.turns.steps(job, self._records(cache, settings, prefix))

    def _records(self, cache: ImageCache, settings: GenerationConfig, prefix: Sequence[int]) -> Iterator[Step]:
        try:
            constraint = cache.constraint(self.model.vocab, settings.guide_threshold, expected_words(self.model, cache.features)) \
                if settings.strategy == "guided" else None
            yield from stream(self.model, config=settings, features=cache.features, prefix=prefix, constraint=constraint)
        except ValueError as e:  # a setting out of range (decode.stream says which and why)
            raise gr.Error(str(e), title="Bad decoding setting", print_exception=False) from None

    def _decode(self, cache: ImageCache, settings: GenerationConfig, job: Job, prefix: tuple[int, ...] = (),
                focus: int = 0, tree: tree_view.Growing | None = None) -> Iterator[Update]:
        """One Update per Step of decode.stream, paced by word_delay; the last carries the finished Decoding. A branch
        (`prefix`: the forced first words, `focus` the last of them) may run past max_len to keep its words. `tree`
        (the page's): the search is recorded, its nodes collected there as they come, and a search step that added
        no word to the caption still gets its Update, so that the tree grows step by step."""
        settings = replace(settings, max_len=max(settings.resolved_max_len(self.model.config.max_len), len(prefix)),
                           tree=tree is not None)
        if tree is not None and settings.strategy == "guided":
            tree.required = cache.constraint(self.model.vocab, settings.guide_threshold).words
        rows: list[Step] = []
        last = 0.0
        grown = False  # a search step recorded that no Update has shown yet
        for step in self._stream(cache, settings, job, prefix):
            if isinstance(step, SearchStep):
                if grown:  # the previous search step streamed no word: show it on its own
                    last = self._pace(last)
                    yield Update(rows[-1].text if rows else "", top_words(rows[-1]) if rows else {}, history_table(rows), None, cache)
                tree.nodes.extend(step.nodes)
                grown = True
                continue
            grown = False
            decoding = None
            if step.stop is None:
                rows.append(step)
            else:
                rows = list(step.caption_steps())  # beam search: the winner's records, which the stream may not have shown
                assessment = self.assessor.assess(cache.features, rows, rule=cache.rule)
                decoding = Decoding(tuple(rows), step.stop, settings, prefix, min(focus, len(rows) - 1), cache.key, cache.photo,
                                    tree=step.tree, assessment=assessment)
            last = self._pace(last)
            yield Update(step.text, top_words(step), history_table(rows), decoding, cache,
                         None if decoding is None else decoding.assessment.record())

    def _pace(self, last: float) -> float:
        if self.word_delay:  # the first word at once, then one every word_delay
            time.sleep(max(0.0, self.word_delay - (time.monotonic() - last)))
            return time.monotonic()
        return last

    def caption(self, image, cache: ImageCache | None = None, **controls) -> Iterator[Update]:
        """/caption: stream the caption of `image` word by word."""
        yield from self._caption(image, cache, None, **controls)

    def _caption(self, image, cache: ImageCache | None, tree: tree_view.Growing | None, **controls) -> Iterator[Update]:
        settings = self.settings(**controls)
        with self.turns.request() as job:
            yield from self._decode(self.features(image, cache, job), settings, job, tree=tree)

    def redecode(self, decoding: Decoding | None, step_number, choice, cache: ImageCache | None = None, node=None,
                 tree: tree_view.Growing | None = None, shown_caption: str = "", **controls) -> Iterator[Update]:
        """Branch: force the inspected step's word to `choice` (a token id), keep the words before it, and
        decode the rest again from the cached image features. With no word picked but a `node` of the search tree
        picked (its id), continue from that node's hypothesis instead: its words are forced. `shown_caption`: the
        caption the page shows (with no decoding in the session, it has expired)."""
        if not decoding and shown_caption:
            raise gr.Error(EXPIRED, title="Caption expired", print_exception=False)
        if not decoding:
            raise gr.Error("Caption an image first, then pick a step and a word to branch from.", print_exception=False)
        if not cache or cache.key != decoding.image_key:
            raise gr.Error("The image changed since this caption; caption it again before branching.", print_exception=False)
        if (choice is None or choice == "") and node is not None and node != "":
            prefix = self.hypothesis(decoding, node)
            with self.turns.request() as job:
                yield from self._decode(cache, self.settings(**controls), job, prefix, len(prefix) - 1, tree=tree)
            return
        if choice is None or choice == "":
            raise gr.Error("Pick one of this step's words (or a word in the search tree) first, then re-decode.",
                           title="No word picked", print_exception=False)
        t = self._index(decoding, step_number)
        try:
            choice = whole_number("word id", choice, f"one of step {t + 1}'s alternatives")
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if choice not in {a.token for a in decoding.steps[t].alternatives}:
            raise gr.Error(f"word id {choice} is not among step {t + 1}'s alternatives", print_exception=False)
        settings = self.settings(**controls)
        with self.turns.request() as job:
            yield from self._decode(cache, settings, job, (*decoding.tokens[:t], choice), t, tree=tree)

    @staticmethod
    def _node(decoding: Decoding | None, node):
        """The search tree's node `node` (its id) of this decoding; a gr.Error naming the id when there is none."""
        try:
            i = whole_number("node", node, "")
        except ValueError:
            i = -1
        if decoding is None or not decoding.tree or not 0 <= i < len(decoding.tree):
            raise gr.Error(f"node {shown(node)} is not in this caption's search tree; caption again and pick another",
                           print_exception=False)
        return decoding.tree[i]

    def hypothesis(self, decoding: Decoding, node) -> tuple[int, ...]:
        """The token ids of the hypothesis that a search tree node ends (ending in <EOS> for a finished one)."""
        by_id = {n.id: n for n in decoding.tree or ()}
        return tuple(n.token for n in tree_view.path(self._node(decoding, node), by_id))

    def pick(self, decoding: Decoding | None, node) -> dict:
        """A node of the search tree clicked or tapped: the inspector at its step (the caption's word there), why it
        has its status beside the tree, and it is what Re-decode from here continues from (until a word is picked)."""
        try:
            n = self._node(decoding, node)
        except gr.Error as e:
            return dict(pick=None, tree_info=f"**{e.message}**")
        by_id = {m.id: m for m in decoding.tree}
        why = tree_view.reason(n, by_id, tree_view.floors(decoding.tree))
        words = " ".join(m.word for m in tree_view.path(n, by_id))
        return dict(**self.inspect(decoding, n.t + 1)._asdict(), pick=n.id,
                    tree_info=tree_view.escaped(f"Selected: {why}") + "  \n**Re-decode from here** continues from "
                              f"“{tree_view.escaped(words)}”.")

    def word_id(self, word) -> int:
        """A word of the model's vocabulary (or its id, as a number or a string of digits) -> its token id."""
        vocab = self.model.vocab
        text = str(word).strip() if word is not None else ""
        if re.fullmatch(r"\d+(\.0*)?", text):  # a word id
            token = int(text.split(".")[0]) if len(text) <= 30 else -1
            if not 0 <= token < len(vocab):
                raise gr.Error(f"word id {shown(text, 32)[1:-1] if token < 0 else token} is not in the model's vocabulary "
                               f"(ids 0 to {len(vocab) - 1})", print_exception=False)
        elif (token := vocab.stoi.get(text, vocab.stoi.get(text.lower()))) is None:
            raise gr.Error(f"{shown(text, 40)} is not a word of the model's vocabulary" if text else "Give the word to branch on.",
                           title="Unknown word", print_exception=False)
        if token in vocab.unsaid:
            raise gr.Error(f"{vocab.itos[token]!r} cannot be part of a caption; give a word (or <EOS> to end it there)",
                           print_exception=False)
        return token

    def branch(self, image, step, word, cache: ImageCache | None = None, **controls) -> Iterator[Update]:
        """/branch: caption `image` with the settings, then make word number `step` (from 1) `word` (a word, or its
        id; "<EOS>" ends the caption there), keep the words before it, and stream the caption decoded from there."""
        settings = self.settings(**controls)
        token = self.word_id(word)
        with self.turns.request() as job:
            yield from self._branch(self.features(image, cache, job), settings, step, token, job)

    def _branch(self, cache: ImageCache, settings: GenerationConfig, step, token: int, job: Job) -> Iterator[Update]:
        *_, last = self._stream(cache, settings, job)  # the caption to branch from, unpaced
        steps = last.caption_steps()
        try:
            n = whole_number("step", step, "")
        except ValueError:
            raise gr.Error(f"step={shown(step)}: give the number of the word to change, a whole number from 1 to {len(steps)}",
                           print_exception=False) from None
        if not 1 <= n <= len(steps):
            raise gr.Error(f"step={shown(n, 40)}: this caption has {len(steps)} words ({last.text!r}); give 1 to {len(steps)}",
                           print_exception=False)
        if n == 1 and token == self.model.vocab.eos_id:  # a caption of no words: nothing to stream, nothing to show
            raise gr.Error(f"step=1 with <EOS> would end the caption before its first word ({last.text!r}); give another "
                           "word for step 1, or <EOS> at a later step to end the caption there", print_exception=False)
        yield from self._decode(cache, settings, job, (*last.tokens[: n - 1], token), n - 1)

    # --- the page: every decoding event updates the page's outputs by name (build_demo maps names to components) ---

    def cleared(self) -> dict:
        """The page with nothing from an earlier caption: no caption, labels, history, inspector, download or message."""
        return dict(caption="", table=history_table([]), decoding=None, labels="", **self.inspect(None)._asdict(),
                    download=gr.update(interactive=False), status=gr.update(value="", visible=False),
                    tree=tree_view.render(None), tree_info="", pick=None, assessment=assessment_markdown(None))

    def _page(self, updates: Iterator[Update], *, clear_first: bool, tree: tree_view.Growing | None = None) -> Iterator[dict]:
        """A decode's updates as page updates. The page is cleared first (`clear_first`: before the work starts, so a
        failure leaves nothing stale behind; else with the first word, after the request was checked); the first word
        brings what the CNN sees; the last selects the focus step and offers the download. A failure is said beside the
        caption (and in a warning), not as an error badge over it; an unreadable photo is taken out of the photo box."""
        try:
            if clear_first:
                yield self.cleared()
            first = True
            drawn, drawn_at = 0, 0.0  # the tree's nodes drawn so far, and when
            for u in updates:
                out = dict(caption=u.caption, table=u.table, current=u.words)
                if first:
                    out = {**({} if clear_first else self.cleared()), **out, "labels": labels_markdown(u.cache)}
                if tree is not None and len(tree.nodes) != drawn and u.decoding is None and (
                        time.monotonic() - drawn_at >= TREE_REDRAW * (len(tree.nodes) // TREE_EVERY_STEP)):
                    out["tree"], drawn, drawn_at = tree.view(), len(tree.nodes), time.monotonic()  # it grew: draw it again
                if u.decoding is not None:
                    out.update(decoding=u.decoding, cache=u.cache, assessment=assessment_markdown(u.decoding),
                               **self.finished(u.decoding))
                first = False
                yield out
        except gr.Error as e:
            gr.Warning(e.message, title=e.title)
            yield dict(status=gr.update(value=f"**{e.title}:** {e.message}", visible=True), **({"photo": None} if isinstance(e, PhotoError) else {}))

    def page_caption(self, image, cache: ImageCache | None = None, **controls) -> Iterator[dict]:
        """The Caption button, an upload, a pasted photo, an example: clear the page, then caption the image
        (so a file that fails leaves no caption of the photo before it beside it)."""
        tree = tree_view.Growing()
        yield from self._page(self._caption(image, cache, tree, **controls), clear_first=True, tree=tree)

    def page_redecode(self, decoding: Decoding | None, step_number, choice, cache: ImageCache | None = None, node=None,
                      shown_caption: str = "", **controls) -> Iterator[dict]:
        """Re-decode from here (from the step's picked word, else from the search tree's picked node): the branch
        replaces the caption; a request that cannot be done changes nothing."""
        tree = tree_view.Growing()
        yield from self._page(self.redecode(decoding, step_number, choice, cache, node, tree, shown_caption, **controls),
                              clear_first=False, tree=tree)

    def finished(self, decoding: Decoding) -> dict:
        """After a decode: "This step" and the inspector at its focus step, and the download offered."""
        return dict(**self.inspect(decoding, decoding.focus + 1)._asdict(), download=gr.update(interactive=True),
                    tree=self.tree_view(decoding), tree_info="", pick=None)

    def tree_view(self, decoding: Decoding) -> str:
        """The finished search, drawn (tree_view.render): guided decoding's note says what was required and how it ended."""
        constraint = decoding.steps[-1].constraint if decoding.steps else None
        return tree_view.render(decoding.tree, required=constraint.words if constraint else (),
                                note=constraint.describe() if constraint is not None else "")

    def download(self, decoding: Decoding | None, shown_caption: str = "") -> str:
        """Download decoding (JSON): the file is written when it is asked for, not after every caption."""
        if not decoding:
            raise gr.Error(EXPIRED if shown_caption else "Caption an image first, then download its decoding.",
                           title="Caption expired" if shown_caption else "No caption", print_exception=False)
        record = decode_record(decoding.steps[-1], model=self.model_id, precision=self.model.precision,
                               assessment=decoding.assessment, settings=asdict(decoding.settings), prefix=list(decoding.prefix))
        return write_download("decoding.json", json.dumps(record, indent=1))

    # --- the selected step: "This step" and the inspector show the same one ---

    @staticmethod
    def _index(decoding: Decoding, step_number) -> int:
        try:
            t = int(round(float(step_number))) - 1
        except (TypeError, ValueError, OverflowError):
            t = 0
        return min(max(t, 0), len(decoding.steps) - 1)

    def inspect(self, decoding: Decoding | None, step_number=1) -> Inspector:
        """Step `step_number` (1-based, clamped) selected: "This step" (its words and heading) and the inspector
        (slider, prefix, chosen word and <EOS> probability, alternatives, confidence-coloured caption, branch choices)."""
        if not decoding:
            return Inspector(None, STEP_HEADING, gr.Slider(minimum=1, maximum=2, value=1, interactive=False), "",
                             INSPECTOR_EMPTY, None, None, gr.Radio(choices=[], value=None), heatmap_view(None, None))
        steps = decoding.steps
        t = self._index(decoding, step_number)
        s = steps[t]
        ended = describe_stop(steps[-1])
        info = (f"**Step {t + 1} of {len(steps)}** · chose **{s.word}** with p = {percent(s.prob, 1)} · "
                f"p(`<EOS>`) here = {percent(s.eos_prob, 1)} (the chance the model ends the caption instead)")
        if s.unk_prob >= 0.05:  # decoding masks <UNK>: the probabilities shown are of the rest, renormalised
            info += (f"  \np(`<UNK>`) here = {percent(s.unk_prob, 1)}: the model's weight on a word outside its "
                     "vocabulary, which is never emitted (the probabilities above share out the rest)")
        if t == len(steps) - 1 and ended:
            info += f"  \nThe caption stops after this word: {ended}."
        if decoding.prefix and len(decoding.prefix) <= len(steps):
            info += f"  \nBranched: word {len(decoding.prefix)} was forced to **{steps[len(decoding.prefix) - 1].word}**."
        elif decoding.prefix:  # the branch picked <EOS>: the caption was made to end there
            info += f"  \nBranched: the caption was made to end after word {len(steps)} (`<EOS>` forced)."
        constraint = steps[-1].constraint  # guided decoding: the last record says how the requirement ended
        if constraint is not None:
            info += "  \n**Guided:** " + constraint.describe().removeprefix("guided: ")
            if constraint.used and s.word == constraint.used and s.token not in s.tokens[:-1]:  # its first use
                info += " · **this step's word is the required one**"
        words = top_words(s)
        return Inspector(
            words,
            f"**This step: {t + 1} of {len(steps)}** (“{s.word}”): the words the model weighed",
            gr.Slider(minimum=1, maximum=max(len(steps), 2), value=t + 1, step=1, interactive=len(steps) > 1),
            steps[t - 1].text if t else "",
            info,
            words,
            highlighted(steps),
            gr.Radio(choices=[(f"{quoted(a.word)}  ({percent(a.prob)})", a.token) for a in s.alternatives], value=None),
            heatmap_view(s, decoding.photo),
        )

    def select(self, decoding: Decoding | None, step_number, delta: int = 0, shown_caption: str = "") -> Inspector:
        """The step slider moved (dragged, arrow keys, a typed number), or Prev / Next (`delta` -1 / +1): select that
        step. After the slider moved it is left as the user has it (no update that could fight a drag in progress)
        unless the number had to be clamped; a box being typed into (empty, not a number) changes nothing. With no
        decoding in the session while the page shows a caption (`shown_caption`), it has expired: the inspector says
        so (and a warning), and nothing else changes."""
        if not decoding and shown_caption:
            gr.Warning(EXPIRED, title="Caption expired")
            return Inspector(*[gr.skip()] * len(Inspector._fields))._replace(info=f"**{EXPIRED}**")
        try:
            n = float(step_number) + delta
            if not math.isfinite(n):
                raise ValueError(n)
        except (TypeError, ValueError):
            return Inspector(*[gr.skip()] * len(Inspector._fields))
        view = self.inspect(decoding, n)
        return view._replace(slider=gr.skip()) if decoding and not delta and self._index(decoding, n) + 1 == n else view

    # --- several photos at once ---

    def caption_files(self, files, progress=gr.Progress(), **controls) -> tuple[dict, list[str] | None]:
        """/caption_files: caption several images. Returns the table (image, caption, error: a bad file is named with
        its reason and the rest still get captions, as the CLI does) and the same as captions.csv and captions.json.
        `progress` (Gradio fills it in) shows photo by photo how many are captioned."""
        if not files:
            raise gr.Error("No photos yet: choose or drop several image files first.", title="No photos", print_exception=False)
        if len(files) > MAX_FILES:
            raise gr.Error(f"{len(files)} files: at most {MAX_FILES} at a time here (the command line takes any number)",
                           print_exception=False)
        settings = replace(self.settings(**controls), num_alternatives=0)
        with self.turns.request() as job:  # each photo opened, and each batch encoded and captioned, is one CPU turn
            return self._caption_files(files, settings, job, progress)

    def _caption_files(self, files, settings: GenerationConfig, job: Job, progress=None) -> tuple[dict, list[str]]:
        records: list[dict] = []
        finished = 0

        def tell(n: int) -> None:  # n more photos done (captioned, refused or unreadable)
            nonlocal finished
            finished += n
            if progress is not None:
                progress((finished, len(files)), desc=f"{finished} of {len(files)} photos", unit="photos")

        batch: list[tuple[dict, torch.Tensor, str | None]] = []  # photos waiting for the encoder: model-sized tensors (and
        # familiarity.degenerate's verdict on the photo), never photos
        budget = REQUEST_PIXELS

        def caption_batch_of_photos():
            if not batch:
                return
            try:
                with self.turns.turn(job):
                    features = self.model.encode(torch.stack([x for _, x, _ in batch]).to(device_of(self.model)))
                    # the records, not only the text: the confidence reads the caption's word probabilities
                    lasts = caption_batch(self.model, config=settings, features=features, steps=True)
                    assessed = [self.assessor.assess(features.select(slice(i, i + 1)), last.caption_steps() if last else (),
                                                     rule=rule) for i, (last, (_, _, rule)) in enumerate(zip(lasts, batch))]
            except ValueError as e:
                raise gr.Error(str(e), title="Bad decoding setting", print_exception=False) from None
            for (rec, _, _), last, a in zip(batch, lasts, assessed):
                rec.update(caption=last.text if last is not None else "", **a.record(), precision=self.model.precision)
            tell(len(batch))
            batch.clear()

        # Photo by photo: each is opened (reduced as it is: preprocess.open_image), turned into the model's input and
        # let go; FILES_BATCH inputs at a time go through the encoder. The request's pixels are counted from each
        # file's header before it is decoded: past REQUEST_PIXELS the rest are listed as refused, not decoded.
        for f in files:
            path = f.get("path") if isinstance(f, dict) else os.fspath(f)
            name = (f.get("orig_name") if isinstance(f, dict) else None) or os.path.basename(path)
            rec = {"image": name}
            records.append(rec)
            pixels = header_pixels(path)
            if pixels > budget:
                rec["error"] = (f"over this request's limit of {REQUEST_PIXELS // 1_000_000} megapixels in all; "
                                "caption it in another request")
                budget = 0  # and every file after it: the table keeps the order they were sent in
                tell(1)
                continue
            budget -= pixels
            try:
                with self.turns.turn(job):
                    img = open_image(path, name)
                    batch.append((rec, to_tensor(img, self.model.config), degenerate(img)))
            except ImageError as e:
                rec["error"] = str(e).removeprefix(name + ": ")
                tell(1)
            if len(batch) == FILES_BATCH:
                caption_batch_of_photos()
        caption_batch_of_photos()
        rows = [[r["image"], r.get("caption", ""), familiar_cell(r.get("familiar")),
                 "" if r.get("confidence") is None else f"{r['confidence']:.2f}", r.get("error", "")] for r in records]
        out = io.StringIO()
        csv.writer(out).writerows([FILES_HEADERS, *rows])
        folder = Path(write_download("captions.csv", out.getvalue())).parent
        (folder / "captions.json").write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
        return {"headers": FILES_HEADERS, "data": rows}, [str(folder / "captions.csv"), str(folder / "captions.json")]


# ----------------------------------------------------------------------------------------------------
# Layout


def model_markdown(model, model_label: str) -> str:
    c = model.config
    vocab = len(model.vocab) if model.vocab is not None else c.vocab_size
    attends = " with soft attention over the CNN's regions" if getattr(model.decoder, "uses_grid", False) else ""
    return (f"**Model:** `{model_label}` · vocabulary {vocab:,} words · `{c.backbone}` encoder + "
            f"{c.num_layers}-layer LSTM ({c.hidden_size}){attends} · up to {c.max_len} words · {getattr(model, 'precision', 'fp32')}")


def build_demo(model, model_label: str, *, word_delay: float = WORD_DELAY) -> gr.Blocks:
    """The whole app around one loaded model, with its queue set up; launch it with demo.launch(**launch_options())."""
    h = Handlers(model, word_delay=word_delay, model_id=model_label)
    attends = h.uses_grid
    has_labels = bool(getattr(model.config, "imagenet_head", False))
    # delete_cache: heatmaps, downloads and uploads are temporary files; a long-running server drops those over an hour old.
    with ServedBlocks(title="Captioner: watch a CNN+LSTM caption a photo", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# Captioner", elem_id="title")
        gr.Markdown(
            f"Drop a photo and a CNN+LSTM ({'Show, Attend and Tell' if attends else 'Show and Tell'}) writes its caption "
            "word by word; then step through its decoding, see which words it weighed at each step"
            f"{' and where in the photo it looked' if attends else ''}, and branch from any word."
        )
        # Per-session state ends: STATE_TTL after the session's last request, or when SESSIONS more recently used
        # sessions hold state (launch_options; serving.SessionStates).
        cache = gr.State(None, time_to_live=STATE_TTL)  # ImageCache: this session's last image and its encoder output
        decode_state = gr.State(None, time_to_live=STATE_TTL)  # Decoding: the finished decode the inspector reads
        with gr.Tabs():
            with gr.Tab("One photo", id="one", elem_id="tab-one"):
                with gr.Row(equal_height=False, elem_id="main-row"):
                    with gr.Column(scale=5):
                        image = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                         placeholder="Drop a photo here, click to upload, or paste one\n"
                                                     "Webcam: take a photo, then press Caption", height=340, elem_id="photo")
                        caption_btn = gr.Button("Caption", variant="primary", elem_id="caption-btn")
                        paths = example_paths()
                        examples = gr.Examples(examples=[[p] for p in paths], inputs=[image], label="Examples (public domain, CC0, CC BY 4.0)",
                                               examples_per_page=12, cache_examples=False, elem_id="examples") if paths else None
                        with gr.Accordion("Decoding settings", open=False, elem_id="settings"):
                            d = APP_DEFAULTS  # every default comes from the one settings object
                            limit = GenerationConfig.limit  # and every range from its LIMITS (what the server enforces)
                            strategy = gr.Radio(list(STRATEGIES), value=d.strategy, label="Strategy",
                                                info="greedy: most likely word each step · beam: keeps several candidate captions · "
                                                     "sample: random, varied · guided: beam search that must use a word for what "
                                                     "the CNN is sure of")
                            with gr.Row():
                                beam_size = gr.Slider(*limit("beam_size"), value=d.beam_size, step=1, precision=0, label="Beam size",
                                                      info="beam search and guided")
                                max_len = gr.Slider(1, max(limit("max_len")[1], model.config.max_len), value=model.config.max_len, step=1, precision=0,
                                                    label="Max length (words)")
                            guide_threshold = gr.Slider(0, 1.0, value=d.guide_threshold or 0, step=0.05, label="Guidance threshold",
                                                        info="guided: how sure the CNN must be of a word before the caption must "
                                                             "use it; 0 = each word's own, calibrated", elem_id="guide-threshold")
                            num_alternatives = gr.Slider(1, limit("num_alternatives")[1], value=d.num_alternatives, step=1, precision=0,
                                                         label="Words shown per step")
                            with gr.Row():
                                temperature = gr.Slider(0.1, limit("temperature")[1], value=d.temperature, step=0.05, label="Temperature", info="sampling")
                                top_k = gr.Slider(*limit("top_k"), value=d.top_k, step=1, precision=0, label="Top-k", info="sampling; 0 = all words")
                            with gr.Row():
                                top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p", info="sampling (nucleus)")
                                seed = gr.Number(value=-1 if d.seed is None else d.seed, precision=0, label="Seed", info="sampling; -1 = new each run")
                        gr.Markdown(model_markdown(model, model_label), elem_id="model-info")
                    with gr.Column(scale=6):
                        caption = gr.Textbox(label="Caption", lines=2, interactive=False, buttons=["copy"], elem_id="caption",
                                             placeholder="The caption appears here, word by word.")
                        # Is the photo like the ones the model learned from, and how sure is the caption (in words)?
                        assessment = gr.Markdown("", visible=False, elem_id="assessment")
                        # Why the last request could not be done (an unreadable photo, no word picked), beside the caption.
                        status = gr.Markdown("", visible=False, elem_id="status")
                        # What the CNN's own ImageNet classifier sees in the photo (models saved with its head only).
                        cnn_labels = gr.Markdown("", visible=has_labels, elem_id="cnn-labels")
                        gr.Markdown(TRAINING_NOTE + (TRAINING_NOTE_LABELS if has_labels else "") + ".", elem_id="training-note")
                        heading = gr.Markdown(STEP_HEADING, elem_id="step-heading")
                        current = gr.Label(label="Words", show_label=False, show_heading=False, elem_id="current-step")
                        table = gr.Dataframe(value=history_table([]), label="History", interactive=False, wrap=True, max_height=440,
                                             column_widths=["44px", "118px", "70px", "92px", "330px"], elem_id="history")
                        download = gr.Button("Download decoding (JSON)", interactive=False, size="sm", elem_id="download-decoding")
                        download_file = gr.File(visible=False)  # written on the click, then saved by the browser (static/save_download.js)

                with gr.Column(elem_id="inspector"):
                    gr.Markdown("## Step-by-step inspector\nEach word coloured by how sure the model was; pick a step to see what "
                                "it weighed there" + (" and where in the photo it looked" if attends else "") +
                                ", then pick another word and re-decode from that point.")
                    confidence = gr.HighlightedText(label="Caption by confidence", color_map={k: v[1] for k, v in CONFIDENCE.items()},
                                                    show_legend=True, show_inline_category=False, combine_adjacent=False, elem_id="confidence")
                    with gr.Row(elem_id="step-nav"):
                        prev_btn = gr.Button("◀ Prev", size="sm", elem_id="prev-step", scale=0, min_width=70)
                        step = gr.Slider(1, 2, value=1, step=1, precision=0, label="Step", interactive=False, buttons=[],
                                         elem_id="step-slider", scale=1, min_width=120)
                        next_btn = gr.Button("Next ▶", size="sm", elem_id="next-step", scale=0, min_width=70)
                    with gr.Row(equal_height=False):
                        # The photo with the selected step's attention over it: only for decoders that attend.
                        with gr.Column(scale=3, min_width=240, visible=attends, elem_id="heatmap-column"):
                            heatmap = gr.Image(label=HEATMAP_LABEL, type="pil", interactive=False, height=300,
                                               buttons=["fullscreen"], visible=attends, elem_id="heatmap")
                        with gr.Column(scale=3, min_width=240):
                            prefix = gr.Textbox(label="Words before this step", interactive=False, elem_id="prefix",
                                                placeholder="(the start of the caption)")
                            step_info = gr.Markdown(INSPECTOR_EMPTY, elem_id="step-info")
                        with gr.Column(scale=3, min_width=240):
                            step_alts = gr.Label(label="Alternatives at this step", show_heading=False, elem_id="step-alternatives")
                        with gr.Column(scale=3, min_width=240):
                            branch = gr.Radio(choices=[], label="Branch: use this word instead", elem_id="branch")
                            redecode_btn = gr.Button("Re-decode from here", variant="primary", elem_id="redecode-btn")
                    # The search as a tree (tree_view): every hypothesis beam and guided decoding weighed, step by step.
                    gr.Markdown("### The search\nEvery hypothesis the decoder weighed, one column per word: tap one to "
                                "inspect its step, then *Re-decode from here* to continue from it.", elem_id="tree-heading")
                    search_tree = gr.HTML(tree_view.render(None), js_on_load=asset("tree.js"), elem_id="search-tree")
                    tree_info = gr.Markdown("", elem_id="tree-info")
                    tree_pick = gr.State(None)  # the node picked in the tree (its id): where Re-decode continues from

            with gr.Tab("Several photos", id="many", elem_id="tab-many"):
                gr.Markdown("Caption a folder's worth of photos at once (up to %d), with the decoding settings of the "
                            "*One photo* tab. A file that is not a readable image is listed with the reason; the others "
                            "still get their captions." % MAX_FILES)
                files = gr.File(label="Photos", file_count="multiple", file_types=["image"], type="filepath", elem_id="files")
                files_btn = gr.Button("Caption all", variant="primary", elem_id="files-btn")
                files_table = gr.Dataframe(value={"headers": FILES_HEADERS, "data": []}, label="Captions", interactive=False,
                                           wrap=True, column_widths=["38%", "30%", "10%", "11%", "11%"], elem_id="files-table")
                files_out = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="files-download")

        with gr.Row(visible=False):  # /branch's own inputs (API only)
            api_step = gr.Number(label="step", precision=0, value=None)
            api_word = gr.Textbox(label="word", value=None)
            # /caption's and /branch's last output: {"familiar", "confidence", "familiarity"} of the finished caption
            api_assessment = gr.JSON(label="Assessment", value=None)

        # Keyed by GenerationConfig's field names, which the handlers take as keyword arguments: a new decoding setting
        # is its field plus its control here. (guide_threshold last: API clients that pass settings by position keep working.)
        controls = dict(strategy=strategy, beam_size=beam_size, max_len=max_len, num_alternatives=num_alternatives,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, guide_threshold=guide_threshold)
        streamed = [caption, current, table, decode_state, cache, api_assessment]  # in Update's order
        inspector = [current, heading, step, prefix, step_info, step_alts, confidence, branch, heatmap]  # in Inspector's order
        page = dict(zip(Inspector._fields, inspector), caption=caption, table=table, decoding=decode_state, cache=cache,
                    labels=cnn_labels, download=download, status=status, photo=image, tree=search_tree, tree_info=tree_info,
                    pick=tree_pick, assessment=assessment)  # the page's outputs by name

        def on_page(fn: Callable[..., Iterator[dict]]) -> Callable[..., Iterator[dict]]:
            """A page handler whose updates name their outputs, as Gradio takes them (keyed by component)."""
            @functools.wraps(fn)
            def run(*args, **kw):
                for update in fn(*args, **kw):
                    yield {page[name]: value for name, value in update.items()}
            return run

        # preprocess=False: the handlers get the upload undecoded and open it themselves (see read_upload)
        common = dict(concurrency_id="decode", show_progress="minimal", preprocess=False, inputs_kwargs=controls)
        private = dict(api_visibility="private")

        # The API: /caption and /branch (streamed; events with no trigger in the page), /caption_files (the tab's button).
        gr.on([], h.caption, [image, cache], streamed, api_name="caption", **common)
        gr.on([], h.branch, [image, api_step, api_word, cache], streamed, api_name="branch", **common)
        # preprocess=False: the handler reads each upload's FileData (gr.File's preprocess would leave an empty
        # temporary file behind for every photo, and its file-type check is open_image's, with the reason named)
        files_btn.click(h.caption_files, [files], [files_table, files_out], api_name="caption_files", concurrency_id="decode",
                        show_progress="full", inputs_kwargs=controls, preprocess=False)

        # The page: a new photo captions itself, on upload, drop or paste, and on picking an example. (Not on .change:
        # Gradio's frontend fires it twice when a photo replaces another, which would run two decodes. A webcam
        # snapshot only fires .change, so there the Caption button does it.) Each clears the previous caption first.
        # The progress shows on the caption alone, not on every output of the page.
        outputs = list(page.values())
        auto = dict(fn=on_page(h.page_caption), inputs=[image, cache], outputs=outputs, trigger_mode="always_last",
                    show_progress_on=[caption], **common, **private)
        gr.on([caption_btn.click, image.upload], **auto)
        image.clear(lambda: {page[k]: v for k, v in h.cleared().items()}, None, outputs, queue=False, **private)
        if examples is not None:
            examples.load_input_event.then(**auto)
        # Branching reads choices the inspector put in this page's session (the API has /branch).
        redecode_btn.click(on_page(h.page_redecode), [decode_state, step, branch, cache, tree_pick, caption], outputs,
                           show_progress_on=[caption], **common, **private)

        # The search tree: a node clicked or tapped (tree.js sends its id) is inspected and picked for Re-decode; a word
        # picked in the inspector afterwards takes its place (Re-decode prefers the picked word).
        def pick_node(decoding: Decoding | None, evt: gr.EventData):
            return {page[name]: value for name, value in h.pick(decoding, (evt._data or {}).get("node")).items()}

        search_tree.click(pick_node, [decode_state], outputs, show_progress="hidden", **private)
        branch.input(lambda: (None, ""), None, [tree_pick, tree_info], queue=False, show_progress="hidden", **private)
        # One selected step: "This step" follows the slider (mouse, arrow keys, a typed number) and Prev / Next.
        # .input fires on the user's changes only, never on the updates these handlers send, so nothing loops.
        # These read the session's decoding; the caption the page shows tells an expired one from none (Handlers.select).
        # preprocess=False: the step number as sent, never Gradio's range check against a slider whose range the
        # session no longer holds ("Value 3 is greater than maximum value 2" after the state was evicted).
        nav = dict(show_progress="hidden", preprocess=False, **private)
        step.input(lambda d, s, c: h.select(d, s, 0, c), [decode_state, step, caption], inspector, trigger_mode="always_last", **nav)
        prev_btn.click(lambda d, s, c: h.select(d, s, -1, c), [decode_state, step, caption], inspector, **nav)
        next_btn.click(lambda d, s, c: h.select(d, s, +1, c), [decode_state, step, caption], inspector, **nav)
        download.click(h.download, [decode_state, caption], download_file, **private).success(
            None, [download_file], None, js=asset("save_download.js"), **private)

    # api_open=False: the /gradio_api/run and /gradio_api/api routes, which would run a decode outside the queue and
    # its limits, refuse every queued event (404); the page, /call and gradio_client all join the queue.
    demo.client_limits = ClientLimits(PER_SESSION, PER_ADDRESS, {"decode"})
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE, api_open=False)
    return demo
