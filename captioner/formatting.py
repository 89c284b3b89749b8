"""How decoding's results read: percentages, the CNN's labels, why a caption stopped, and the JSON record of a decode
that the CLI's --json and the app's download both write."""
from __future__ import annotations

import os
from typing import Any


def percent(p: float, digits: int = 0) -> str:
    """A probability as a percentage with `digits` decimals; one above 0 that would round to 0 reads "<1%"
    (or "<0.1%"), never "0%", which would say the model ruled the word out."""
    if 0 < p and round(p * 100, digits) == 0:
        return f"<{10 ** -digits:g}%"
    return f"{p * 100:.{digits}f}%"


def describe_labels(pairs, digits: int = 0) -> str:
    """[(name, p), ...] -> "tabby cat 62%, Egyptian cat 21%" (what the app and the CLI print)."""
    return ", ".join(f"{name} {percent(p, digits)}" for name, p in pairs)


def describe_stop(last) -> str:
    """Why a caption ended, in words, from its last record (empty for a record that is not the last)."""
    if last.stop == "eos":
        return "the model ended it (`<EOS>` won)"
    if last.stop == "max_len":
        return "it reached the maximum length"
    if last.stop == "unk":
        return (f"the model wanted a word outside its vocabulary next (`<UNK>`, p = {last.stop_unk_prob:.0%}), which is "
                "never emitted; `<EOS>` was the likeliest of the rest, so the caption may be cut off")
    return ""


def decode_record(last, *, model: str | None, precision: str, assessment=None, steps: bool = True, tree: bool = True,
                  **more: Any) -> dict:
    """The JSON form of one decode, from its last Step record (`decode.final`; None: no caption): the model and its
    precision, the caption, whether the photo is familiar and how sure the caption is (`assessment`, a
    confidence.Assessment; None: not known), with `steps` every word's record (Step.record) and why it stopped,
    guided decoding's constraint (what was required, whether it was met, and why), with `tree` the recorded search
    (GenerationConfig.tree), then `more` (the CLI's "imagenet" labels, the app's "settings" and "prefix")."""
    rec: dict[str, Any] = {"model": model, "precision": precision, "caption": last.text if last is not None else ""}
    rec.update(assessment.record() if assessment is not None else {"familiar": None, "confidence": None, "familiarity": None})
    if steps:
        words = last.caption_steps() if last is not None else ()
        rec["steps"] = [s.record() for s in words]
        rec["stop"] = last.stop if last is not None else None  # eos | unk | max_len (decode.Step.stop)
        rec["stop_unk_prob"] = last.stop_unk_prob if last is not None else None
    if last is not None and last.constraint is not None:
        rec["constraint"] = last.constraint.record()
    if tree and last is not None and last.tree is not None:
        rec["tree"] = [n.record() for n in last.tree]
    rec.update(more)
    return rec


def model_label(model, src=None, revision: str | None = None) -> str:
    """Which model this is, as records and the app name it: its folder or Hub id (the bundled one says so), the
    revision asked for, and the commit a Hub download actually loaded."""
    from .loading import DEFAULT_MODEL

    source = str(getattr(model, "source", src) or src)
    if os.path.abspath(source) == str(DEFAULT_MODEL):
        source = "captioner/default_model (bundled)"
    rev = getattr(model, "revision", None) or revision
    commit = getattr(model, "commit", None)  # a Hub download: the commit actually loaded
    return source + (f" @ {rev}" if rev else "") + (f" (commit {commit[:10]})" if commit and commit != rev else "")
