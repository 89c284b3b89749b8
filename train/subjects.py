"""Subject recall: does a caption name the subject that every human reference names?

The rule, fixed before any guided caption was measured (docs/guided.md):
- Subjects are the concrete nouns issue 15 lists as ones Flickr8k shows rarely (RARE), each with the words that name
  it: its singular and plural and the synonyms Flickr8k's captions use for it. DOG, Flickr8k's most common
  subject, is reported beside them as a control (guidance must not hurt what the model already names).
- A photo counts for a subject when all five of its reference captions contain one of the subject's words; its
  caption names the subject when it contains one of them (spaCy tokens, lower case, as everywhere in this project).
- Rare-subject recall is pooled over (photo, subject) pairs of the rare subjects.

    python -m train.subjects --data /work/shared/data/flickr8k --split dev --thresholds 0.25,0.5 --out /tmp/guided.json
    python -m train.subjects --data /work/shared/data/flickr8k --split train --review --thresholds 0.2,0.25,0.3,0.5

captions every photo of the split once per decoding (the CNN once, from a feature cache), scores them
(train.evaluate.score: BLEU-4, CIDEr-D, distinct) and prints one table with subject recall.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

RARE: dict[str, frozenset[str]] = {
    "cat": frozenset({"cat", "cats", "kitten", "kittens"}),
    "horse": frozenset({"horse", "horses", "pony", "ponies"}),
    "bird": frozenset({"bird", "birds"}),
    "boat": frozenset({"boat", "boats", "canoe", "canoes", "kayak", "kayaks", "sailboat", "sailboats", "raft", "rafts", "ship"}),
    "car": frozenset({"car", "cars"}),
    "ball": frozenset({"ball", "balls"}),
    "guitar": frozenset({"guitar", "guitars"}),
    "motorcycle": frozenset({"motorcycle", "motorcycles", "motorbike", "motorbikes"}),
    "bicycle": frozenset({"bicycle", "bicycles", "bike", "bikes"}),
    "sheep": frozenset({"sheep", "lamb", "lambs"}),
    "cow": frozenset({"cow", "cows", "cattle", "bull", "bulls"}),
}
CONTROL: dict[str, frozenset[str]] = {"dog": frozenset({"dog", "dogs", "puppy", "puppies"})}


def _words(text: str) -> set[str]:
    from captioner.vocab import tokenize

    return set(tokenize(text))


def subject_photos(references: Sequence[Sequence[str]], subjects: dict[str, frozenset[str]]) -> dict[str, list[int]]:
    """subject -> indices of the photos all of whose reference captions name it."""
    refs = [[_words(r) for r in rs] for rs in references]
    return {s: [i for i, rs in enumerate(refs) if rs and all(r & words for r in rs)] for s, words in subjects.items()}


def subject_recall(captions: Sequence[str], references: Sequence[Sequence[str]],
                   subjects: dict[str, frozenset[str]] | None = None) -> dict[str, tuple[int, int]]:
    """subject -> (photos whose caption names it, photos that count for it); "rare" pools the RARE subjects."""
    subjects = subjects if subjects is not None else {**RARE, **CONTROL}
    photos = subject_photos(references, subjects)
    words = [_words(c) for c in captions]
    out = {s: (sum(bool(words[i] & subjects[s]) for i in idx), len(idx)) for s, idx in photos.items()}
    rare = [out[s] for s in out if s in RARE]
    out["rare"] = (sum(n for n, _ in rare), sum(t for _, t in rare))
    return out


def review_mapping(labels, references: Sequence[Sequence[str]], *, top1: float = 0.3, min_photos: int = 3) -> str:
    """How the class -> word mapping (captioner/data/imagenet_words.json) agrees with human captions, on photos other
    than the ones measured (the train split): for each mapped class that is some photo's top label (p >= top1),
    the share of those photos whose references name one of the words it maps to (any of the five); and for each
    rare subject, the top labels of its photos (all five references name it) with what they map to. labels: (N, 1000)."""
    from captioner.imagenet import class_names, concepts

    names = class_names()
    refs = [set().union(*(_words(r) for r in rs)) for rs in references]
    p, top = labels.max(1)
    words_of: dict[int, set[str]] = {}
    for c in concepts():
        for k in c.classes:
            words_of.setdefault(k, set()).update(c.words)
    lines = ["class | photos (top label) | references name a mapped word", "---|---|---"]
    for k in sorted(words_of):
        idx = [i for i in range(len(refs)) if int(top[i]) == k and float(p[i]) >= top1]
        if len(idx) >= min_photos:
            agree = sum(bool(refs[i] & words_of[k]) for i in idx)
            lines.append(f"{names[k]} -> {'/'.join(sorted(words_of[k]))} | {len(idx)} | {agree / len(idx):.0%}")
    lines += ["", "subject | photos | their top labels (-> mapped words)", "---|---|---"]
    for subject, idx in subject_photos(references, RARE).items():
        counts: dict[int, int] = {}
        for i in idx:
            counts[int(top[i])] = counts.get(int(top[i]), 0) + 1
        common = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        shown = ", ".join(f"{names[k]} {n} (-> {'/'.join(sorted(words_of.get(k, ()))) or 'nothing'})" for k, n in common)
        lines.append(f"{subject} | {len(idx)} | {shown}")
    return "\n".join(lines)


def threshold_precision(labels, references: Sequence[Sequence[str]], vocab, thresholds: Sequence[float]) -> str:
    """For each guide_threshold: how many photos get a requirement, and for how many of them a reference names a
    required word (the requirement's precision); also without the photos whose only requirement is "dog"."""
    import torch

    from captioner.imagenet import word_classes

    refs = [set().union(*(_words(r) for r in rs)) for rs in references]
    mapped = {w: cs for w, cs in word_classes().items() if w in vocab.stoi}
    words = list(mapped)
    member = torch.zeros(len(words), labels.size(1))
    for j, w in enumerate(words):
        member[j, list(mapped[w])] = 1
    conf = labels.float() @ member.T  # (N, words): each word's summed class probability
    dog = {"dog", "dogs", "puppy"}
    lines = ["guide_threshold | photos with a requirement | references name a required word | the same, less dog-only",
             "---|---|---|---"]
    for t in thresholds:
        required = [{words[j] for j in (row >= t).nonzero().flatten().tolist()} for row in conf]
        some = [i for i, r in enumerate(required) if r]
        other = [i for i in some if not required[i] <= dog]
        hit = lambda idx: sum(bool(refs[i] & required[i]) for i in idx) / max(1, len(idx))  # noqa: E731
        lines.append(f"{t:g} | {len(some)} of {len(refs)} | {hit(some):.1%} | {hit(other):.1%} of {len(other)}")
    return "\n".join(lines)


def recall_row(recall: dict[str, tuple[int, int]]) -> str:
    named, total = recall["rare"]
    return f"{named}/{total} = {named / max(1, total):.1%}"


def split_arguments(p: argparse.ArgumentParser, *, split: str = "dev", cache: str = ".cache/features",
                    split_help: str | None = None) -> None:
    """The flags of the commands that read one split's photos through the feature cache (subjects, calibrate,
    guided)."""
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=split, help=split_help)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--cache", default=cache, help="backbone feature cache folder")


def _features(model, images: list[str], cache_dir: str):
    """Every photo's ImageFeatures (eval mode: with ImageNet labels when the model has the head), the backbone run
    once per photo and cached."""
    import torch

    from train.features import extract_features

    pooled = extract_features(model, images, cache_dir)  # (N, F)
    with torch.inference_mode():
        return model.encoder.eval().from_backbone(pooled.float())


def main(argv=None) -> int:
    from captioner.generation import GenerationConfig
    from train.evaluate import score

    p = argparse.ArgumentParser(prog="python -m train.subjects", description=__doc__.split("\n\n")[0])
    split_arguments(p, cache="/tmp/captioner-features")
    p.add_argument("--decodings", default="greedy,beam3,guided1,guided3",
                   help="comma-separated: greedy, beamN, guidedN (guided with beam size N)")
    p.add_argument("--thresholds", default="0.5", help="comma-separated guide_threshold values for the guided rows")
    p.add_argument("--review", action="store_true",
                   help="review the class->word mapping and the threshold's precision on this split (use train), no decoding")
    p.add_argument("--out", default=None, help="write captions and metrics as JSON here (reused: decodings already in it are not rerun)")
    args = p.parse_args(argv)

    from captioner.decode import caption
    from captioner.imagenet import constraint_for
    from captioner.loading import load_model
    from train.data import load_dataset

    model = load_model(args.model)
    samples, _ = load_dataset(args.data, splits=(args.split,))
    samples = samples[: args.limit] if args.limit else samples
    images = [s.image for s in samples]
    references = [s.captions for s in samples]
    features = _features(model, images, args.cache)
    if args.review:
        print(review_mapping(features.labels, references))
        print()
        print(threshold_precision(features.labels, references, model.vocab, [float(x) for x in args.thresholds.split(",")]))
        return 0
    saved = {}
    if args.out:
        try:
            with open(args.out, encoding="utf-8") as f:
                saved = json.load(f).get("captions", {})
        except FileNotFoundError:
            pass
    captions: dict[str, list[str]] = {}
    memo: dict[tuple, str] = {}  # (beam size, photo, required words) -> guided caption: thresholds share most of them

    def decode_all(name: str, config: GenerationConfig, base=None) -> list[str]:
        if name in saved and len(saved[name]) == len(images):
            return saved[name]
        out = []
        for i in range(len(images)):
            one = features.select(slice(i, i + 1))
            key = None
            if config.strategy == "guided":
                key = (config.beam_size, i, constraint_for(one, model.vocab, config.guide_threshold).words)
                if not key[2] and base is not None:
                    out.append(base[i])  # nothing required: guided decoding is the unguided search itself
                    continue
            if key not in memo or key is None:
                text = caption(model, config=config, features=one)
                if key is None:
                    out.append(text)
                    continue
                memo[key] = text
            out.append(memo[key])
            print(f"\r{name}: {i + 1}/{len(images)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return out

    for d in args.decodings.split(","):
        if d == "greedy":
            from captioner.decode import caption_batch

            captions[d] = saved.get(d) or caption_batch(model, features=features, strategy="greedy")
        elif d.startswith("beam"):
            captions[d] = decode_all(d, GenerationConfig(strategy="beam", beam_size=int(d[4:]), num_alternatives=0))
        elif d.startswith("guided"):
            size = int(d[6:])
            # Where no word is required guided decoding is beam search of the same size (greedy for size 1): reuse it.
            base_name = "greedy" if size == 1 else f"beam{size}"
            base = captions.get(base_name) or saved.get(base_name)
            for t in (float(x) for x in args.thresholds.split(",")):
                config = GenerationConfig(strategy="guided", beam_size=size, guide_threshold=t, num_alternatives=0)
                captions[f"{d}@{t:g}"] = decode_all(f"{d}@{t:g}", config, base)
        else:
            raise SystemExit(f"unknown decoding {d!r}")
        if args.out:  # save as we go: the next run reuses what is done
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"captions": {**saved, **captions}}, f)

    rows = {}
    for name, caps in captions.items():
        metrics = score(caps, references)
        recall = subject_recall(caps, references)
        rows[name] = {"BLEU-4": metrics["BLEU-4"], "CIDEr-D": metrics["CIDEr-D"], "distinct": metrics["distinct"],
                      "cut_off": metrics["cut_off"], "recall": {k: list(v) for k, v in recall.items()}}
    subjects = [s for s in (*RARE, *CONTROL)]
    print("| decoding | BLEU-4 | CIDEr-D | distinct | cut off | rare-subject recall | " + " | ".join(subjects) + " |")
    print("|---" * (6 + len(subjects)) + "|")
    for name, r in rows.items():
        rec = {k: tuple(v) for k, v in r["recall"].items()}
        print(f"| {name} | {r['BLEU-4']:.3f} | {r['CIDEr-D']:.3f} | {r['distinct']:.3f} | {r['cut_off']} | {recall_row(rec)} | "
              + " | ".join(f"{rec[s][0]}/{rec[s][1]}" for s in subjects) + " |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"captions": {**saved, **captions}, "metrics": rows, "images": images}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
