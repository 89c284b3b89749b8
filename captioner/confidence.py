"""How sure is a caption, and is its photo familiar?

`confidence` is the estimated chance that a caption is a good description of its photo: a logistic model over
a few signals (`signals`), fitted on the dev split against the caption's own quality (per-image CIDEr-D of at least
GOOD_CIDER; `python -m train.assess`), so that among captions given 0.7, about 70% are good on dev. The signals:
- the caption's word probabilities (mean and lowest log-probability per word);
- a second opinion: a word probe (`WordProbe`, a linear classifier on the pooled CNN feature, fitted on the train
  photos' references) that says how likely each of the caption's content words is to be in a description of this
  photo; a caption whose subject the probe does not expect is often wrong;
- a third opinion: what the reference captions of the train photos nearest this one say (`Neighbours`): the
  caption's CIDEr-D against them, and the share of those photos whose references use each of its content words;
- a fourth opinion, the language prior's (`Prior`): how much likelier this photo made the caption's content words
  than the "average photo" (the train photos' mean features) does; a caption the decoder would say of any photo
  is often wrong;
- the photo's familiarity (captioner.familiarity) and how sure the CNN's ImageNet classifier is.

`Assessor.of(model)` reads what the model folder's ASSESS_FILE holds; `assess(...)` gives one caption's
`Assessment`, which the app, the API, the CLI and the downloads carry as "familiar" and "confidence".
docs/familiarity.md has the measurements and the reliability table.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .familiarity import Familiarity, Verdict, read, verdict

GOOD_CIDER = 0.1  # per-image CIDEr-D at or above which a caption counts as a good description
UNSURE = 0.5  # below this confidence a caption is marked unsure in words
SURE = 0.75  # at or above this, "fairly sure"; between the two, "somewhat sure" (the reliability table: docs/familiarity.md)
SIGNALS = ("mean_logprob", "min_logprob", "probe_mean", "probe_min", "probe_cover", "distance", "cnn_top", "knn_cider",
           "knn_word", "pmi_content")
# What the shipped calibration uses: on dev (cross-fitted) these six did as well as any larger set (docs/familiarity.md)
DEFAULT_SIGNALS = ("mean_logprob", "probe_mean", "probe_cover", "knn_cider", "knn_word", "pmi_content")
CIDER_SIGMA = 6.0  # CIDEr-D's length penalty (pycocoevalcap's)


@dataclass(frozen=True)
class WordProbe:
    """A linear classifier on the pooled CNN feature: for each of `words`, the chance that a reference description
    of the photo uses it (sigmoid(weight @ (x - mean) / scale + bias)), x the feature or, with `root`, its square
    root (as the familiarity space uses: on dev its words predicted poor captions better, docs/familiarity.md).
    Fitted by train.assess on the train split."""

    words: tuple[str, ...]
    weight: torch.Tensor  # (W, F)
    bias: torch.Tensor  # (W,)
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    root: bool = False  # the input is the pooled feature's square root (post-ReLU features are >= 0)

    def probs(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B, W) word probabilities."""
        x = pooled.float().clamp_min(0).sqrt() if self.root else pooled.float()
        x = (x - self.mean) / self.scale
        return torch.sigmoid(x @ self.weight.float().T + self.bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe.weight": self.weight.half().contiguous(), "probe.bias": self.bias.float().contiguous(),
                "probe.mean": self.mean.float().contiguous(), "probe.scale": self.scale.float().contiguous()}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], words: Sequence[str], root: bool = False) -> "WordProbe":
        w = tensors["probe.weight"].float()
        if w.size(0) != len(words):
            raise ValueError(f"word probe: {w.size(0)} weight rows for {len(words)} words")
        return cls(tuple(words), w, tensors["probe.bias"].float(), tensors["probe.mean"].float(), tensors["probe.scale"].float(),
                   bool(root))


@dataclass(frozen=True)
class Prior:
    """The "average photo": the train photos' mean backbone features (`features`, (N, F) regions or (F,) pooled).
    What the decoder would say of it is what it says of any photo; a caption whose words are no likelier for this
    photo than for the average one came from the language prior, not from the image ("A man is standing in front
    of a building."). pmi_content measures that. Fitted by train.assess; travels in ASSESS_FILE."""

    features: torch.Tensor

    def logprobs(self, model, tokens: Sequence[int]) -> list[float]:
        """The decoder's log-probability of each of `tokens` (a caption's word ids, in order) after the ones before
        it, for the average photo: teacher forcing through the decoder's start and step (`model` in eval mode)."""
        if not tokens:
            return []
        with torch.inference_mode():
            logits, state = self._start(model)  # (1, V)
            out = []
            for t in tokens:
                out.append(float(logits[0, t] - torch.logsumexp(logits[0].float(), 0)))
                logits, state = model.decoder.step(torch.tensor([t], device=logits.device), state)
        return out

    def _start(self, model):
        """decoder.start on the average photo, once per model (the same for every caption)."""
        from .model import device_of

        cached = self.__dict__.get("_started")  # (a weak reference to the model, its start)
        if cached is None or cached[0]() is not model:
            features = model.encoder.from_backbone(self.features.float().unsqueeze(0).to(device_of(model)))  # batch of 1
            cached = (weakref.ref(model), model.decoder.start(features))
            self.__dict__["_started"] = cached
        return cached[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prior.features": self.features.half().contiguous()}


def _ngrams(ids: Sequence[int], n: int) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        g = tuple(ids[i : i + n])
        out[g] = out.get(g, 0) + 1
    return out


@dataclass(frozen=True)
class Neighbours:
    """The train photos' reference captions, in the familiarity bank's order: `refs` (N, R, L) word ids of the
    model's vocabulary (0-padded; punctuation and unknown words left out), `df` how many train photos' references
    use each n-gram (1 to 4 words; n-grams of a single photo left out, they get the idf of an unseen one), `k` the
    nearest photos asked. Fitted by train.assess; travels in ASSESS_FILE."""

    refs: torch.Tensor
    df: dict[tuple[int, ...], int]
    k: int = 10

    def of(self, rows: Sequence[int]) -> list[list[int]]:
        """The reference captions (word-id lists) of the train photos `rows`."""
        return [[i for i in r if i] for row in rows for r in self.refs[row].tolist() if any(r)]

    def cider(self, ids: Sequence[int], refs: Sequence[Sequence[int]]) -> float:
        """CIDEr-D (pycocoevalcap's formula, idf from the train photos' references) of a caption against `refs`."""
        if not refs:
            return 0.0
        log_n = math.log(float(self.refs.size(0)))

        def vec(seq):
            out = []
            for n in range(1, 5):
                v = {g: tf * (log_n - math.log(max(1.0, float(self.df.get(g, 1))))) for g, tf in _ngrams(seq, n).items()}
                out.append((v, math.sqrt(sum(x * x for x in v.values()))))
            return out

        hyp = vec(ids)
        total = 0.0
        for ref in refs:
            score = 0.0
            for (hv, hn), (rv, rn) in zip(hyp, vec(ref)):
                dot = sum(min(x, rv[g]) * rv[g] for g, x in hv.items() if g in rv)
                if hn and rn:
                    score += dot / (hn * rn)
            total += score / 4 * math.exp(-((len(ids) - len(ref)) ** 2) / (2 * CIDER_SIGMA**2))
        return total / len(refs) * 10

    def signals(self, ids: Sequence[int], content: Sequence[int], rows: Sequence[int]) -> dict[str, float]:
        """knn_cider: the caption's (word ids `ids`) CIDEr-D against the references of the train photos `rows`;
        knn_word: for each content word (`content`), the share of those photos whose references use it, averaged."""
        per_photo = [set(i for r in self.refs[row].tolist() for i in r if i) for row in rows]
        word = sum(sum(w in s for s in per_photo) / len(per_photo) for w in content) / len(content) if content and per_photo else 0.0
        return {"knn_cider": self.cider(ids, self.of(rows)), "knn_word": float(word)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"knn.refs": self.refs.to(torch.int16).contiguous()}

    def record(self) -> dict:
        return {"k": self.k, "df": [[*g, c] for g, c in self.df.items()]}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], rec: dict) -> "Neighbours":
        refs = tensors["knn.refs"].long()
        if refs.dim() != 3:
            raise ValueError(f"knn.refs: expected (photos, references, words), got {tuple(refs.shape)}")
        return cls(refs, {tuple(row[:-1]): int(row[-1]) for row in rec["df"]}, int(rec["k"]))


def content_words(words: Sequence[str]) -> list[str]:
    """The words of a caption that name something (not function words or punctuation)."""
    from .processors import FUNCTION_WORDS

    return [w for w in words if w not in FUNCTION_WORDS and any(c.isalpha() for c in w)]


def signals(word_probs: Sequence[float], words: Sequence[str], pooled: torch.Tensor | None, labels: torch.Tensor | None,
            probe: WordProbe | None, distance: float | None, knn: dict[str, float] | None = None,
            prior: Sequence[float] | None = None) -> dict[str, float]:
    """One caption's signals (SIGNALS): its words and their probabilities, its photo's pooled feature (F,), ImageNet
    probabilities (1000,), the word probe, the familiarity distance, the neighbours' (Neighbours.signals) and the
    words' log-probabilities for the average photo (Prior.logprobs). A signal that cannot be had is NaN."""
    lp = [math.log(max(p, 1e-9)) for p in word_probs] or [float("nan")]
    out = {"mean_logprob": sum(lp) / len(lp), "min_logprob": min(lp), "probe_mean": float("nan"),
           "probe_min": float("nan"), "probe_cover": float("nan"), "distance": float("nan") if distance is None else float(distance),
           "cnn_top": float("nan") if labels is None else float(labels.reshape(-1).max()),
           "knn_cider": float("nan"), "knn_word": float("nan"), "pmi_content": float("nan"), **(knn or {})}
    if prior is not None and len(prior) == len(words):
        # pmi_content: how much likelier the photo made its content words than the average photo does (mean log ratio)
        gains = [a - b for a, b, w in zip(lp, prior, words) if content_words([w])]
        out["pmi_content"] = sum(gains) / len(gains) if gains else 0.0
    if probe is not None and pooled is not None:
        index = {w: i for i, w in enumerate(probe.words)}
        known = sorted({index[w] for w in content_words(words) if w in index})
        expected = probe.probs(pooled.reshape(1, -1))[0]  # (W,)
        # probe_cover: the share of the words a description is expected to use (weighted by how likely) that it uses
        out["probe_cover"] = float(expected[known].sum() / expected.sum()) if known else 0.0
        if known:
            p = expected[known]
            out["probe_mean"], out["probe_min"] = float(p.mean()), float(p.min())
        else:  # no content word the probe knows: as unexpected as a word it gives no chance
            out["probe_mean"] = out["probe_min"] = 0.0
    return out


@dataclass(frozen=True)
class Calibration:
    """The logistic model from signals to the chance a caption is good: standardised inputs (`mean`, `scale`), a
    missing signal counted at its mean."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float
    about: dict

    def __call__(self, values: dict[str, float]) -> float:
        z = self.bias
        for n, m, s, w in zip(self.names, self.mean, self.scale, self.weight):
            v = values.get(n, float("nan"))
            z += w * (0.0 if v != v else (v - m) / s)  # NaN: at the mean, no evidence either way
        return 1 / (1 + math.exp(-max(-50.0, min(50.0, z))))

    def record(self) -> dict:
        return {"names": list(self.names), "mean": list(self.mean), "scale": list(self.scale), "weight": list(self.weight),
                "bias": self.bias, **self.about}

    @classmethod
    def from_record(cls, rec: dict) -> "Calibration":
        names = tuple(rec["names"])
        bad = [n for n in names if n not in SIGNALS]
        if bad:
            raise ValueError(f"confidence calibration names unknown signals {bad}; known: {', '.join(SIGNALS)}")
        if not all(len(rec[k]) == len(names) for k in ("mean", "scale", "weight")):
            raise ValueError("confidence calibration: names, mean, scale and weight differ in length")
        if any(s <= 0 for s in rec["scale"]):
            raise ValueError(f"confidence calibration: scale {rec['scale']} must be positive")
        about = {k: v for k, v in rec.items() if k not in ("names", "mean", "scale", "weight", "bias")}
        return cls(names, tuple(map(float, rec["mean"])), tuple(map(float, rec["scale"])), tuple(map(float, rec["weight"])),
                   float(rec["bias"]), about)


# ---------------------------------------------------------------------------------------------------- together


@dataclass(frozen=True)
class Assessment:
    """One caption's verdicts: `familiar` (None: the model has no familiarity statistics and the image is not
    degenerate), `confidence` in [0, 1] (None: no calibration), and the familiarity details."""

    familiar: bool | None
    confidence: float | None
    verdict: Verdict | None = None

    @property
    def unsure(self) -> bool:
        return self.confidence is not None and self.confidence < UNSURE

    def record(self) -> dict:
        """The JSON fields every output carries: "familiar", "confidence", and "familiarity" (the details)."""
        return {"familiar": self.familiar, "confidence": None if self.confidence is None else round(self.confidence, 3),
                "familiarity": None if self.verdict is None else self.verdict.record()}

    def words(self) -> str:
        """How sure, in words: "" where there is nothing to say."""
        if self.confidence is None:
            return ""
        pct = f"{self.confidence * 100:.0f}%"
        if self.familiar is False:  # calibrated on dev photos, like the training ones: the number says little here
            return f"Its confidence score ({pct}) was calibrated on photos like the training ones, so it does not apply here."
        if self.unsure:
            return f"Unsure: this caption may well be wrong (confidence {pct})."
        return f"{'Fairly' if self.confidence >= SURE else 'Somewhat'} sure (confidence {pct})."

    def markdown(self) -> str:
        """What the app shows under the caption: the sentence for an unfamiliar photo, and how sure the caption is."""
        parts = []
        if self.verdict is not None and not self.familiar:
            parts.append(f"**{self.verdict.sentence()}**")
        if self.words():
            parts.append(self.words())
        return "  \n".join(parts)

    def mark(self) -> str:
        """A short mark for one line of plain output: "[unfamiliar photo]", "[unsure]" or ""."""
        if self.familiar is False:
            return "[unfamiliar photo: likely wrong]"
        return "[unsure]" if self.unsure else ""


def expected_words(model, features) -> dict[str, float] | None:
    """The model's word probe on one photo's features (batch 1): word -> the chance a description uses it; None for
    a model without a probe or features without the CNN's regions."""
    probe = Assessor.of(model).probe
    if probe is None or getattr(features, "grid", None) is None:
        return None
    return dict(zip(probe.words, probe.probs(features.grid.mean(1)[:1])[0].tolist()))


def knn_signals(familiarity: Familiarity | None, neighbours: Neighbours | None, pooled: torch.Tensor | None,
                steps: Sequence) -> dict[str, float] | None:
    """Neighbours.signals for one caption (its Step records) of the photo with pooled feature (F,): its nearest
    train photos found in the familiarity bank. None where the model has no bank or references."""
    if familiarity is None or neighbours is None or pooled is None:
        return None
    rows = familiarity.nearest(pooled.reshape(1, -1), neighbours.k)[0].tolist()
    ids = [s.token for s in steps if any(c.isalpha() for c in s.word)]
    content = [s.token for s in steps if content_words([s.word])]
    return neighbours.signals(ids, content, rows)


@dataclass(frozen=True)
class Assessor:
    """A model's familiarity detector, word probe, confidence calibration and train photos' references (any may be
    None)."""

    familiarity: Familiarity | None
    probe: WordProbe | None
    calibration: Calibration | None
    neighbours: Neighbours | None = None
    prior: Prior | None = None

    @classmethod
    def of(cls, model) -> "Assessor":
        """From the folder the model was loaded from (its ASSESS_FILE); all None for a model without one. Read once
        per model object and kept on it (read-only after)."""
        cached = model.__dict__.get("_assessor")
        if cached is None:
            folder = getattr(model, "folder", None)
            cached = cls(None, None, None) if folder is None else cls.read(folder)
            model.__dict__["_assessor"] = cached
        return cached

    @classmethod
    def read(cls, folder) -> "Assessor":
        from pathlib import Path

        from safetensors import safe_open

        from .familiarity import ASSESS_FILE

        familiarity, conf = read(folder)
        probe = calibration = neighbours = prior = None
        if conf:
            calibration = Calibration.from_record(conf["calibration"]) if conf.get("calibration") else None
            if conf.get("probe_words"):
                with safe_open(str(Path(folder) / ASSESS_FILE), framework="pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("probe.", "knn.", "prior."))}
                probe = WordProbe.from_saved(tensors, conf["probe_words"], conf.get("probe_root", False))
                if conf.get("knn"):
                    neighbours = Neighbours.from_saved(tensors, conf["knn"])
                if "prior.features" in tensors:
                    prior = Prior(tensors["prior.features"].float())
        return cls(familiarity, probe, calibration, neighbours, prior)

    def assess(self, features, steps: Sequence, image=None, rule: str | None = None, model=None) -> Assessment:
        """One caption's Assessment: `features` its photo's ImageFeatures (batch 1), `steps` the caption's Step
        records (caption_steps()), `image` the PIL image where at hand (for the degenerate-image rules), or `rule`:
        what familiarity.degenerate said of it; `model` the captioner (for pmi_content; without it that signal
        counts at its mean)."""
        from .imagenet import labels as imagenet_labels

        pooled = features.grid.mean(1)[0] if getattr(features, "grid", None) is not None else None
        probs = features.labels[0] if getattr(features, "labels", None) is not None else None
        seen = imagenet_labels(features, 3) if probs is not None else []
        v = verdict(self.familiarity, pooled, image, seen, rule)
        words = [s.word for s in steps]
        confidence = None
        if self.calibration is not None and steps:
            prior = self.prior.logprobs(model, [s.token for s in steps]) if self.prior is not None and model is not None else None
            values = signals([s.prob for s in steps], words, pooled, probs, self.probe, v.distance if v else None,
                             knn_signals(self.familiarity, self.neighbours, pooled, steps), prior)
            confidence = self.calibration(values)
            if v is not None and v.distance is None and not v.familiar:  # a degenerate image: nothing to describe
                confidence = min(confidence, float(self.calibration.about.get("floor", 0.05)))
        return Assessment(None if v is None else v.familiar, confidence, v)
