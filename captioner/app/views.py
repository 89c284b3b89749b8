"""Views: a decode's records (decode.Step) as the page shows them: tables, highlighted words, heatmaps, the
inspector at a step, the search tree, the JSON download, and a handler's Updates as updates of the page's outputs.

Nothing here computes model output or keeps state: each function turns records into what a component shows.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import gradio as gr

from .. import tree_view
from ..decode import Step, describe_stop
from ..heatmap import attention_overlay
from ..imagenet import describe_labels, percent
from .errors import PhotoError
from .session import Decoding, ImageCache, Photo

TABLE_HEADERS = ["#", "word", "p", "p(<EOS>)", "alternatives (p)"]
FILES_HEADERS = ["image", "caption", "familiar", "confidence", "error"]
CONFIDENCE = {  # HighlightedText categories of per-word probability, most confident first
    "confident (≥ 50%)": (0.5, "#86efac"),
    "unsure (20–50%)": (0.2, "#fde68a"),
    "guess (< 20%)": (0.0, "#fca5a5"),
}
INSPECTOR_EMPTY = "Caption an image, then step through its decoding here."
STEP_HEADING = "**This step:** the words the model weighed"
HEATMAP_LABEL = "Where it looked"
# The search tree grows with the caption, redrawn whole (about 400 bytes a node) at every search step while it has up
# to TREE_EVERY_STEP nodes; a larger one at most every TREE_REDRAW seconds per TREE_EVERY_STEP nodes. Guided beam 10
# over 60 words is about 3,400 nodes (1.3 MB): redrawn at all 60 steps it sent 39 MB, and the browser, which takes
# a few hundred ms to draw it once, fell seconds behind (benchmarks/tree.py, docs/search-tree.md).
TREE_EVERY_STEP = 300
TREE_REDRAW = 0.25


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


def cnn_sees_markdown(cache: ImageCache | None) -> str:
    """What the CNN sees in the session's photo, as one line beside the caption ("" before a photo, or without an
    ImageNet head: then the line is hidden)."""
    return f"**The CNN sees:** {describe_labels(cache.cnn_sees)}" if cache and cache.cnn_sees else ""


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


def familiar_cell(familiar: bool | None) -> str:
    """The several-photos table's "familiar" column: yes, no (an unfamiliar photo: its caption is likely wrong) or
    blank (not known: a model without familiarity statistics, or no caption)."""
    return "" if familiar is None else "yes" if familiar else "no"


def step_index(decoding: Decoding, step_number) -> int:
    """A step number as sent (1-based, any number) -> the index of a step of `decoding`, clamped."""
    try:
        t = int(round(float(step_number))) - 1
    except (TypeError, ValueError, OverflowError):
        t = 0
    return min(max(t, 0), len(decoding.steps) - 1)


def inspect(decoding: Decoding | None, step_number=1) -> Inspector:
    """Step `step_number` (1-based, clamped) selected: "This step" (its words and heading) and the inspector
    (slider, prefix, chosen word and <EOS> probability, alternatives, confidence-coloured caption, branch choices)."""
    if not decoding:
        return Inspector(None, STEP_HEADING, gr.Slider(minimum=1, maximum=2, value=1, interactive=False), "",
                         INSPECTOR_EMPTY, None, None, gr.Radio(choices=[], value=None), heatmap_view(None, None))
    steps = decoding.steps
    t = step_index(decoding, step_number)
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


def cleared() -> dict:
    """The page with nothing from an earlier caption: no caption, CNN classes, history, inspector, download or message."""
    return dict(caption="", table=history_table([]), decoding=None, cnn_sees="", **inspect(None)._asdict(),
                download=gr.update(interactive=False), status=gr.update(value="", visible=False),
                tree=tree_view.render(None), tree_info="", pick=None, assessment=assessment_markdown(None))


def finished(decoding: Decoding) -> dict:
    """After a decode: "This step" and the inspector at its focus step, and the download offered."""
    return dict(**inspect(decoding, decoding.focus + 1)._asdict(), download=gr.update(interactive=True),
                tree=tree_html(decoding), tree_info="", pick=None)


def tree_html(decoding: Decoding) -> str:
    """The finished search, drawn (tree_view.render): guided decoding's note says what was required and how it ended."""
    constraint = decoding.steps[-1].constraint if decoding.steps else None
    return tree_view.render(decoding.tree, required=constraint.words if constraint else (),
                            note=constraint.describe() if constraint is not None else "")


def page_updates(updates: Iterator[Update], *, clear_first: bool, tree: tree_view.Growing | None = None) -> Iterator[dict]:
    """A decode's updates as page updates. The page is cleared first (`clear_first`: before the work starts, so a
    failure leaves nothing stale behind; else with the first word, after the request was checked); the first word
    brings what the CNN sees; the last selects the focus step and offers the download. A failure is said beside the
    caption (and in a warning), not as an error badge over it; an unreadable photo is taken out of the photo box."""
    try:
        if clear_first:
            yield cleared()
        first = True
        drawn, drawn_at = 0, 0.0  # the tree's nodes drawn so far, and when
        for u in updates:
            out = dict(caption=u.caption, table=u.table, current=u.words)
            if first:
                out = {**({} if clear_first else cleared()), **out, "cnn_sees": cnn_sees_markdown(u.cache)}
            if tree is not None and len(tree.nodes) != drawn and u.decoding is None and (
                    time.monotonic() - drawn_at >= TREE_REDRAW * (len(tree.nodes) // TREE_EVERY_STEP)):
                out["tree"], drawn, drawn_at = tree.view(), len(tree.nodes), time.monotonic()  # it grew: draw it again
            if u.decoding is not None:
                out.update(decoding=u.decoding, cache=u.cache, assessment=assessment_markdown(u.decoding),
                           **finished(u.decoding))
            first = False
            yield out
    except gr.Error as e:
        gr.Warning(e.message, title=e.title)
        yield dict(status=gr.update(value=f"**{e.title}:** {e.message}", visible=True), **({"photo": None} if isinstance(e, PhotoError) else {}))


def on_page(handler: Callable[..., Iterator[Update]], *, clear_first: bool) -> Callable[..., Iterator[dict]]:
    """The page's event of one handler (the same function the API's endpoint runs): its Updates as page updates by
    output name (page_updates), its search recorded as a tree that grows on the page (the handler's `tree`). A new
    photo's event clears the page first (`clear_first`); a re-decode changes nothing until it has a word to show."""
    @functools.wraps(handler)
    def run(*args, **kw) -> Iterator[dict]:
        tree = tree_view.Growing()
        yield from page_updates(handler(*args, tree=tree, **kw), clear_first=clear_first, tree=tree)
    return run
