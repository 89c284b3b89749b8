"""What decoding yields: a frozen Step record per word (and, for a recorded search, its Nodes and SearchSteps),
and the helpers that build them from a decoder's logits, shared by `decode.stream` and beam search (`beam`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch

from .imagenet import Constraint, ConstraintOutcome
from .vocab import detokenize


@dataclass(frozen=True)
class Candidate:
    token: int
    word: str
    prob: float  # the model's probability of this word at this step


@dataclass(frozen=True)
class Node:
    """One node of a recorded search (GenerationConfig.tree): a hypothesis extended by one word (docs/search-tree.md)."""

    id: int
    parent: int | None  # the node of the hypothesis it extends; None for the first words
    t: int  # the word's position, from 0
    token: int
    word: str
    logprob: float  # cumulative log-probability of the hypothesis, this word included
    score: float  # what the search ranked it by: logprob / words ** length_penalty (greedy, sampling: logprob)
    group: int | None  # guided decoding: 1 once the hypothesis uses a required word, else 0; None otherwise
    # kept (alive after its step), pruned (outscored), finished (ended with <EOS>, a candidate), blocked (a rule
    # removed it: `rule` says which; logprob and score are what it had before the rule), chosen (the final caption's)
    status: str
    rule: str | None = None

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchStep:
    """With GenerationConfig.tree, `stream` yields one of these after each step of the search, among the Step
    records: the nodes that step added, as they stood then. The last Step's `tree` has every node, final statuses."""

    t: int
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Step:
    t: int  # position of this word in the caption, from 0
    token: int
    word: str
    prob: float  # the model's probability of the chosen word
    logprob: float  # cumulative log-probability of the caption up to and including this word
    alternatives: tuple[Candidate, ...]  # top-k of this step's distribution, most likely first
    eos_prob: float  # probability the model gave to ending the caption here instead
    tokens: tuple[int, ...]  # the caption's token ids so far (beam: the current best hypothesis)
    text: str  # the caption so far, readable
    # On the last record, why decoding stopped: "eos" (the model ended it), "unk" (the model's likeliest next token was
    # <UNK>, a word outside its vocabulary that decoding never emits, and <EOS> won among the rest: a cut-off caption,
    # not a finished one), or "max_len".
    stop: str | None = None
    attention: tuple[float, ...] | None = None  # attend decoders: the weight on each image region when choosing this word
    # On the last record: the records of the final caption's earlier words, so [*last.history, last] is the whole
    # caption, word by word (beam search: the winning hypothesis, which may differ from what was streamed).
    history: tuple["Step", ...] = ()
    # Guided decoding: on every record the Constraint (the word required and why: the ImageNet labels, how confident);
    # on the last record its ConstraintOutcome instead (met; False: it fell back to the unconstrained best).
    constraint: Constraint | ConstraintOutcome | None = None
    unk_prob: float = 0.0  # the probability the model gave <UNK> at this step, before decoding masked it
    stop_unk_prob: float | None = None  # on the last record: that probability at the step that ended the caption
    # On the last record, with GenerationConfig.tree: the whole search, every Node with its final status.
    tree: tuple[Node, ...] | None = None

    def caption_steps(self) -> tuple["Step", ...]:
        """On the last record: every word's record of the final caption."""
        return (*self.history, self)

    def record(self) -> dict:
        """This record as plain JSON data, as the CLI's --json and the app's download write each step: every field
        but `history`, `constraint` and `tree` (those say it once for the caption)."""
        d = asdict(replace(self, history=(), constraint=None, tree=None))
        del d["history"], d["constraint"], d["tree"]
        return d



def history(rows: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Token lists of equal length -> (n, t) LongTensor (t may be 0)."""
    return torch.tensor(rows, dtype=torch.long, device=device)  # [[]] -> (1, 0)


def attention_of(state, row: int = 0) -> torch.Tensor | None:
    """The attention weights (N,) behind the newest logits of batch row `row`; None for decoders that do not attend."""
    att = state.attention
    return None if att is None else att[row]


def step_record(vocab, t, token, logp_row, k, cum, tokens, attention=None, unk=0.0) -> Step:
    probs = logp_row.exp()
    alts = ()
    if k:
        top = torch.topk(probs, min(k, probs.numel()))
        # as Python numbers first: a comparison or an index per element of a small tensor costs far more than the math
        alts = tuple(Candidate(i, vocab.itos[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist()) if p > 0)
    words = [vocab.itos[i] for i in tokens]
    return Step(t, int(token), vocab.itos[int(token)], float(probs[token]), float(cum), alts,
                float(probs[vocab.eos_id]), tuple(tokens), detokenize(words),
                attention=None if attention is None else tuple(attention.tolist()), unk_prob=float(unk))


def unk_probs(logits: torch.Tensor, vocab) -> tuple[list[float], list[bool]]:
    """Per row of raw logits (n, V): the probability of <UNK> before masking, and whether it was the likeliest token."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    return probs[:, vocab.unk_id].tolist(), (probs.argmax(-1) == vocab.unk_id).tolist()


def stop_fields(stop: str, unk_prob: float | None, unk_top: bool) -> dict:
    """The last record's stop fields; an <EOS> that won only because <UNK> was masked is reported as "unk"."""
    return {"stop": "unk" if stop == "eos" and unk_top else stop, "stop_unk_prob": unk_prob}

