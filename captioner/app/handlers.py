"""The app's event handlers: one function per event, the same one for the page and the API.

Each decoding event (`caption`, `branch`, `redecode`) streams Updates (views.Update: the caption, this step's words,
the history, and at the end the finished Decoding); the API sends those as they are, and the page gets them through
views.on_page, which turns them into updates of its outputs. The rest answer one control each: `select` (the step
slider, Prev / Next), `pick` (a node of the search tree), `download`, `caption_files` (the "Several photos" tab).

A decoding setting's path: the controls arrive as keyword arguments named after GenerationConfig's fields ->
`Handlers.settings` -> captioner.setting_values.settings_from (GenerationConfig and its served LIMITS, a ValueError
for a bad value) -> back here as a GenerationConfig -> `_decode` -> turns.FairShare.steps runs each step of
decode.stream in a CPU turn. No call returns to a module it has left.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Sequence

import gradio as gr
import torch

from .. import tree_view
from ..confidence import Assessor, expected_words
from ..decode import SearchStep, Step, caption_batch, encode, stream
from ..familiarity import degenerate
from ..formatting import decode_record
from ..generation import GenerationConfig
from ..imagenet import labels as imagenet_top_classes
from ..model import device_of
from ..preprocess import ImageError, encoder_view, open_image, to_tensor
from ..setting_values import settings_from, shown, whole_number
from . import downloads, limits
from .errors import EXPIRED, PhotoError, bad_setting, user_error
from .session import PHOTO_MAX_SIDE, Decoding, ImageCache, Photo
from .turns import FairShare, Job, cpu_slots
from .views import FILES_HEADERS, Inspector, Update, familiar_cell, history_table, inspect, step_index, top_words

FILES_BATCH = 8  # photos of a "Several photos" request encoded together
WORD_DELAY = 0.04  # seconds between streamed words: a word decodes in a few ms, so unpaced the caption lands at once
NUM_CNN_CLASSES = 5  # ImageNet classes shown under "The CNN sees"
# The app's decoding defaults: guided decoding, which on dev scored level with greedy and named more of the subjects
# that the CNN is sure of (docs/guided.md); for a model without an ImageNet head it is plain beam search. The library
# and the CLI keep GenerationConfig's own defaults (greedy), the reference for evaluation.
APP_DEFAULTS = GenerationConfig(strategy="guided")


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
        """The controls' values (`**controls`, by GenerationConfig field) -> the request's settings: the app's defaults
        (the model's own max_len) with them, within the served limits; a bad value is the user's error, named."""
        try:
            return settings_from(controls, replace(APP_DEFAULTS, max_len=self.model.config.max_len))
        except ValueError as e:
            raise bad_setting(e) from None

    # --- the session's encoded photo (its gr.State "cache") ---

    def image_cache(self, image, cache: ImageCache | None, job: Job | None = None) -> ImageCache:
        """The session's encoded photo (ImageCache) for `image` (an upload, a path or a PIL image): `cache` itself
        when it holds that image, else the photo opened and run through the encoder.
        The photo is read and decoded once; the encoder's input and the heatmaps' base are both made from it, in
        one CPU turn of `job`."""
        if image is None:
            raise user_error("No image yet: drop a photo on the image box, upload or paste one, or pick an example.", "No image")
        data, name = limits.read_upload(image)
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
            cnn_sees = None if features.labels is None else tuple(imagenet_top_classes(features, NUM_CNN_CLASSES))
            return ImageCache(key, features, cnn_sees, Photo.of(encoder_view(img, config, PHOTO_MAX_SIDE)) if self.uses_grid else None,
                              rule=degenerate(img))

    # --- decoding, streamed: the API's outputs (caption, words, history) and the states ---

    def _stream(self, cache: ImageCache, settings: GenerationConfig, job: Job, prefix: Sequence[int] = ()) -> Iterator[Step]:
        """decode.stream's records, each computed in a CPU turn of `job` (guided decoding's requirement for the photo
        first, in a turn of its own: it runs the model's word probe once per photo)."""
        try:
            with self.turns.turn(job):
                constraint = cache.constraint(self.model.vocab, settings.guide_threshold, expected_words(self.model, cache.features)) \
                    if settings.strategy == "guided" else None
            yield from self.turns.steps(job, stream(self.model, config=settings, features=cache.features, prefix=prefix,
                                                    constraint=constraint))
        except ValueError as e:  # a setting out of range (decode.stream says which and why)
            raise user_error(str(e), "Bad decoding setting") from None

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
                assessment = self.assessor.assess(cache.features, rows, rule=cache.rule, model=self.model)
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

    def caption(self, image, cache: ImageCache | None = None, *, tree: tree_view.Growing | None = None, **controls) -> Iterator[Update]:
        """/caption, and the page's Caption button, upload, paste and example: stream the caption of `image` word by
        word (`tree`: the page's, where the search is recorded as it grows)."""
        settings = self.settings(**controls)
        with self.turns.request() as job:
            yield from self._decode(self.image_cache(image, cache, job), settings, job, tree=tree)

    def redecode(self, decoding: Decoding | None, step_number, choice, cache: ImageCache | None = None, node=None,
                 shown_caption: str = "", *, tree: tree_view.Growing | None = None, **controls) -> Iterator[Update]:
        """Branch: force the inspected step's word to `choice` (a token id), keep the words before it, and
        decode the rest again from the cached image features. With no word picked but a `node` of the search tree
        picked (its id), continue from that node's hypothesis instead: its words are forced. `shown_caption`: the
        caption the page shows (with no decoding in the session, it has expired). The page's Re-decode from here; a
        request that cannot be done changes nothing on the page (views.on_page with clear_first=False)."""
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
        t = step_index(decoding, step_number)
        try:
            choice = whole_number("word id", choice, f"one of step {t + 1}'s alternatives")
        except ValueError as e:
            raise user_error(str(e)) from None
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
        return dict(**inspect(decoding, n.t + 1)._asdict(), pick=n.id,
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
            yield from self._branch(self.image_cache(image, cache, job), settings, step, token, job)

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

    # --- the download, the selected step ("This step" and the inspector show the same one) ---

    def download(self, decoding: Decoding | None, shown_caption: str = "") -> str:
        """Download decoding (JSON): the file is written when it is asked for, not after every caption."""
        if not decoding:
            raise gr.Error(EXPIRED if shown_caption else "Caption an image first, then download its decoding.",
                           title="Caption expired" if shown_caption else "No caption", print_exception=False)
        record = decode_record(decoding.steps[-1], model=self.model_id, precision=self.model.precision,
                               assessment=decoding.assessment, settings=asdict(decoding.settings), prefix=list(decoding.prefix))
        return downloads.write_download("decoding.json", json.dumps(record, indent=1))

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
        view = inspect(decoding, n)
        return view._replace(slider=gr.skip()) if decoding and not delta and step_index(decoding, n) + 1 == n else view

    # --- several photos at once ---

    def caption_files(self, files, progress=gr.Progress(), **controls) -> tuple[dict, list[str] | None]:
        """/caption_files: caption several images. Returns the table (image, caption, error: a bad file is named with
        its reason and the rest still get captions, as the CLI does) and the same as captions.csv and captions.json.
        `progress` (Gradio fills it in) shows photo by photo how many are captioned."""
        if not files:
            raise gr.Error("No photos yet: choose or drop several image files first.", title="No photos", print_exception=False)
        if len(files) > limits.MAX_FILES:
            raise gr.Error(f"{len(files)} files: at most {limits.MAX_FILES} at a time here (the command line takes any number)",
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
        budget = limits.REQUEST_PIXELS

        def caption_batch_of_photos():
            if not batch:
                return
            try:
                with self.turns.turn(job):
                    features = self.model.encode(torch.stack([x for _, x, _ in batch]).to(device_of(self.model)))
                    # the records, not only the text: the confidence reads the caption's word probabilities
                    lasts = caption_batch(self.model, config=settings, features=features, steps=True)
                    assessed = [self.assessor.assess(features.select(slice(i, i + 1)), last.caption_steps() if last else (),
                                                     rule=rule, model=self.model) for i, (last, (_, _, rule)) in enumerate(zip(lasts, batch))]
            except ValueError as e:
                raise user_error(str(e), "Bad decoding setting") from None
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
            pixels = limits.header_pixels(path)
            if pixels > budget:
                rec["error"] = (f"over this request's limit of {limits.REQUEST_PIXELS // 1_000_000} megapixels in all; "
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
        folder = Path(downloads.write_download("captions.csv", out.getvalue())).parent
        (folder / "captions.json").write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
        return {"headers": FILES_HEADERS, "data": rows}, [str(folder / "captions.csv"), str(folder / "captions.json")]
