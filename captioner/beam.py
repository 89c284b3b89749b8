"""Beam search and guided decoding (constrained beam search), as a generator of Step records: `beam` runs the
steps of one search (`_Search`): expand every live hypothesis, stream the prefix every candidate agrees on, choose
the final caption, and report how guided decoding's constraint ended (a ConstraintOutcome on the last record)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F

from .generation import GenerationConfig
from .imagenet import Constraint, ConstraintOutcome
from .model import ImageFeatures
from .processors import Processors, processors_for
from .steps import Node, SearchStep, Step, attention_of, history, step_record, stop_fields, unk_probs


@dataclass
class _Hyp:
    tokens: list[int]
    # per word: (log-prob row of its step, cumulative score, attention, p(<UNK>)): records are built only when shown
    rows: list[tuple]
    score: float  # sum of log-probabilities
    end: tuple[float, bool] = (0.0, False)  # a finished one: p(<UNK>) at its <EOS> step, and whether <UNK> led there
    node: int | None = None  # a recorded search (GenerationConfig.tree): its last word's Node (finished: its <EOS>'s)

    def records(self, vocab, k: int, first: int = 0) -> list[Step]:
        return [step_record(vocab, t, self.tokens[t], row, k, cum, self.tokens[: t + 1], att, unk)
                for t, (row, cum, att, unk) in enumerate(self.rows[first:], start=first)]


def _common_prefix(sequences: list[list[int]]) -> int:
    """The length of the longest prefix that all `sequences` share."""
    n = min(map(len, sequences))
    for i in range(n):
        if any(seq[i] != sequences[0][i] for seq in sequences):
            return i
    return n


@dataclass
class _Grown:
    """One step's survivors: the hypotheses kept (both groups), the live row each extends, and whether each has
    used a required word."""

    hyps: list[_Hyp]
    parents: list[int]
    met: list[bool]


@dataclass
class _Choice:
    """The final caption and how it was chosen: why it stopped, whether it meets the constraint (`ok`), and guided
    decoding's two candidates (the best with a required word, `fit`, and without, `free`)."""

    best: _Hyp
    stop: str
    ok: bool
    fit: _Hyp | None
    free: _Hyp | None
    unfit: bool


def beam(model, features: ImageFeatures, config: GenerationConfig, max_len: int, prefix: list[int],
         constraint: Constraint | None = None) -> Iterator[Step]:
    """Beam search, beams batched through one decoder step; never fails when no beam ends.

    With a `constraint` (guided decoding) that requires words, hypotheses are grouped by whether they have used a
    required word yet, and each group keeps its own `beam_size` best: the unmet group's hypotheses move to the met
    group by taking a required word. The caption is the best finished one of the met group, unless the best of the
    unmet one (the caption without the word) is more than `config.guide_margin` likelier per word: then that one,
    and the constraint says why. Without required words this is plain beam search, step for step.

    The stream only grows: a word is streamed once every candidate (live or finished) agrees on it, so each partial
    caption is a prefix of the final one. A group stops when it has `beam_size` finished candidates and its best live
    one, length-normalised, is no better than the worst of them. A finished caption's score includes its <EOS>
    (without it, ending early cost nothing, and captions that end after their full stop lost to ones without it).

    With `config.tree` the search is recorded (Node, SearchStep): at each step and in each group, the expansions it
    kept, those that ended (finished), those of its top 2 x beam_size that lost their place (pruned), and those that
    a rule removed but that scored, before it, above the lowest kept one (blocked)."""
    search = _Search(model, features, config, prefix, constraint)
    for t in range(max_len):
        first = 0 if search.nodes is None else len(search.nodes)
        grown = search.expand(t)
        if search.nodes is not None:
            yield SearchStep(t, tuple(search.nodes[first:]))
        if not grown.hyps or all(search.done(g, [h for h, m in zip(grown.hyps, grown.met) if m == bool(g)], t)
                                 for g in search.groups):
            break
        yield from search.agreed(grown.hyps)
        search.advance(grown)
    yield from search.finish(search.choose())


class _Search:
    """The state of one beam search: the live hypotheses and whether each has met the constraint, the finished
    ones per group, the decoder's state, how much of the caption was streamed, and (config.tree) the nodes."""

    def __init__(self, model, features: ImageFeatures, config: GenerationConfig, prefix: list[int],
                 constraint: Constraint | None):
        vocab = model.vocab
        self.model, self.vocab, self.config, self.prefix, self.constraint = model, vocab, config, prefix, constraint
        self.k, self.beam_size, self.device = config.num_alternatives, config.beam_size, features.vector.device
        self.required = sorted({vocab.stoi[w] for w in constraint.words}) if constraint is not None else []
        self.groups = (0, 1) if self.required else (0,)
        self.is_required = torch.zeros(len(vocab), dtype=torch.bool, device=self.device)
        self.is_required[self.required] = True
        self.is_required[vocab.eos_id] = False  # ending keeps a hypothesis in its own group
        self.rules = processors_for(config, vocab, constraint=constraint, forced=len(prefix))
        self.logits, self.state = model.decoder.start(features)
        self.live = [_Hyp([], [], 0.0)]
        self.met = [False]  # per live hypothesis: has it used a required word?
        self.finished: dict[int, list[_Hyp]] = {g: [] for g in self.groups}
        self.streamed = 0  # words streamed so far: the candidates' common prefix, less the last word of the shortest
        self.nodes: list[Node] | None = [] if config.tree else None

    def norm(self, h: _Hyp) -> float:
        return h.score / max(1, len(h.tokens)) ** self.config.length_penalty

    def tag(self, record: Step) -> Step:
        return record if self.constraint is None else replace(record, constraint=self.constraint)

    def node(self, parent: int | None, t: int, token: int, total: float, words: int, group: int, status: str,
             rule: str | None = None) -> int:
        self.nodes.append(Node(len(self.nodes), parent, t, token, self.vocab.itos[token], total,
                               total / max(1, words) ** self.config.length_penalty,
                               group if self.required else None, status, rule))
        return self.nodes[-1].id

    def done(self, g: int, hyps: list[_Hyp], t: int) -> bool:
        ends = sorted((self.norm(h) for h in self.finished[g] if h.tokens), reverse=True)
        if not hyps:
            return True
        if len(ends) < self.beam_size:
            return False
        if self.beam_size == 1:  # the first end, as greedy decoding: beam search of size 1 is greedy, word for word
            return True
        best_live = max(h.score for h in hyps) / max(1, t + 1) ** self.config.length_penalty
        return best_live <= ends[self.beam_size - 1]

    def expand(self, t: int) -> _Grown:
        """Step t: every live hypothesis extended by every word the rules allow (a branch's forced word: only that
        one), each group keeping its `beam_size` best; those that end go to the finished."""
        unk, unk_top = unk_probs(self.logits, self.vocab)
        hist = history([h.tokens for h in self.live])
        ruled = self.rules(self.logits, hist)
        logp, before = F.log_softmax(ruled, dim=-1), None  # (n, V)
        if self.nodes is not None:
            # What each word a rule removed would have scored: its log-probability before the rules, plus its
            # hypothesis's score (-inf for the rest). (Renormalised after the rules, the others' rise a little.)
            so_far = torch.tensor([h.score for h in self.live], device=self.device).unsqueeze(1)  # (n, 1)
            before = torch.where((ruled == -math.inf) & (self.logits != -math.inf),
                                 F.log_softmax(self.logits.float(), dim=-1) + so_far, -math.inf)
        total = logp + torch.tensor([h.score for h in self.live], device=logp.device).unsqueeze(1)  # (n, V)
        if t < len(self.prefix):  # forced word: every beam takes it
            forced = torch.full_like(total, -math.inf)
            forced[:, self.prefix[t]] = total[:, self.prefix[t]]
            total = forced
        # The group each expansion lands in: met already, or meeting it with this word.
        dest = (torch.tensor(self.met, device=self.device).unsqueeze(1) | self.is_required.unsqueeze(0)
                if self.required else None)  # (n, V)
        grown = _Grown([], [], [])
        for g in self.groups:
            scores_g = total if dest is None else total.masked_fill(dest != bool(g), -math.inf)
            width = min(2 * self.beam_size, scores_g.numel())
            scores, flat = torch.topk(scores_g.reshape(-1), width)  # (width,)
            scanned = list(zip(scores.tolist(), flat.tolist()))
            kept, taken, floor = self.keep(g, t, scanned, logp, (unk, unk_top), grown)
            if self.nodes is not None:
                self.record_losers(g, t, scanned[taken:], logp.size(1))
                if t >= len(self.prefix):  # (a forced word of a branch: every other word is the user's, not a rule's)
                    _record_blocked(self.node, self.live, self.logits, hist, before, dest, g,
                                    floor if kept == self.beam_size else -math.inf, self.beam_size, t,
                                    self.vocab.eos_id, self.rules)
        return grown

    def keep(self, g: int, t: int, scanned: list[tuple[float, int]], logp: torch.Tensor, unk: tuple[list, list],
             grown: _Grown) -> tuple[int, int, float]:
        """Group g's best expansions, best first, until `beam_size` are kept alive; an <EOS> among them finishes its
        hypothesis. Returns how many were kept, how many of `scanned` were looked at, and the lowest kept score."""
        kept, taken, floor = 0, len(scanned), -math.inf
        for j, (score, index) in enumerate(scanned):
            if score == -math.inf:
                taken = j
                break
            parent, token = divmod(index, logp.size(1))
            h = self.live[parent]
            if token == self.vocab.eos_id:  # its score counts the <EOS>: ending is a choice, and not a free one
                end = None if self.nodes is None else self.node(h.node, t, token, score, len(h.tokens), g, "finished")
                self.finished[g].append(_Hyp(h.tokens, h.rows, score, (unk[0][parent], unk[1][parent]), end))
            else:
                row = (logp[parent], score, attention_of(self.state, parent), unk[0][parent])
                at = None if self.nodes is None else self.node(h.node, t, token, score, t + 1, g, "kept")
                grown.hyps.append(_Hyp(h.tokens + [token], h.rows + [row], score, node=at))
                grown.parents.append(parent)
                grown.met.append(bool(g))
                kept, floor = kept + 1, score
            if kept == self.beam_size:
                taken = j + 1
                break
        return kept, taken, floor

    def record_losers(self, g: int, t: int, losers: list[tuple[float, int]], vocab_size: int) -> None:
        """Outscored: in the top 2 x beam_size, but the beam was full (pruned)."""
        for score, index in losers:
            if score == -math.inf:
                break
            parent, token = divmod(index, vocab_size)
            self.node(self.live[parent].node, t, token, score, t + (token != self.vocab.eos_id), g, "pruned")

    def agreed(self, survivors: list[_Hyp]) -> list[Step]:
        """The records of the words every candidate (live or finished) now agrees on and that were not streamed yet:
        the stream only grows, each partial caption a prefix of the final one."""
        candidates = [h.tokens for h in survivors] + [h.tokens for g in self.groups for h in self.finished[g] if h.tokens]
        agreed = min(_common_prefix(candidates), min(map(len, candidates)) - 1)
        if agreed <= self.streamed:
            return []
        records = survivors[0].records(self.vocab, self.k, first=self.streamed)[: agreed - self.streamed]
        self.streamed = agreed
        return [self.tag(r) for r in records]

    def advance(self, grown: _Grown) -> None:
        """The survivors become the live hypotheses, and the decoder takes their last words."""
        self.live, self.met = grown.hyps, grown.met
        self.state = self.state.select(torch.tensor(grown.parents, device=self.device))
        last = torch.tensor([h.tokens[-1] for h in self.live], device=self.device)
        self.logits, self.state = self.model.decoder.step(last, self.state)

    def choose(self) -> _Choice:
        """The final caption: the best finished one that meets the constraint (plain beam: the best finished one),
        else the unconstrained best, else the best live one; guided decoding keeps the caption without the word
        when it is more than guide_margin likelier per word."""
        norm, live, met = self.norm, self.live, self.met
        ended = {g: [h for h in self.finished[g] if h.tokens] for g in self.groups}
        fit = free = None  # guided: the best caption with a required word, and the best without
        if self.required:
            fit = max(ended[1], key=norm, default=None) or max((h for h, m in zip(live, met) if m), key=norm, default=None)
            free = max(ended[0], key=norm, default=None) or max((h for h, m in zip(live, met) if not m), key=norm,
                                                                default=None)
        if ended[self.groups[-1]]:  # the best caption that meets the constraint (plain beam: the best ended one)
            pool, stop, ok = ended[self.groups[-1]], "eos", True
        elif ended[0]:  # guided, and no caption with a required word ended: the unconstrained best
            pool, stop, ok = ended[0], "eos", False
        else:  # no beam ended: take the best live one rather than fail (one that meets the constraint first)
            live_met = [h for h, m in zip(live, met) if m]
            pool, stop, ok = live_met or live, "max_len", bool(live_met)
        best = max(pool, key=norm)
        unfit = ok and free is not None and norm(free) - norm(best) > self.config.guide_margin
        if unfit:  # the word fits only into a sentence the model believes much less than its own: say nothing
            best, ok = free, False
            stop = "eos" if any(free is h for h in ended[0]) else "max_len"
        return _Choice(best, stop, ok, fit, free, unfit)

    def outcome(self, choice: _Choice) -> ConstraintOutcome:
        """How the constraint ended: met or not, the word used, the two candidates' scores."""
        if not self.required:
            return ConstraintOutcome(self.constraint)
        used = next((self.vocab.itos[tok] for tok in choice.best.tokens if tok in set(self.required)), None)
        score = lambda h: None if h is None else self.norm(h)  # noqa: E731
        return ConstraintOutcome(self.constraint, met=choice.ok, used=used if choice.ok else None,
                                 fit=score(choice.fit), free=score(choice.free), margin=self.config.guide_margin,
                                 unfit=choice.unfit)

    def finish(self, choice: _Choice) -> Iterator[Step]:
        """The final caption's records not streamed yet, then its last, which says why it stopped, holds the whole
        caption (history), the recorded search with the caption's path chosen, and the constraint's outcome."""
        best, tree = choice.best, None
        if self.nodes is not None:
            at = best.node
            while at is not None:  # the final caption's path, from its last word (or its <EOS>) back to its first
                self.nodes[at] = replace(self.nodes[at], status="chosen")
                at = self.nodes[at].parent
            tree = tuple(self.nodes)
        if not best.tokens:
            return
        steps = best.records(self.vocab, self.k)
        ended_as = stop_fields(choice.stop, *best.end) if choice.stop == "eos" else stop_fields(choice.stop, None, False)
        last = replace(steps[-1], **ended_as, history=tuple(self.tag(r) for r in steps[:-1]), tree=tree)
        yield from last.history[self.streamed :]
        if self.constraint is not None:
            last = replace(last, constraint=self.outcome(choice))
        yield last


def _record_blocked(node, live: list[_Hyp], logits: torch.Tensor, hist: torch.Tensor, before: torch.Tensor,
                    dest: torch.Tensor | None, g: int, floor: float, beam_size: int, t: int, eos: int,
                    rules: "Processors") -> None:
    """A recorded beam step's blocked expansions in group `g`: those a rule removed that would have scored (`before`:
    -inf for the rest) above `floor`, the lowest kept score (a full beam; else any), at most beam_size of them, each
    with the name of its rule (Processors.blocker)."""
    if dest is not None:
        before = before.masked_fill(dest != bool(g), -math.inf)
    scores, flat = torch.topk(before.reshape(-1), min(beam_size, before.numel()))
    for score, index in zip(scores.tolist(), flat.tolist()):
        if score == -math.inf or score <= floor:
            break
        parent, token = divmod(index, logits.size(1))
        rule = rules.blocker(logits[parent : parent + 1], hist[parent : parent + 1], token)
        node(live[parent].node, t, token, score, t + (token != eos), g, "blocked", type(rule).__name__)
