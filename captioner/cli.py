"""Command line: caption images and folders.

    python -m captioner photo.jpg photos/ [--model SRC] [--strategy greedy|beam|sample] [--json] [--steps]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic"}


def load_model(src=None, *, revision: str | None = None):
    """A model from SRC, else $CAPTIONER_MODEL, else the bundled default; raises ModelLoadError."""
    from .hub import ModelLoadError, load

    src = src or os.environ.get("CAPTIONER_MODEL") or None
    if src is None:
        if not (DEFAULT_MODEL / "model.safetensors").exists():
            raise ModelLoadError(f"the bundled default model is missing from {DEFAULT_MODEL}; pass --model FOLDER_OR_REPO_ID")
        src = DEFAULT_MODEL
    return load(src, revision=revision or os.environ.get("CAPTIONER_REVISION") or None).optimize_for_inference()


def expand(paths: list[str]) -> list[str]:
    """Files as given; folders expanded to the images inside (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(str(f) for f in sorted(Path(p).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m captioner", description="Caption images with a CNN+LSTM captioner.")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: $CAPTIONER_MODEL or the bundled model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "sample"], help="default: greedy (the bundled model's best)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the K most likely words (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability")
    p.add_argument("--seed", type=int, default=None, help="sampling: random seed")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--alternatives", type=int, default=5, help="with --steps: alternatives shown per step")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--steps", action="store_true", help="include each step's word, probability and top alternatives")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    from .decode import caption_batch, stream
    from .hub import ModelLoadError
    from .preprocess import ImageError, open_image

    try:
        model = load_model(args.model, revision=args.revision)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = dict(strategy=args.strategy, beam_size=args.beam_size, length_penalty=args.length_penalty, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_len=args.max_len, no_repeat_ngram=args.no_repeat_ngram)
    try:
        from .decode import _check

        _check(model, args.strategy, args.max_len, args.beam_size, args.temperature, args.top_p, args.top_k, args.alternatives)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = expand(args.images)
    failed = 0

    def report(path, text=None, steps=None, error=None):
        if args.json:
            rec = {"image": path, "caption": text} if error is None else {"image": path, "error": error}
            if steps is not None:
                rec["steps"] = [{"word": s.word, "prob": round(s.prob, 4), "eos_prob": round(s.eos_prob, 4),
                                 "alternatives": [[a.word, round(a.prob, 4)] for a in s.alternatives]} for s in steps]
            print(json.dumps(rec), flush=True)
        elif error is None:
            print(f"{path}\t{text}", flush=True)
            for s in steps or ():
                alts = ", ".join(f"{a.word} {a.prob:.2f}" for a in s.alternatives)
                print(f"    {s.t + 1:2d}. {s.word:<12} p={s.prob:.2f}  <EOS> {s.eos_prob:.2f}  [{alts}]", flush=True)
        else:
            print(f"{path}\terror: {error}", file=sys.stderr, flush=True)

    # Open every file first: bad ones are reported by name and the rest still get captions.
    good = []
    for f in files:
        try:
            good.append((f, open_image(f)))
        except ImageError as e:
            failed += 1
            report(f, error=str(e).removeprefix(f + ": "))
    if args.steps:
        for f, img in good:
            steps = list(stream(model, img, num_alternatives=args.alternatives, **settings))
            report(f, steps[-1].text if steps else "", steps)
    else:
        captions = caption_batch(model, [img for _, img in good], batch_size=args.batch_size, **settings)
        for (f, _), text in zip(good, captions):
            report(f, text)
    return 1 if failed else 0
