"""Command line: caption images and folders.

    python -m captioner photo.jpg photos/ [--model SRC] [--strategy greedy|beam|sample|guided] [--json] [--steps] [--tree]

With a model that keeps its ImageNet head, --steps prints what the CNN sees ("the CNN sees: Egyptian cat 81%, ...")
and --json adds it as "imagenet": [[label, probability], ...]; with --strategy guided, "constraint" says which word
was required and why. --tree (GenerationConfig.tree) adds the search as "tree": [nodes] (docs/search-tree.md); without
--json it prints the search step by step. Every caption says whether its photo is like the ones the model learned
from and how sure it is (captioner.confidence): --json as "familiar" (true/false; null: not known) and "confidence"
(0-1), the plain output as a third column, "[unfamiliar photo: likely wrong]" or "[unsure]", after the caption of such
a photo.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .formatting import decode_record, describe_labels, describe_stop, model_label
from .generation import add_arguments, from_arguments
from .precision import add_precision_argument

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic"}


def expand(paths: list[str]) -> list[str]:
    """Files as given; folders expanded to the images inside (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(str(f) for f in sorted(Path(p).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


class Progress:
    """A one-line progress bar on a terminal: photos done, photos/s, time left. Drawn only where `stream` is a
    terminal (never into a file or a pipe a program reads), redrawn in place, and erased at the end."""

    WIDTH = 24

    def __init__(self, total: int, stream=None, *, enabled: bool = True, clock=None):
        import time

        self.stream = sys.stderr if stream is None else stream
        self.total, self.done = total, 0
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.shown = enabled and total > 1 and self.stream.isatty()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        filled = self.WIDTH * self.done // max(self.total, 1)
        left = f"{(self.total - self.done) / rate:.0f} s left" if self.done else "starting"
        return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} photos  {rate:.1f} photos/s  {left}"

    def update(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.shown:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")  # the results are what stays on the screen
            self.stream.flush()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m captioner", description="Caption images with a CNN+LSTM captioner.")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: $CAPTIONER_MODEL or the bundled model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    add_precision_argument(p)
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line, in the order of the inputs")
    p.add_argument("--steps", action="store_true", help="include each step's word, probability and top alternatives "
                                                         "(and the CNN's top ImageNet labels)")
    p.add_argument("--labels", type=int, default=5, metavar="K",
                   help="ImageNet labels shown per image, for a model with an ImageNet head (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default: 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn on stderr only when it is a terminal)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .hub import ModelLoadError
    from .loading import load_model
    from .preprocess import ImageError, open_image

    try:
        settings = from_arguments(args)
        if args.batch_size < 1:
            raise ValueError(f"batch_size={args.batch_size}: expected 1 or more")
        if args.labels < 0:
            raise ValueError(f"labels={args.labels}: expected 0 or more")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = expand(args.images)
    if not files:
        print(f"error: no images found in {', '.join(args.images)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, revision=args.revision, precision=args.precision)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Open every file first: bad ones are reported by name (in their place in the input order) and the rest still
    # get captions.
    opened: list[tuple[str, object, str | None]] = []
    for f in files:
        try:
            opened.append((f, open_image(f), None))
        except ImageError as e:
            opened.append((f, None, str(e).removeprefix(f + ": ")))
    results = caption_photos(model, [(f, img) for f, img, err in opened if err is None], settings, args)
    for f, _, err in opened:
        if args.json:
            print(json.dumps({"image": f, "error": err} if err else {"image": f, **results[f].record(model, args)}), flush=True)
        elif err is not None:
            print(f"{f}\terror: {err}", file=sys.stderr, flush=True)
        else:
            results[f].print(f, args)
    return 1 if any(err for _, _, err in opened) else 0


@dataclass
class Result:
    """One photo's decode as the CLI reports it: its last Step record (None: no caption), what the CNN sees, the
    constraint (guided), how sure the caption is."""

    last: object
    seen: list | None
    constraint: object
    assessment: object
    tree: bool  # GenerationConfig.tree: the search was recorded

    def record(self, model, args) -> dict:
        """The --json line (formatting.decode_record, as the app's download), less what was not asked for."""
        more = {} if self.seen is None else {"imagenet": [[name, round(p, 4)] for name, p in self.seen]}
        if self.last is None and self.constraint is not None:
            more["constraint"] = self.constraint.record()
        if self.last is None and self.tree:
            more["tree"] = []
        return decode_record(self.last, model=model_label(model, args.model, args.revision), precision=model.precision,
                             assessment=self.assessment, steps=args.steps, tree=self.tree, **more)

    def print(self, path: str, args) -> None:
        """The plain output: the caption (and, with --steps, the details; with --tree, the search step by step)."""
        last, assessment, constraint = self.last, self.assessment, self.constraint
        steps = (last.caption_steps() if last is not None else ()) if args.steps else None
        mark = assessment.mark()
        print(f"{path}\t{last.text if last is not None else ''}" + (f"\t{mark}" if mark else ""), flush=True)
        if steps is not None and assessment.verdict is not None and not assessment.familiar:
            print(f"    {assessment.verdict.sentence()}", flush=True)
        if steps is not None and self.seen:
            print(f"    the CNN sees: {describe_labels(self.seen)}", flush=True)
        if steps is not None and constraint is not None:
            print(f"    {constraint.describe()}", flush=True)
        for s in steps or ():
            alts = ", ".join(f"{a.word} {a.prob:.2f}" for a in s.alternatives)
            print(f"    {s.t + 1:2d}. {s.word:<12} p={s.prob:.2f}  <EOS> {s.eos_prob:.2f}  [{alts}]", flush=True)
        if steps:
            print(f"    stopped: {describe_stop(steps[-1]).replace('`', '')}", flush=True)
        tree = (last.tree if last is not None else ()) if self.tree else None
        for t in sorted({n.t for n in tree or ()}):  # the search, a line per step: "+" on the caption's path
            marks = {"chosen": "+", "kept": "", "finished": "", "pruned": "-", "blocked": "x"}
            line = "  ".join(f"{marks[n.status]}{n.word} {n.score:.2f}" for n in tree if n.t == t)
            print(f"    search {t + 1:2d}: {line}", flush=True)


def caption_photos(model, photos: list[tuple[str, object]], settings, args) -> dict[str, Result]:
    """Each photo's Result, by path: encoder batches of --batch-size (decode.encoded, as caption_batch makes them),
    each batch's features kept for the CNN's labels and the confidence. Every caption takes its records (the
    confidence reads its word probabilities; guided decoding's say whether the constraint was met), not only the text."""
    from .confidence import Assessor, expected_words
    from .decode import caption_batch, encoded
    from .familiarity import degenerate
    from .imagenet import constraint_for, top_labels

    assessor, guided = Assessor.of(model), settings.strategy == "guided"
    results = {}
    bar = Progress(len(photos), enabled=not args.no_progress)
    bar.update(0)
    for start, features in zip(range(0, len(photos), args.batch_size),
                               encoded(model, [img for _, img in photos], args.batch_size)):
        outs = caption_batch(model, config=settings, features=features, batch_size=args.batch_size, steps=True)
        for i, ((f, img), last) in enumerate(zip(photos[start : start + args.batch_size], outs)):
            one = features.select(slice(i, i + 1))
            constraint = last.constraint if last is not None else (
                constraint_for(one, model.vocab, settings.guide_threshold, expected_words(model, one)) if guided else None)
            words = last.caption_steps() if last is not None else ()
            results[f] = Result(last, (top_labels(model, one, args.labels) or None) if args.labels else None,
                                constraint if guided else None, assessor.assess(one, words, rule=degenerate(img), model=model), settings.tree)
        bar.update(len(features))
    bar.close()
    return results
