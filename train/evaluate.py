"""Corpus-level caption metrics with pycocoevalcap (BLEU-1..4, CIDEr-D, ROUGE-L), for any model on any split.

References and hypotheses are tokenised the same way (spaCy, lower-case, punctuation dropped as the
coco-caption PTB tokenizer does), so "t-shirt" scores the same on both sides.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from captioner.vocab import is_cut_off, tokenize

# The punctuation coco-caption's PTBTokenizer removes.
PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")"}


def score_tokens(text: str) -> str:
    return " ".join(w for w in tokenize(text) if w not in PUNCT)


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus-level scores of hypotheses[i] against references[i] (all references of image i)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    res = {i: [score_tokens(h) or "<empty>"] for i, h in enumerate(hypotheses)}
    gts = {i: [score_tokens(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)  # coco-caption's Cider is CIDEr-D (clipping + length penalty)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out.update({"CIDEr-D": float(cider), "ROUGE-L": float(rouge)})
    out["distinct"] = len(set(hypotheses)) / max(1, len(hypotheses))  # share of distinct captions (collapse check)
    out["cut_off"] = sum(map(is_cut_off, hypotheses))  # captions that end mid-phrase ("... in front of a")
    out["repeats"] = sum(map(repeats_a_phrase, hypotheses))
    out["no_stop"] = sum(not h.rstrip().endswith(".") for h in hypotheses)  # captions without a final full stop
    return out


def repeats_a_phrase(text: str) -> bool:
    """Does the caption say the same "a/an/the + word" twice ("a man is riding a skateboard on a skateboard")?"""
    words = tokenize(text)
    pairs = [(a, b) for a, b in zip(words, words[1:]) if a in ("a", "an", "the") and b not in PUNCT]
    return len(pairs) != len(set(pairs))


def evaluate_model(model, images=None, references=(), config=None, *, features=None, batch_size: int = 64,
                   **settings) -> tuple[dict, list[str]]:
    """Caption `images` (or batched ImageFeatures) and score them; returns (metrics, captions)."""
    from captioner.decode import caption_batch

    captions = caption_batch(model, images, config, features=features, batch_size=batch_size, **settings)
    return score(captions, references), captions


def format_table(rows: dict[str, dict]) -> str:
    """Scores as a Markdown table; the counts: captions ending on a/of/in/... (cut off), saying "a/an/the + word"
    twice (repeats), without a final full stop (no stop); absent from older runs: -."""
    cols = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "ROUGE-L", "distinct", "cut off", "repeats", "no stop"]
    counts = {"cut off": "cut_off", "repeats": "repeats", "no stop": "no_stop"}
    cell = lambda m, c: (str(m.get(counts[c], "-"))) if c in counts else f"{m[c]:.3f}"  # noqa: E731
    lines = ["| decoding | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(m, c) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from captioner.generation import add_arguments, from_arguments

    p = argparse.ArgumentParser(prog="python -m train.evaluate", description="Score a captioner on a dataset split.")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("--revision", default=None)
    p.add_argument("--data", required=True, help="dataset folder (or Karpathy/COCO JSON)")
    p.add_argument("--format", default=None, help="flickr8k | flickr8k-token | karpathy | coco (default: detect)")
    p.add_argument("--images", default=None, help="image folder, for the JSON formats")
    p.add_argument("--split", default="dev")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="fp32",
                   help="number format to score the model at (default: fp32, the model's own scores; auto: what the app "
                        "and the CLI run on this CPU)")
    add_arguments(p, only=("strategy", "beam_size", "length_penalty", "guide_threshold", "guide_margin", "no_repeat_ngram",
                           "block_function_words", "max_len", "temperature", "top_k", "top_p", "seed"))
    p.add_argument("--limit", type=int, default=0, help="score only the first N images")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--save-captions", default=None, metavar="FILE",
                   help="also write {image file name: caption} as JSON (to compare two models or two code versions)")
    args = p.parse_args(argv)

    from captioner.hub import ModelLoadError
    from captioner.loading import load_model
    from train.data import load_dataset

    try:
        settings = from_arguments(args)
        model = load_model(args.model, revision=args.revision, precision=args.precision)
        samples, report = load_dataset(args.data, fmt=args.format, image_root=args.images, splits=(args.split,))
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        samples = samples[: args.limit]
    print(f"{len(samples)} images in split {args.split!r}; skipped: {report}; precision: {model.precision}", file=sys.stderr)
    metrics, captions = evaluate_model(model, [s.image for s in samples], [s.captions for s in samples], settings)
    if args.save_captions:
        import os

        named = {os.path.basename(s.image): c for s, c in zip(samples, captions)}
        with open(args.save_captions, "w", encoding="utf-8") as f:
            json.dump(named, f, indent=0, sort_keys=True)
    print(json.dumps(metrics) if args.json else format_table({settings.strategy: metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
