"""The word vocabulary: spaCy tokenisation, special tokens, encode/decode, save/load."""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from typing import Iterable, Sequence

PAD, SOS, EOS, UNK = "<PAD>", "<SOS>", "<EOS>", "<UNK>"
SPECIALS = (PAD, SOS, EOS, UNK)
VOCAB_FILE = "vocab.json"

# Tokens written without a space before them, and joiners written without spaces around them.
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", ")", "%", "n't"}
_JOINERS = {"-", "/"}


@functools.lru_cache(maxsize=1)
def _tokenizer():
    import spacy  # imported lazily: decoding never needs it

    return spacy.blank("en").tokenizer


def tokenize(text: str) -> list[str]:
    """Lower-cased spaCy tokens (no model download: spacy.blank)."""
    return [t.text for t in _tokenizer()(text.lower().strip()) if not t.is_space]


def detokenize(words: Sequence[str]) -> str:
    """Tokens to a readable sentence: no space before punctuation, hyphenated words rejoined, capitalised."""
    out = ""
    glue = False  # the previous token was a joiner
    for w in words:
        if not out:
            out = w
        elif w in _JOINERS or glue or w in _NO_SPACE_BEFORE or w.startswith("'"):
            out += w
        else:
            out += " " + w
        glue = w in _JOINERS
    return out[:1].upper() + out[1:]


# Words an English caption does not end on: one that does was cut off mid-phrase ("in front of a").
CUT_OFF_ENDINGS = frozenset("a an the of in on with and at to his her their its".split())


def is_cut_off(text: str) -> bool:
    """Does this caption end on a word that leaves its phrase unfinished (punctuation aside)?"""
    words = [w for w in tokenize(text) if w.isalnum() or "'" in w]
    return bool(words) and words[-1] in CUT_OFF_ENDINGS


class Vocabulary:
    """Maps words to ids and back; ids 0-3 are <PAD>, <SOS>, <EOS>, <UNK>."""

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {tuple(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    pad_id, sos_id, eos_id, unk_id = 0, 1, 2, 3
    unsaid = (pad_id, sos_id, unk_id)  # ids no caption ever contains: decoding masks them, training never samples them

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @classmethod
    def build(cls, captions: Iterable[str], *, min_freq: int = 5) -> "Vocabulary":
        """Words seen at least min_freq times in the (training) captions, most frequent first."""
        if min_freq < 1:
            raise ValueError(f"min_freq={min_freq}: expected 1 or more")
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def encode(self, text: str, *, add_specials: bool = True) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in tokenize(text)]
        return [self.sos_id, *ids, self.eos_id] if add_specials else ids

    def words(self, ids: Iterable[int]) -> list[str]:
        """Ids to words, stopping at <EOS> and dropping <PAD>/<SOS>."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in self.unsaid:
                continue
            out.append(self.itos[i])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize(self.words(ids))

    def save(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise ValueError(f"{path}: not a captioner vocabulary (expected a JSON object with an 'itos' list)")
        return cls(data["itos"])
