"""Per-word guidance thresholds: how sure the CNN must be before guided decoding requires a word (issue 23, section 1).

The rule (docs/guided.md, "Per-word thresholds"):
- A mapped word w's confidence on a photo, c_w, is the summed probability of the ImageNet classes that map to it
  (captioner.imagenet.word_confidence).
- A photo's references *name* w when one of its five reference captions contains w or another word of a concept that
  lists w (captioner/data/imagenet_words.json: cat names {cat, cats, kitten}; boat names {boat, boats}), as spaCy
  tokens in lower case (captioner.vocab.tokenize, as train.subjects).
- w's threshold is the lowest t on the grid 0.01, 0.02, ..., 1.00 such that, over the train photos with c_w >= t,
  at least PRECISION (90%) have references naming w, and there are at least SUPPORT (5) such photos. A word for
  which no t qualifies is dropped: it has no threshold and is never required.

    python -m train.calibrate --data /work/shared/data/flickr8k --split train --out captioner/data/imagenet_thresholds.json
    python -m train.calibrate --data /work/shared/data/flickr8k --split dev --check

The first writes the thresholds with the numbers behind them; the second measures, on another split, how often a
photo's references name a required word with the calibrated thresholds and with one global threshold (0.25).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

PRECISION = 0.9  # the share of photos at or above the threshold whose references name the word
SUPPORT = 5  # the fewest train photos at or above the threshold
GRID = tuple(round(i / 100, 2) for i in range(1, 101))  # candidate thresholds: whole percentages
# Words that train shows too rarely for SUPPORT photos (Flickr8k has 3 photos where the CNN sees a cat) may still be
# required where the CNN itself is sure (>= THIN_FLOOR) and every train photo at that level names the word.
THIN_SUPPORT, THIN_FLOOR = 2, 0.5


def word_names() -> dict[str, frozenset[str]]:
    """Each mapped word -> the words whose presence in a reference names it: the words of every concept listing it."""
    from captioner.imagenet import concepts

    out: dict[str, set[str]] = {}
    for c in concepts():
        for w in c.words:
            out.setdefault(w, set()).update(c.words)
    return {w: frozenset(ws) for w, ws in out.items()}


def confidences(labels):
    """(N, 1000) ImageNet probabilities -> (words, (N, W) confidences): every mapped word's summed class probability."""
    import torch

    from captioner.imagenet import word_classes

    words = list(word_classes())
    member = torch.zeros(len(words), labels.size(1))
    for j, w in enumerate(words):
        member[j, list(word_classes()[w])] = 1
    return words, labels.float() @ member.T


def reference_words(references: Sequence[Sequence[str]]) -> list[set[str]]:
    """Each photo's reference captions -> the set of their tokens (lower-case spaCy tokens, all five together)."""
    from captioner.vocab import tokenize

    return [set().union(*(tokenize(r) for r in rs)) if rs else set() for rs in references]


def calibrate_word(conf: Sequence[float], named: Sequence[bool], *, precision: float = PRECISION,
                   support: int = SUPPORT, grid: Sequence[float] = GRID) -> dict | None:
    """The lowest t in `grid` at which the photos with conf >= t number at least `support` and at least `precision` of
    them are `named`: {"threshold", "support", "precision"} (the numbers at t), or None when no t qualifies."""
    pairs = sorted(zip((float(c) for c in conf), (bool(n) for n in named)), key=lambda p: -p[0])
    for t in sorted(grid):
        above = [n for c, n in pairs if c >= t]
        if len(above) >= support and sum(above) >= precision * len(above):
            return {"threshold": t, "support": len(above), "precision": round(sum(above) / len(above), 4)}
    return None


def calibrate(labels, references: Sequence[Sequence[str]], *, precision: float = PRECISION, support: int = SUPPORT,
              grid: Sequence[float] = GRID, refs: list[set[str]] | None = None, thin: bool = True) -> dict:
    """Every mapped word's threshold from a split's ImageNet labels (N, 1000) and reference captions: the JSON that
    captioner/data/imagenet_thresholds.json holds ("thresholds": word -> numbers; "dropped": word -> why)."""
    refs = reference_words(references) if refs is None else refs
    words, conf = confidences(labels)
    names = word_names()
    kept, dropped = {}, {}
    for j, w in enumerate(words):
        c = conf[:, j].tolist()
        named = [bool(r & names[w]) for r in refs]
        found = calibrate_word(c, named, precision=precision, support=support, grid=grid)
        if found is None and thin:
            found = calibrate_word(c, named, precision=1.0, support=THIN_SUPPORT, grid=[t for t in grid if t >= THIN_FLOOR])
            if found is not None:
                found["thin"] = True  # too few photos for the main rule: the stricter one
        if found:
            kept[w] = found
        else:  # why: its best precision at any threshold with enough support (None: never enough photos)
            at = [r for t in grid if (r := calibrate_word(c, named, precision=0, support=support, grid=[t]))]
            best = max(at, key=lambda r: (r["precision"], -r["threshold"]), default=None)
            dropped[w] = {"photos": sum(x >= min(grid) for x in c), "best_precision": best and best["precision"],
                          "at": best and best["threshold"]}
    return {"thresholds": kept, "dropped": dropped}


def required_words(conf_row: Sequence[float], words: Sequence[str], thresholds) -> set[str]:
    """The words a photo requires: a float is one global threshold; a dict gives each word its own (absent: never)."""
    if isinstance(thresholds, dict):
        return {w for w, c in zip(words, conf_row) if w in thresholds and c >= thresholds[w]}
    return {w for w, c in zip(words, conf_row) if c >= thresholds}


def check(labels, references: Sequence[Sequence[str]], thresholds: dict[str, float], vocab=None, *,
          global_threshold: float = 0.25, refs: list[set[str]] | None = None) -> dict:
    """On a split (dev): for the calibrated thresholds and the one global threshold, the photos where a word would be
    required and how many of them have a required word in a reference (pooled, and with the stated naming rule:
    a word of the required words' concepts), and per word: photos requiring it, photos naming it.
    `vocab`: count only the words in the model's vocabulary (guided decoding drops the others)."""
    refs = reference_words(references) if refs is None else refs
    words, conf = confidences(labels)
    names = word_names()
    if vocab is not None:
        keep = [j for j, w in enumerate(words) if w in vocab.stoi]
        words, conf = [words[j] for j in keep], conf[:, keep]
    rows = conf.tolist()
    out = {}
    for name, ts in (("global", global_threshold), ("calibrated", thresholds)):
        required = [required_words(r, words, ts) for r in rows]
        some = [i for i, r in enumerate(required) if r]
        exact = sum(bool(refs[i] & required[i]) for i in some)
        named = sum(bool(refs[i] & set().union(*(names[w] for w in required[i]))) for i in some)
        per_word = {}
        for w in words:
            idx = [i for i in some if w in required[i]]
            if idx:
                per_word[w] = [sum(bool(refs[i] & names[w]) for i in idx), len(idx)]
        out[name] = {"photos": len(refs), "required": len(some), "word_in_reference": exact, "named": named,
                     "per_word": per_word}
    return out


def format_check(result: dict, thresholds: dict[str, float], global_threshold: float = 0.25) -> str:
    g, c = result["global"], result["calibrated"]
    pct = lambda a, b: f"{a}/{b} = {a / max(1, b):.1%}"  # noqa: E731
    lines = ["| thresholds | photos with a requirement | a reference has a required word | a reference names one (concept words) |",
             "|---|---|---|---|",
             f"| global {global_threshold:g} | {g['required']} of {g['photos']} | {pct(g['word_in_reference'], g['required'])} "
             f"| {pct(g['named'], g['required'])} |",
             f"| calibrated per word | {c['required']} of {c['photos']} | {pct(c['word_in_reference'], c['required'])} | {pct(c['named'], c['required'])} |",
             "", f"| word | threshold | required at {global_threshold:g}: named | required calibrated: named |", "|---|---|---|---|"]
    names = word_names()
    groups: dict[tuple, list[str]] = {}  # a concept's words share their classes, so their numbers: one row
    for w in set(g["per_word"]) | set(c["per_word"]):
        a, b = g["per_word"].get(w), c["per_word"].get(w)
        groups.setdefault((tuple(a or ()), tuple(b or ()), thresholds.get(w), names[w]), []).append(w)
    for (a, b, t, _), ws in sorted(groups.items(), key=lambda kv: (-(kv[0][0] or (0, 0))[1], -(kv[0][1] or (0, 0))[1], min(kv[1]))):
        lines.append(f"| {'/'.join(sorted(ws))} | {'dropped' if t is None else f'{t:.0%}'} | {pct(*a) if a else '-'} | {pct(*b) if b else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from train.subjects import split_arguments

    p = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__.split("\n\n")[0])
    split_arguments(p, split="train", split_help="calibrate on train; --check on dev")
    p.add_argument("--out", default=None, help="write the thresholds here (JSON), e.g. captioner/data/imagenet_thresholds.json")
    p.add_argument("--precision", type=float, default=PRECISION)
    p.add_argument("--support", type=int, default=SUPPORT)
    p.add_argument("--check", action="store_true",
                   help="measure the shipped (or --thresholds) per-word thresholds against --global-threshold on this split")
    p.add_argument("--thresholds", default=None, help="thresholds JSON for --check (default: the shipped file)")
    p.add_argument("--global-threshold", type=float, default=0.25)
    args = p.parse_args(argv)

    from captioner.imagenet import THRESHOLDS_FILE, load_thresholds
    from captioner.loading import load_model
    from train.data import load_dataset
    from train.subjects import _features

    model = load_model(args.model)
    samples, _ = load_dataset(args.data, splits=(args.split,))
    samples = samples[: args.limit] if args.limit else samples
    references = [s.captions for s in samples]
    labels = _features(model, [s.image for s in samples], args.cache).labels
    if labels is None:
        raise SystemExit("this model has no ImageNet head: nothing to calibrate")
    if args.check:
        thresholds = load_thresholds(args.thresholds or THRESHOLDS_FILE)
        result = check(labels, references, thresholds, model.vocab, global_threshold=args.global_threshold)
        print(format_check(result, thresholds, args.global_threshold))
        return 0
    result = calibrate(labels, references, precision=args.precision, support=args.support)
    data = {"_about": (f"Per-word guide thresholds (python -m train.calibrate, split {args.split}, {len(samples)} photos): "
                       f"the lowest whole percentage t at which at least {args.precision:.0%} of the photos whose word "
                       f"confidence is >= t have a reference naming the word (a word of a concept listing it), with at "
                       f"least {args.support} such photos. Words under 'dropped' never reached it and are never required. "
                       "docs/guided.md gives the rule and the dev check."),
            "split": args.split, "photos": len(samples), "precision": args.precision, "support": args.support, **result}
    text = json.dumps(data, indent=1, sort_keys=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    kept, dropped = result["thresholds"], result["dropped"]
    print(f"{len(kept)} words kept, {len(dropped)} dropped (of {len(kept) + len(dropped)} mapped)")
    for w, r in sorted(kept.items(), key=lambda kv: kv[1]["threshold"]):
        print(f"  {w}: {r['threshold']:.0%} ({r['support']} photos, {r['precision']:.0%} named)")
    print("  dropped: " + ", ".join(sorted(dropped)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
