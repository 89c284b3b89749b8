"""How guided decoding fits a split: the sentence margin, the required word's precision, and what they cost.

    python -m train.guided --data ../shared/data/flickr8k --split dev --margins 0,0.25,0.5,0.75,inf

For every photo where guided decoding requires a word, it decodes the best caption with the word (fit) and the best
without it (free), each with its mean log-probability per word; guided decoding keeps the first only when the second
is at most `guide_margin` likelier. One row per margin: how many constraints are kept, the precision of the required
word (kept captions whose word one of the photo's references has; and whose references have any of the required
words, e.g. "dogs" for "dog"), BLEU-4 / CIDEr-D, rare-subject recall
(train.subjects), and the counts of captions that repeat a phrase or end without a full stop. Greedy and beam search
of the same size are the reference rows. The CNN runs once per photo, from the feature cache.
"""
from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    from captioner.generation import add_arguments, from_arguments
    from train.subjects import split_arguments

    p = argparse.ArgumentParser(prog="python -m train.guided", description=__doc__.split("\n\n")[0])
    split_arguments(p)
    p.add_argument("--margins", default="0,0.25,0.5,0.75,1,inf", help="comma-separated guide_margin values to score")
    add_arguments(p, only=("beam_size", "guide_threshold", "no_repeat_ngram", "block_function_words"))
    args = p.parse_args(argv)

    from dataclasses import replace

    from captioner.confidence import expected_words
    from captioner.decode import caption_batch, final
    from captioner.imagenet import constraint_for
    from captioner.loading import load_model
    from captioner.vocab import tokenize
    from train.data import load_dataset
    from train.evaluate import score
    from train.subjects import _features, recall_row, subject_recall

    settings = replace(from_arguments(args), strategy="guided", num_alternatives=0)
    model = load_model(args.model, precision="fp32")
    samples, _ = load_dataset(args.data, splits=(args.split,))
    samples = samples[: args.limit] if args.limit else samples
    references = [s.captions for s in samples]
    features = _features(model, [s.image for s in samples], args.cache)
    beam, fit, free, words = [], {}, {}, {}  # fit / free: photo -> (caption, mean log-prob per word, the word used)
    for i in range(len(samples)):
        one = features.select(slice(i, i + 1))
        beam.append(final(model, config=replace(settings, strategy="beam"), features=one).text)
        if constraint_for(one, model.vocab, settings.guide_threshold, expected_words(model, one)).words:
            kept = final(model, config=replace(settings, guide_margin=math.inf), features=one)
            c = kept.constraint
            if not c.met:  # no caption could use the word: guided decoding's caption is the best without it
                beam[i] = kept.text
            else:
                fit[i] = (kept.text, c.fit, c.used)
                words[i] = c.words
                if c.free is not None and c.free > c.fit:  # the caption without the word is likelier: decode it
                    free[i] = (final(model, config=replace(settings, guide_margin=0.0), features=one).text, c.free)
                else:  # no margin would drop the word
                    free[i] = (kept.text, c.free)
        print(f"\rphotos: {i + 1}/{len(samples)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    ref_words = [{w for r in refs for w in tokenize(r)} for refs in references]

    def row(name: str, caps: list[str], kept: list[int]) -> str:
        m = score(caps, references)
        named = sum(fit[i][2] in ref_words[i] for i in kept)  # the very word the caption uses
        concept = sum(bool(set(words[i]) & ref_words[i]) for i in kept)  # or another of the required words (dogs)
        precision = f"{named}/{len(kept)} = {named / len(kept):.2f} | {concept / len(kept):.2f}" if kept else "- | -"
        return (f"| {name} | {len(kept)} | {precision} | {m['BLEU-4']:.4f} | {m['CIDEr-D']:.4f} | "
                f"{recall_row(subject_recall(caps, references))} | {m['repeats']} | {m['no_stop']} |")

    print(f"{len(fit)} of {len(samples)} photos get a required word that fits some caption "
          f"(guide_threshold {settings.guide_threshold}, beam {settings.beam_size})")
    print("| decoding | constraints kept | precision of the word | ... or of any required word | BLEU-4 | CIDEr-D | "
          "rare-subject recall | repeats | no stop |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("greedy", caption_batch(model, features=features, config=replace(settings, strategy="greedy")), []))
    print(row(f"beam {settings.beam_size}", beam, []))
    for margin in (float(x) for x in args.margins.split(",")):
        kept = [i for i in fit if free[i][1] is None or free[i][1] - fit[i][1] <= margin]
        caps = [fit[i][0] if i in kept else free[i][0] if i in free else beam[i] for i in range(len(samples))]
        print(row(f"guided, margin {margin:g}", caps, kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
