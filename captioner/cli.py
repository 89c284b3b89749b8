"""Command line: caption images and folders.

    python -m captioner photo.jpg photos/ [--model SRC] [--strategy greedy|beam|sample] [--json] [--steps]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .generation import add_arguments, from_arguments

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


def step_record(s) -> dict:
    """One Step as the JSON the CLI prints."""
    return {"word": s.word, "prob": round(s.prob, 4), "eos_prob": round(s.eos_prob, 4),
            "alternatives": [[a.word, round(a.prob, 4)] for a in s.alternatives]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m captioner", description="Caption images with a CNN+LSTM captioner.")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: $CAPTIONER_MODEL or the bundled model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line, in the order of the inputs")
    p.add_argument("--steps", action="store_true", help="include each step's word, probability and top alternatives")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default: 32)")
    args = p.parse_args(argv)

    from .decode import caption_batch, stream
    from .hub import ModelLoadError
    from .loading import load_model
    from .preprocess import ImageError, open_image

    try:
        settings = from_arguments(args)
        if args.batch_size < 1:
            raise ValueError(f"batch_size={args.batch_size}: expected 1 or more")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = expand(args.images)
    if not files:
        print(f"error: no images found in {', '.join(args.images)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, revision=args.revision)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def report(path, text=None, steps=None, error=None):
        if args.json:
            rec = {"image": path, "caption": text} if error is None else {"image": path, "error": error}
            if steps is not None:
                rec["steps"] = [step_record(s) for s in steps]
            print(json.dumps(rec), flush=True)
        elif error is None:
            print(f"{path}\t{text}", flush=True)
            for s in steps or ():
                alts = ", ".join(f"{a.word} {a.prob:.2f}" for a in s.alternatives)
                print(f"    {s.t + 1:2d}. {s.word:<12} p={s.prob:.2f}  <EOS> {s.eos_prob:.2f}  [{alts}]", flush=True)
        else:
            print(f"{path}\terror: {error}", file=sys.stderr, flush=True)

    # Open every file first: bad ones are reported by name (in their place in the input order) and the rest still
    # get captions.
    opened: list[tuple[str, object, str | None]] = []
    for f in files:
        try:
            opened.append((f, open_image(f), None))
        except ImageError as e:
            opened.append((f, None, str(e).removeprefix(f + ": ")))
    good = [(f, img) for f, img, err in opened if err is None]
    if args.steps:
        results = {}
        for f, img in good:
            last = None
            for last in stream(model, img, settings):
                pass
            steps = last.caption_steps() if last is not None else ()
            results[f] = (last.text if last is not None else "", steps)
    else:
        captions = caption_batch(model, [img for _, img in good], settings, batch_size=args.batch_size)
        results = {f: (text, None) for (f, _), text in zip(good, captions)}
    for f, _, err in opened:
        if err is None:
            report(f, *results[f])
        else:
            report(f, error=err)
    return 1 if any(err for _, _, err in opened) else 0
