"""What the CNN sees: the backbone's own ImageNet labels, and the caption words they vouch for.

A model saved with its backbone's ImageNet head (config.imagenet_head) gives every image its 1000 ImageNet class
probabilities with its features (`ImageFeatures.labels`, one small matrix product on the pooled feature).
This module names them (`top_labels`: "Egyptian cat 81%, tiger cat 8%, ...") and turns the confident ones into a
decoding constraint for guided decoding (`constraint_for`): the caption must use one of the words that the
confident labels map to. The class names and the class -> word mapping are data in captioner/data/ (no
torchvision at run time); captioner/data/README.md gives the mapping's reasoning.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .formatting import describe_labels, percent

DATA = Path(__file__).resolve().parent / "data"
CLASSES_FILE = DATA / "imagenet_classes.json"
WORDS_FILE = DATA / "imagenet_words.json"
THRESHOLDS_FILE = DATA / "imagenet_thresholds.json"
NUM_CLASSES = 1000
# The word probe (captioner.confidence) must give a confident word at least this chance of being in a description
# before guided decoding requires it: on dev, 0.7 raised the required word's precision to >= 0.90 (docs/guided.md).
EXPECTED_FLOOR = 0.7


@functools.lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the classifier's order (torchvision's weights meta, stored as data)."""
    names = json.loads(CLASSES_FILE.read_text(encoding="utf-8"))
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{CLASSES_FILE} has {len(names)} names, expected {NUM_CLASSES}")
    return tuple(names)


@dataclass(frozen=True)
class Concept:
    """A group of ImageNet classes and the caption words that name what they show."""

    name: str
    classes: tuple[int, ...]
    words: tuple[str, ...]


def parse_classes(items) -> tuple[int, ...]:
    """[281, "151-268", ...] -> the class indices, ranges inclusive; anything outside 0..999 is a ValueError."""
    out: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            lo, hi = map(int, item.split("-"))
        else:
            raise ValueError(f"class {item!r}: expected an index or a range 'first-last'")
        if not 0 <= lo <= hi < NUM_CLASSES:
            raise ValueError(f"class {item!r}: outside 0..{NUM_CLASSES - 1} (or an empty range)")
        out.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(out))


def load_concepts(path: Path | str = WORDS_FILE) -> tuple[Concept, ...]:
    """The class -> word mapping (imagenet_words.json), checked: words lower-case single tokens, classes in range."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for entry in data["concepts"]:
        words = tuple(entry["words"])
        bad = [w for w in words if not re.fullmatch(r"[a-z]+", w)]
        if bad or not words:
            raise ValueError(f"concept {entry.get('name')!r}: words must be lower-case single words, got {bad or words}")
        out.append(Concept(entry["name"], parse_classes(entry["classes"]), words))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def concepts() -> tuple[Concept, ...]:
    return load_concepts()


@functools.lru_cache(maxsize=1)
def word_classes() -> dict[str, tuple[int, ...]]:
    """Each mapped word -> every class that maps to it (over all concepts): its confidence is their summed probability."""
    out: dict[str, dict[int, None]] = {}
    for c in concepts():
        for w in c.words:
            out.setdefault(w, {}).update(dict.fromkeys(c.classes))
    return {w: tuple(cs) for w, cs in out.items()}


def load_thresholds(path: Path | str = THRESHOLDS_FILE) -> dict[str, float]:
    """The per-word guide thresholds (imagenet_thresholds.json, written by `python -m train.calibrate`): mapped word ->
    the confidence at which guided decoding requires it. Checked: every threshold in (0, 1], every word a mapped word
    (imagenet_words.json). A mapped word that is absent (the calibration dropped it) is never required."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    mapped = word_classes()
    out = {}
    for w, entry in data["thresholds"].items():
        t = entry["threshold"] if isinstance(entry, dict) else entry
        if w not in mapped:
            raise ValueError(f"{path}: {w!r} is not a mapped word (imagenet_words.json)")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"{path}: {w!r} has threshold {t!r}, expected a probability in (0, 1]")
        out[w] = float(t)
    return out


@functools.lru_cache(maxsize=1)
def thresholds() -> dict[str, float]:
    """The shipped per-word thresholds (constraint_for(..., threshold=None)); loaded once."""
    return load_thresholds()


# ---------------------------------------------------------------------------------------------------- labels


def _probs(features) -> torch.Tensor:
    """ImageFeatures (batch 1) or a (1000,) / (1, 1000) probability tensor -> (1000,) probabilities on the CPU."""
    probs = getattr(features, "labels", features)
    if probs is None:
        raise ValueError("these features carry no ImageNet labels: the model has no ImageNet head (config.imagenet_head)")
    probs = probs.detach().float().cpu()
    if probs.dim() == 2:
        if probs.size(0) != 1:
            raise ValueError(f"labels of one image expected, got a batch of {probs.size(0)} (select a row first)")
        probs = probs[0]
    return probs


def labels(features, k: int = 5) -> list[tuple[str, float]]:
    """The top-k ImageNet labels of one image's features: [(class name, probability), ...], likeliest first."""
    probs = _probs(features)
    top = torch.topk(probs, min(k, probs.numel()))
    names = class_names()
    return [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices)]


def top_labels(model, image_or_features, k: int = 5) -> list[tuple[str, float]]:
    """What the CNN sees in an image (a path, bytes, a PIL image, a preprocessed tensor) or in its ImageFeatures
    (from model.encode): the top-k ImageNet labels with probabilities. [] for a model without an ImageNet head."""
    from .model import ImageFeatures, encode

    features = image_or_features if isinstance(image_or_features, ImageFeatures) else encode(model, image_or_features)
    if features.labels is None:
        return []
    return labels(features, k)


# ---------------------------------------------------------------------------------------------------- guidance


@dataclass(frozen=True)
class Evidence:
    """Why a word is required: its confidence (the summed probability of the classes mapping to it), those
    classes' top labels, and the threshold it reached (its calibrated one, or the global override)."""

    word: str
    confidence: float
    labels: tuple[tuple[str, float], ...]
    threshold: float | None = None


@dataclass(frozen=True)
class Constraint:
    """Guided decoding's request for one image: the caption must use one of `words` (empty: nothing is required and
    guided decoding is beam search). On a guided stream's records while it decodes; the last record holds its
    ConstraintOutcome instead."""

    words: tuple[str, ...]  # any one of these (the model's vocabulary's words for the confident labels)
    evidence: tuple[Evidence, ...]  # one per required word, most confident first
    threshold: float | None  # a word is required when its confidence reaches this; None: each word's calibrated one
    note: str = ""  # why nothing is required (no head, nothing confident, words outside the vocabulary)

    def record(self) -> dict:
        """As plain JSON data (the CLI's --json), with the one-line description as "text" (no outcome yet)."""
        return ConstraintOutcome(self).record()

    def describe(self) -> str:
        """One line for the inspector: which word is required and why; or, when none is, why not."""
        return ConstraintOutcome(self).describe()


@dataclass(frozen=True)
class ConstraintOutcome:
    """How a guided decode ended against its Constraint (on the stream's last record). It reads as the constraint
    too (`words`, `evidence`, `threshold`, `note`), so the last record answers both "what was asked" and "what came
    of it"."""

    constraint: Constraint
    met: bool | None = None  # True met, False fell back; None: nothing was required
    used: str | None = None  # the required word the caption uses
    # guided decoding's two candidates, as mean log-probability per word: the best caption with a required word (fit)
    # and without one (free); unfit: True when free was more than `margin` likelier, so it was kept.
    fit: float | None = None
    free: float | None = None
    margin: float | None = None
    unfit: bool = False

    words = property(lambda self: self.constraint.words)
    evidence = property(lambda self: self.constraint.evidence)
    threshold = property(lambda self: self.constraint.threshold)
    note = property(lambda self: self.constraint.note)

    def record(self) -> dict:
        """As plain JSON data (the CLI's --json, the app's download), with the one-line description as "text"."""
        return {"words": list(self.words), "threshold": self.threshold, "met": self.met, "used": self.used,
                "fit": self.fit, "free": self.free, "margin": self.margin, "unfit": self.unfit,
                "evidence": [{"word": e.word, "confidence": round(e.confidence, 4),
                              "threshold": None if e.threshold is None else round(e.threshold, 4),
                              "labels": [[n, round(p, 4)] for n, p in e.labels]} for e in self.evidence],
                "note": self.note, "text": self.describe()}

    def describe(self) -> str:
        """One line for the inspector: which word was required and why, and how it ended; or, when nothing was,
        why not, in words that agree with the CNN's labels shown above it (docs/guided.md, "The explanation")."""
        if not self.words:
            return f"guided: {self.note}" if self.note else "guided: nothing was required"
        calibrated = self.threshold is None
        groups: dict[tuple, list[str]] = {}
        for e in self.evidence:
            groups.setdefault((round(e.confidence, 4), e.labels, e.threshold), []).append(e.word)
        why = []
        for (conf, lbls, needs), ws in groups.items():
            said = " or ".join(f'"{w}"' for w in ws)
            # the labels' own probabilities, as the CNN line shows them; their sum only when several add up
            seen = describe_labels(lbls) if lbls else "labels that stand for it"
            extra = [f"together {percent(conf)}"] if len(lbls) > 1 else []
            if needs is not None:
                extra.append(f"{'its calibrated threshold' if calibrated else 'the threshold set'} is {percent(needs)}")
            why.append(f"{said}, as the CNN sees {seen}{' (' + '; '.join(extra) + ')' if extra else ''}")
        text = "required " + "; or ".join(why)
        if self.met is True:
            text += f"; the caption uses \"{self.used}\"" if self.used else "; met"
        elif self.met is False and self.unfit:
            text += (f"; the model could not fit \"{self.words[0]}\" into a sentence it believes ({self.fit:.2f} per "
                     f"word against {self.free:.2f} without it): kept the caption without it")
        elif self.met is False:
            text += "; no candidate caption could use one: kept the unconstrained best"
        if self.note:
            text += f"; {self.note}"
        return "guided: " + text


def concept_words(index: int) -> tuple[str, ...]:
    """The caption words an ImageNet class stands for (over every concept listing it), in mapping order; () for none."""
    return tuple(dict.fromkeys(w for c in concepts() if index in c.classes for w in c.words))


def why_nothing(probs: torch.Tensor, vocab, per_word: dict[str, float], threshold: float | None) -> str:
    """Why guided decoding requires no word for these (1000,) probabilities, in one sentence about the CNN's top
    label (the first label the CNN line shows), so the two never disagree. The cases:
    - the top label stands for no caption word (tripod, military uniform);
    - it stands for words this model's vocabulary lacks;
    - its words have no calibrated threshold: on the train photos the CNN's label did not reliably mean the word
      was right (espresso -> cup);
    - its word is below its threshold (the labels that map to it, together, short of it);
    plus, when the top label's word is not the likeliest mapped word, what kept that one out too."""
    names = class_names()
    top = int(probs.argmax())
    label = f"The CNN's top label, {names[top]} ({percent(float(probs[top]))}),"
    conf = word_confidence(probs)
    bar = "its calibrated threshold" if threshold is None else "the threshold set"

    def short(w: str) -> str:
        return f"at {percent(conf[w])} with all the labels that stand for it, under {bar} of {percent(per_word[w])}"

    words = concept_words(top)
    known = [w for w in words if w in vocab.stoi]
    if not words:
        head = f"{label} is not one of the words guided decoding may require"
    elif not known:
        head = f"{label} stands for {', '.join(words)}, not in this model's vocabulary"
    elif not any(w in per_word for w in known):
        head = (f"{label} stands for \"{known[0]}\", but on the training photos that label did not reliably mean "
                f"\"{known[0]}\" was in the picture, so it is never required")
    else:
        w = max((w for w in known if w in per_word), key=lambda w: conf[w])
        head = f'{label} stands for "{w}", {short(w)}'
    # The likeliest mapped word with a threshold, when it is another label's and came closest: why it is not required
    near = [w for w in per_word if w in vocab.stoi and w not in known and conf[w] >= 0.05]
    if near:
        w = max(near, key=lambda w: conf[w] / per_word[w])
        head += f'; "{w}" is {short(w)}'
    return head + "; nothing was required"


def word_confidence(features) -> dict[str, float]:
    """Every mapped word's confidence for one image: the sum of the probabilities of the classes mapping to it."""
    probs = _probs(features)
    return {w: float(probs[list(cs)].sum()) for w, cs in word_classes().items()}


def constraint_for(features, vocab, threshold: float | None, expected: dict[str, float] | None = None,
                   floor: float = EXPECTED_FLOOR) -> Constraint:
    """The requirement guided decoding puts on one image's caption: the words (in `vocab`) whose confidence reaches
    their threshold, with the labels behind them; no requirement for features without ImageNet labels.
    threshold None: each word's calibrated threshold (imagenet_thresholds.json; a word without one is never
    required); a float: one threshold for every mapped word (an override).
    `expected`: a second opinion, word -> the chance a description of the photo uses it (the model's word probe,
    captioner.confidence.expected_words); a confident word it gives less than `floor` is not required ("dog" where
    the photo shows dogs), a word it does not know stays."""
    if getattr(features, "labels", None) is None:
        return Constraint((), (), threshold, note="this model has no ImageNet head (image classifier), so nothing was required")
    probs = _probs(features)
    names = class_names()
    conf = word_confidence(probs)
    per_word = thresholds() if threshold is None else dict.fromkeys(conf, threshold)
    confident = sorted((w for w, c in conf.items() if w in per_word and c >= per_word[w]), key=lambda w: (-conf[w], w))
    known = [w for w in confident if w in vocab.stoi]
    missing = [w for w in confident if w not in vocab.stoi]
    doubted = [w for w in known if expected is not None and expected.get(w, 1.0) < floor]
    known = [w for w in known if w not in doubted]
    evidence = []
    for w in known:
        cs = sorted(word_classes()[w], key=lambda c: -float(probs[c]))[:3]
        evidence.append(Evidence(w, conf[w], tuple((names[c], float(probs[c])) for c in cs if probs[c] >= 0.005),
                                 per_word[w]))
    note = ""
    if doubted and not known:
        note = (f"the CNN's labels point to {', '.join(doubted)}, but this model's second opinion (its word probe) "
                f"gives {' and '.join(f'{w} {percent(expected[w])}' for w in doubted)} that a description would use "
                f"{'it' if len(doubted) == 1 else 'them'}, under {percent(floor)}; nothing was required")
    elif doubted:
        note = f"not {', '.join(doubted)}: the word probe gives {'it' if len(doubted) == 1 else 'them'} under {percent(floor)}"
    elif missing and not known:
        note = f"{', '.join(missing)} confident, but not in this model's vocabulary; nothing was required"
    elif not confident:
        note = why_nothing(probs, vocab, per_word, threshold)
    return Constraint(tuple(known), tuple(evidence), threshold, note=note)
