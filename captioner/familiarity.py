"""Is a photo like the ones the model learned from?

Two checks, either of which makes a photo unfamiliar:
- `degenerate(image)`: images with nothing to describe, caught by rule, for sure: tiny (a side under MIN_SIDE
  pixels), blank or one colour (almost no variation), or noise (neighbouring pixels unrelated, which no photo is).
- `Familiarity.distance(features)`: how far the photo's pooled CNN feature lies from the training photos' (the
  cosine distance to its k nearest train photos, on the features' square roots projected onto their main
  directions, 256 for the bundled model); past `threshold`, set on held-out dev photos, the photo is unfamiliar.
  docs/familiarity.md gives the measurements behind the method (it beat Mahalanobis distances and centred PCA) and
  the threshold.

The fitted statistics live beside the model's weights, in ASSESS_FILE (safetensors: tensors plus JSON metadata,
never a pickle); `python -m train.assess` fits them for any model. A model folder without the file has no
familiarity check (`load(model)` returns None) and its captions carry no "familiar" verdict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .hub import ASSESS_FILE  # familiarity statistics + confidence calibration, beside model.safetensors

MIN_SIDE = 32  # pixels: a photo smaller than this a side carries too little to caption
FLAT_STD = 6.0  # grey levels (0-255): below this spread in every channel the image is one colour
NOISE_CORRELATION = 0.3  # neighbouring pixels of every photo correlate far above this; of noise, near 0
LEARNED_FROM = "people, dogs and outdoor scenes on Flickr"  # what Flickr8k shows, in the sentence users read
RECOGNISED = 0.3  # an ImageNet label at or above this probability is named as what the CNN recognises


def degenerate(image) -> str | None:
    """Why `image` (a PIL image) has nothing to caption, in words ("only 1×1 pixels", "a single flat colour",
    "random noise"), or None for an ordinary image."""
    import numpy as np

    w, h = image.size
    if min(w, h) < MIN_SIDE:
        return f"only {w}×{h} pixels"
    small = image.convert("RGB")
    if max(w, h) > 256:  # a box filter keeps noise as noise and a photo's structure as structure
        scale = 256 / max(w, h)
        small = small.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))), resample=4)  # BOX
    a = np.asarray(small, dtype=np.float64)  # (H, W, 3)
    if a.reshape(-1, 3).std(0).max() < FLAT_STD:
        return "a single flat colour"
    grey = a.mean(2)
    pairs = [(grey[:, :-1], grey[:, 1:]), (grey[:-1, :], grey[1:, :])]
    corr = []
    for x, y in pairs:
        x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
        denom = np.sqrt((x * x).sum() * (y * y).sum())
        corr.append((x * y).sum() / denom if denom > 0 else 1.0)
    if max(corr) < NOISE_CORRELATION:
        return "random noise"
    return None


@dataclass(frozen=True)
class Familiarity:
    """The fitted detector: the train photos' pooled features, square-rooted (the features are non-negative; the root
    keeps a few large channels from deciding every cosine), projected onto their top right singular vectors
    (`components`, not centred: the mean direction is part of what a photo shares with Flickr8k) and L2-normalised
    (`bank`); a photo's distance is 1 - its mean cosine similarity to its `k` nearest rows of the bank."""

    components: torch.Tensor  # (D, F)
    bank: torch.Tensor  # (N, D), unit rows
    k: int
    threshold: float  # a distance above this is unfamiliar
    about: dict = field(default_factory=dict, compare=False)  # how it was fitted (split, photos, dev share flagged)

    def reduce(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, F) -> unit vectors (B, D) in the reduced space."""
        return F.normalize(pooled.float().clamp_min(0).sqrt() @ self.components.T, dim=1)

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B,) distances: 1 - mean cosine similarity to the k nearest train photos."""
        sim = self.reduce(pooled) @ self.bank.T.float()  # (B, N)
        return 1 - sim.topk(min(self.k, sim.size(1)), dim=1).values.mean(1)

    def nearest(self, pooled: torch.Tensor, k: int) -> torch.Tensor:
        """(B, F) pooled features -> (B, k) rows of the bank (train photos) nearest each, nearest first."""
        sim = self.reduce(pooled) @ self.bank.T.float()
        return sim.topk(min(k, sim.size(1)), dim=1).indices

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"familiarity.components": self.components.float().contiguous(), "familiarity.bank": self.bank.half().contiguous()}

    def metadata(self) -> dict:
        return {"k": self.k, "threshold": self.threshold, **self.about}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Familiarity":
        k, threshold = meta.get("k"), meta.get("threshold")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"familiarity k={k!r}: expected a whole number of 1 or more")
        if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 2:
            raise ValueError(f"familiarity threshold={threshold!r}: expected a cosine distance in [0, 2]")
        comps, bank = (tensors[f"familiarity.{n}"].float() for n in ("components", "bank"))
        if bank.size(1) != comps.size(0):
            raise ValueError(f"familiarity tensors disagree: components {tuple(comps.shape)}, bank {tuple(bank.shape)}")
        return cls(comps, bank, k, float(threshold), {key: v for key, v in meta.items() if key not in ("k", "threshold")})


def fit(pooled: torch.Tensor, *, dims: int = 256, k: int = 10, threshold: float = 1.0, about: dict | None = None) -> Familiarity:
    """A detector from the train photos' pooled features (N, F): their roots' top `dims` directions, the bank of
    reduced unit vectors. Its threshold is set afterwards, on held-out photos (`threshold_for`)."""
    if dims < 1 or dims > min(pooled.shape):
        raise ValueError(f"dims={dims}: expected 1 to {min(pooled.shape)} for {tuple(pooled.shape)} features")
    if k < 1 or k > pooled.size(0):
        raise ValueError(f"k={k}: expected 1 to {pooled.size(0)} (the photos fitted on)")
    _, _, v = torch.linalg.svd(pooled.double().clamp_min(0).sqrt(), full_matrices=False)  # rows: directions, largest first
    det = Familiarity(v[:dims].float(), torch.empty(0), k, threshold, dict(about or {}))
    # A train photo is its own nearest neighbour in the bank, so train distances are too small to set the threshold
    # with: held-out photos set it (threshold_for).
    return Familiarity(det.components, det.reduce(pooled), k, threshold, dict(about or {}))


def threshold_for(distances: torch.Tensor, flagged: float) -> float:
    """The distance above which `flagged` (a share, 0-1) of held-out in-domain photos lie."""
    if not 0 <= flagged < 1:
        raise ValueError(f"flagged={flagged}: expected a share from 0 to below 1")
    return float(torch.quantile(distances.double(), 1 - flagged))


# ---------------------------------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """One photo's familiarity: `familiar`, the distance and threshold behind it (None when a rule decided), the reason
    when unfamiliar ("only 1×1 pixels", "far from every training photo"), and what the CNN recognises (labels at or
    above RECOGNISED)."""

    familiar: bool
    distance: float | None
    threshold: float | None
    reason: str = ""
    recognised: tuple[tuple[str, float], ...] = ()

    def record(self) -> dict:
        return {"familiar": self.familiar, "distance": None if self.distance is None else round(self.distance, 4),
                "threshold": None if self.threshold is None else round(self.threshold, 4), "reason": self.reason}

    def sentence(self) -> str:
        """The one plain sentence a user reads under the caption of an unfamiliar photo ("" for a familiar one)."""
        if self.familiar:
            return ""
        from .formatting import percent

        if self.reason and self.distance is None:  # a rule: nothing in it to describe
            head = f"This image is {self.reason}, nothing like the photos I learned from ({LEARNED_FROM}), so this caption is meaningless."
            return head
        head = f"This doesn't look like the photos I learned from ({LEARNED_FROM}), so this caption is likely wrong."
        if self.recognised:
            names = " or ".join(f"{n} ({percent(p)})" for n, p in self.recognised[:2])
            return f"{head} My image classifier recognises {names}."
        return f"{head} My image classifier does not recognise anything in it with confidence either."


def recognised(labels) -> tuple[tuple[str, float], ...]:
    """The ImageNet labels (name, probability) the CNN is fairly sure of: at or above RECOGNISED."""
    return tuple((n, p) for n, p in labels if p >= RECOGNISED)


def verdict(detector: Familiarity | None, pooled: torch.Tensor | None, image=None, labels=(), rule: str | None = None) -> Verdict | None:
    """One photo's Verdict from its pooled backbone feature (F,) or (1, F) and, where at hand, the image itself (the
    rules need its pixels: a caption from features alone skips them) or `rule`, what `degenerate` said of it earlier.
    None when the model has no detector and the image is not degenerate."""
    reason = rule or (degenerate(image) if image is not None else None)
    seen = recognised(labels)
    if reason:
        return Verdict(False, None, detector.threshold if detector else None, reason, seen)
    if detector is None or pooled is None:
        return None
    d = float(detector.distance(pooled.reshape(1, -1))[0])
    far = d > detector.threshold
    return Verdict(not far, d, detector.threshold, "far from every training photo" if far else "", seen)


# ---------------------------------------------------------------------------------------------------- the file


def save(folder, familiarity: Familiarity | None, confidence: dict | None = None,
         tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ASSESS_FILE into the model folder: the detector's tensors (and `tensors`: the confidence's word probe)
    and, as metadata, its numbers and the confidence calibration (captioner.confidence)."""
    from safetensors.torch import save_file

    tensors = {**(familiarity.tensors() if familiarity else {}), **(tensors or {})}
    meta = {"familiarity": json.dumps(familiarity.metadata() if familiarity else None),
            "confidence": json.dumps(confidence)}
    path = Path(folder) / ASSESS_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


def read(folder) -> tuple[Familiarity | None, dict | None]:
    """(detector, confidence calibration) from a model folder's ASSESS_FILE; (None, None) when it has none."""
    from safetensors import safe_open

    path = Path(folder) / ASSESS_FILE
    if not path.is_file():
        return None, None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        fam_meta = json.loads(meta.get("familiarity", "null"))
        conf = json.loads(meta.get("confidence", "null"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from None
    return (Familiarity.from_saved(tensors, fam_meta) if fam_meta else None), conf
