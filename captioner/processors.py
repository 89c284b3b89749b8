"""The decoding rules: one ordered list of processors, built from a GenerationConfig by `processors_for`, runs in
every decoding loop (`decode.stream`'s greedy and sampling, beam search and guided decoding, batched `generate_batch`
for caption_batch and self-critical rollouts). A new rule is one processor here plus its setting in GenerationConfig.

A processor is called as (logits (n, V), tokens so far (n, t)) -> logits. The rules mask what may not come next; the
warpers (temperature, top-k, top-p: `warper = True`) then reshape what sampling draws from, after the steps' records
have taken the model's own probabilities (`Processors.split`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .generation import GenerationConfig
from .imagenet import Constraint

# (logits, tokens), not transformers' (input_ids, scores): the logits are what a processor changes, and every
# decoder seam here (`decoder.step`, the records) puts the tensor it returns first.


@dataclass(frozen=True)
class Unsaid:
    """Never emit <PAD>/<SOS>/<UNK> (<UNK>'s probability is reported before this, see Step.unk_prob)."""

    why: ClassVar[str] = "never said: <PAD>, <SOS> and <UNK> (a word outside the vocabulary) are not words"
    ids: tuple[int, ...]

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits[:, list(self.ids)] = -math.inf
        return logits


@dataclass(frozen=True)
class MinLength:
    """Never end before the first word: an empty caption is no caption."""

    why: ClassVar[str] = "a caption has at least one word"
    eos: int

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1) == 0:
            logits[:, self.eos] = -math.inf
        return logits


@dataclass(frozen=True)
class OneSentence:
    """After a full stop only <EOS> may follow (guided decoding, from position `after` on: a branch's forced words
    are the user's): a caption is one sentence, and a search that must place a word would otherwise tack it on after
    the period ("... on a street. rocket"). <EOS> keeps its own logit, so such a row's <EOS> gets probability 1."""

    why: ClassVar[str] = "nothing after a full stop (guided: one sentence)"
    full_stop: int
    eos: int
    after: int = 0

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1) and tokens.size(1) >= self.after:
            rows = (tokens[:, -1] == self.full_stop).to(logits.device)  # (n,)
            if rows.any():
                eos = logits[rows, self.eos]
                logits[rows] = -math.inf
                logits[rows, self.eos] = eos
        return logits


# Words a caption may say twice in a row of words without saying anything twice ("a man in a red shirt and a woman
# in a blue dress"): articles, prepositions, conjunctions, auxiliaries and punctuation.
FUNCTION_WORDS = frozenset("a an the in on of at with and or to for from by near into onto is are while its their "
                           "his her , .".split())


@dataclass(frozen=True)
class NoRepeatNGram:
    """Never say an n-gram of `n` words twice in a caption (GenerationConfig.no_repeat_ngram), except n-grams made
    only of the tokens in `free` (function words: "in a", "of the" may repeat; "a man" may not)."""

    why: ClassVar[str] = "would say a word pair twice (no_repeat_ngram)"
    n: int
    free: frozenset[int] = frozenset()

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        n, free = self.n, self.free
        for row, hist in enumerate(tokens.tolist()):
            if len(hist) >= n - 1:
                tail = tuple(hist[len(hist) - n + 1 :]) if n > 1 else ()
                said = all(tok in free for tok in tail)  # a candidate from `free` would complete a function-word n-gram
                banned = {hist[i + n - 1] for i in range(len(hist) - n + 1) if tuple(hist[i : i + n - 1]) == tail}
                banned = {tok for tok in banned if not (said and tok in free)}
                if banned:
                    logits[row, list(banned)] = -math.inf
        return logits


@dataclass(frozen=True)
class Ended:
    """A row that has said <EOS> says only <EOS> (batched decoding keeps finished captions in the batch). Last in
    the list, so that no other rule can take <EOS> from a finished row."""

    why: ClassVar[str] = "the caption had ended"
    eos: int

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.size(1):
            done = (tokens == self.eos).any(1).to(logits.device)  # (n,)
            if done.any():
                logits[done] = -math.inf
                logits[done, self.eos] = 0.0
        return logits


@dataclass(frozen=True)
class Temperature:
    """Sampling: divide the scores by `t` (below 1 sharpens the distribution, above 1 flattens it)."""

    why: ClassVar[str] = "temperature"
    warper: ClassVar[bool] = True
    t: float

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return logits / self.t


@dataclass(frozen=True)
class TopK:
    """Sampling: draw only from the `k` likeliest words of each row (ties with the k-th stay in)."""

    why: ClassVar[str] = "not among the top-k words (sampling)"
    warper: ClassVar[bool] = True
    k: int

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kth = logits.topk(min(self.k, logits.size(-1)), dim=-1).values[..., -1:]  # (n, 1)
        return logits.masked_fill(logits < kth, -math.inf)


@dataclass(frozen=True)
class TopP:
    """Sampling (nucleus): draw only from the smallest set of each row's likeliest words whose probability reaches
    `p`; the likeliest word always stays in."""

    why: ClassVar[str] = "outside the top-p nucleus (sampling)"
    warper: ClassVar[bool] = True
    p: float

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        sorted_p, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        drop = torch.cumsum(sorted_p, -1) - sorted_p >= self.p  # (n, V), in sorted order
        return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)


class Processors(list):
    """The decoding rules in order, then the sampling warpers; calling it applies each to a copy of the logits."""

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        for rule in self:
            logits = rule(logits, tokens)
        return logits

    def split(self) -> tuple["Processors", "Processors"]:
        """(the rules, the warpers): a step's records report the model's probabilities after the rules, and
        sampling draws from them warped."""
        warps = [bool(getattr(rule, "warper", False)) for rule in self]
        return (Processors(r for r, w in zip(self, warps) if not w), Processors(r for r, w in zip(self, warps) if w))

    def blocker(self, logits: torch.Tensor, tokens: torch.Tensor, token: int):
        """The rule that removes `token` from one row of logits (1, V) after `tokens` (1, t), or None (a recorded
        search names the rule of each blocked word it shows: a few rows a step, never the whole batch)."""
        logits = logits.clone()
        for rule in self:
            logits = rule(logits, tokens)
            if logits[0, token] == -math.inf:
                return rule
        return None


def processors_for(config: GenerationConfig, vocab, *, constraint: Constraint | None = None,
                   forced: int = 0) -> Processors:
    """The rules that `config` asks for, in the order they run, then (sampling) its warpers. `constraint`: guided
    decoding's, which, when it requires words, keeps the caption to one sentence after the `forced` words of a
    branch's prefix."""
    rules = Processors([Unsaid(tuple(vocab.unsaid)), MinLength(vocab.eos_id)])
    if constraint is not None and constraint.words and "." in vocab.stoi:
        rules.append(OneSentence(vocab.stoi["."], vocab.eos_id, forced))
    if config.no_repeat_ngram:
        free = frozenset() if config.block_function_words else frozenset(vocab.stoi[w] for w in FUNCTION_WORDS if w in vocab.stoi)
        rules.append(NoRepeatNGram(config.no_repeat_ngram, free))
    rules.append(Ended(vocab.eos_id))
    if config.strategy == "sample":  # 1.0, 0 and 1.0 change nothing: left out
        if config.temperature != 1.0:
            rules.append(Temperature(config.temperature))
        if config.top_k:
            rules.append(TopK(config.top_k))
        if config.top_p < 1.0:
            rules.append(TopP(config.top_p))
    return rules
