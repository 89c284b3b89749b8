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
from pathlib import Path

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


def main(argv=None) -> int:
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
    args = p.parse_args(argv)

    from .confidence import Assessor, expected_words
    from .decode import caption_batch, describe_stop
    from .familiarity import degenerate
    from .hub import ModelLoadError
    from .imagenet import constraint_for, describe_labels, labels
    from .loading import load_model
    from .model import device_of
    from .preprocess import ImageError, open_image, preprocess_batch

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
    guided = settings.strategy == "guided"
    assessor = Assessor.of(model)

    def report(path, text=None, steps=None, error=None, seen=None, constraint=None, tree=None, assessment=None):
        if args.json:
            rec = {"image": path, "caption": text} if error is None else {"image": path, "error": error}
            if error is None:
                rec.update(assessment.record())
                rec["precision"] = model.precision
            if steps is not None:
                rec["steps"] = [s.record() for s in steps]
                rec["stop"] = steps[-1].stop if steps else None  # eos | unk | max_len (decode.Step.stop)
                rec["stop_unk_prob"] = steps[-1].stop_unk_prob if steps else None
            if seen is not None:
                rec["imagenet"] = [[name, round(p, 4)] for name, p in seen]
            if constraint is not None:
                rec["constraint"] = constraint.record()
            if tree is not None:
                rec["tree"] = [n.record() for n in tree]
            print(json.dumps(rec), flush=True)
        elif error is None:
            mark = assessment.mark()
            print(f"{path}\t{text}" + (f"\t{mark}" if mark else ""), flush=True)
            if steps is not None and assessment.verdict is not None and not assessment.familiar:
                print(f"    {assessment.verdict.sentence()}", flush=True)
            if steps is not None and seen:
                print(f"    the CNN sees: {describe_labels(seen)}", flush=True)
            if steps is not None and constraint is not None:
                print(f"    {constraint.describe()}", flush=True)
            for s in steps or ():
                alts = ", ".join(f"{a.word} {a.prob:.2f}" for a in s.alternatives)
                print(f"    {s.t + 1:2d}. {s.word:<12} p={s.prob:.2f}  <EOS> {s.eos_prob:.2f}  [{alts}]", flush=True)
            if steps:
                print(f"    stopped: {describe_stop(steps[-1]).replace('`', '')}", flush=True)
            for t in sorted({n.t for n in tree or ()}):  # the search, a line per step: "+" on the caption's path
                marks = {"chosen": "+", "kept": "", "finished": "", "pruned": "-", "blocked": "x"}
                line = "  ".join(f"{marks[n.status]}{n.word} {n.score:.2f}" for n in tree if n.t == t)
                print(f"    search {t + 1:2d}: {line}", flush=True)
        else:
            print(f"{path}\terror: {error}", file=sys.stderr, flush=True)

    def seen_of(features):
        return labels(features, args.labels) if features.labels is not None and args.labels else None

    # Open every file first: bad ones are reported by name (in their place in the input order) and the rest still
    # get captions.
    opened: list[tuple[str, object, str | None]] = []
    for f in files:
        try:
            opened.append((f, open_image(f), None))
        except ImageError as e:
            opened.append((f, None, str(e).removeprefix(f + ": ")))
    good = [(f, img) for f, img, err in opened if err is None]
    # Encoder batches as caption_batch makes them, keeping each batch's features for the CNN's labels. Every caption
    # takes its records (the confidence reads its word probabilities; guided decoding's say whether the constraint was
    # met), not only the text.
    results = {}
    bar = Progress(len(good), enabled=not args.no_progress)
    bar.update(0)
    for start in range(0, len(good), args.batch_size):
        part = good[start : start + args.batch_size]
        features = model.encode(preprocess_batch([img for _, img in part], model.config).to(device_of(model)))
        outs = caption_batch(model, config=settings, features=features, batch_size=args.batch_size, steps=True)
        for i, ((f, img), out) in enumerate(zip(part, outs)):
            one = features.select(slice(i, i + 1))
            constraint = out.constraint if out is not None else (
                constraint_for(one, model.vocab, settings.guide_threshold, expected_words(model, one)) if guided else None)
            words = out.caption_steps() if out is not None else ()
            results[f] = dict(text=out.text if out is not None else "", steps=words if args.steps else None, seen=seen_of(one),
                              constraint=constraint if guided else None,
                              tree=(out.tree if out is not None else ()) if settings.tree else None,
                              assessment=assessor.assess(one, words, rule=degenerate(img)))
        bar.update(len(part))
    bar.close()
    for f, _, err in opened:
        if err is None:
            report(f, **results[f])
        else:
            report(f, error=err)
    return 1 if any(err for _, _, err in opened) else 0
