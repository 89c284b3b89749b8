"""Decoding as a generator of small frozen Step records.

`encode` runs the CNN once per image; `stream` decodes from its ImageFeatures through the decoder's own seam
(`start`, `step`) with the settings of one GenerationConfig. Greedy, sampling, beam search, guided decoding,
branching, the CLI, the app and self-critical training's rollouts (`generate_batch`) all go through that seam;
`caption()` just drains `stream()`.

Guided decoding is constrained beam search (Anderson et al., "Guided Open Vocabulary Image Captioning with
Constrained Beam Search", EMNLP 2017) with one disjunctive constraint: the caption must use one of the words that
the CNN's confident ImageNet labels map to (captioner.imagenet.constraint_for). Hypotheses are kept in two beams,
without and with a required word; the caption returned is the best that has one, else the unconstrained best.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .confidence import expected_words
from .generation import GenerationConfig
from .imagenet import Constraint, constraint_for
from .model import ImageFeatures, device_of, encode
from .preprocess import preprocess_batch
from .processors import Processors, processors_for
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
    # Guided decoding, on every record: the word required and why (the ImageNet labels, how confident); on the last
    # record also whether the caption meets it (constraint.met; False: it fell back to the unconstrained best).
    constraint: Constraint | None = None
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


def describe_stop(last: Step) -> str:
    """Why a caption ended, in words, from its last record (empty for a record that is not the last)."""
    if last.stop == "eos":
        return "the model ended it (`<EOS>` won)"
    if last.stop == "max_len":
        return "it reached the maximum length"
    if last.stop == "unk":
        return (f"the model wanted a word outside its vocabulary next (`<UNK>`, p = {last.stop_unk_prob:.0%}), which is "
                "never emitted; `<EOS>` was the likeliest of the rest, so the caption may be cut off")
    return ""


def _features(model, image, features: ImageFeatures | None) -> ImageFeatures:
    if (image is None) == (features is None):
        raise ValueError("give either an image or features= (from decode.encode), not both or neither")
    return encode(model, image) if features is None else features.to(device_of(model))


def _check_model(model) -> None:
    if model.vocab is None:
        raise ValueError("this model has no vocabulary; load it with Captioner.from_pretrained or pass vocab=")


def _history(rows: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Token lists of equal length -> (n, t) LongTensor (t may be 0)."""
    return torch.tensor(rows, dtype=torch.long, device=device)  # [[]] -> (1, 0)


def _attention(state, row: int = 0) -> torch.Tensor | None:
    """The attention weights (N,) behind the newest logits of batch row `row`; None for decoders that do not attend."""
    att = state.attention
    return None if att is None else att[row]


def _record(vocab, t, token, logp_row, k, cum, tokens, attention=None, unk=0.0) -> Step:
    probs = logp_row.exp()
    alts = ()
    if k:
        top = torch.topk(probs, min(k, probs.numel()))
        # as Python numbers first: a comparison or index per element of a tensor costs ~20 us each at this size
        alts = tuple(Candidate(i, vocab.itos[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist()) if p > 0)
    words = [vocab.itos[i] for i in tokens]
    return Step(t, int(token), vocab.itos[int(token)], float(probs[token]), float(cum), alts,
                float(probs[vocab.eos_id]), tuple(tokens), detokenize(words),
                attention=None if attention is None else tuple(attention.tolist()), unk_prob=float(unk))


def _unk_probs(logits: torch.Tensor, vocab) -> tuple[list[float], list[bool]]:
    """Per row of raw logits (n, V): the probability of <UNK> before masking, and whether it was the likeliest token."""
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    return probs[:, vocab.unk_id].tolist(), (probs.argmax(-1) == vocab.unk_id).tolist()


def _ended(stop: str, unk_prob: float | None, unk_top: bool) -> dict:
    """The last record's stop fields; an <EOS> that won only because <UNK> was masked is reported as "unk"."""
    return {"stop": "unk" if stop == "eos" and unk_top else stop, "stop_unk_prob": unk_prob}


def _pick(scores: torch.Tensor, sample: bool, generator) -> torch.Tensor:
    """One token per row of scores (n, V), already through the rules and warpers: the likeliest, or drawn."""
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


@torch.inference_mode()
def stream(model, image=None, config: GenerationConfig | None = None, *, features: ImageFeatures | None = None,
           prefix: Sequence[int] = (), constraint: Constraint | None = None, **settings) -> Iterator[Step]:
    """Yield one Step per generated word (beam: the current best hypothesis each step, then the final one); with
    `tree=True` (GenerationConfig.tree) also a SearchStep after each step of the search, and the last Step's `tree`.

    Give an image, or `features` from `encode` (decode one photo many times without re-running the CNN).
    Settings come from `config` with keyword overrides (`stream(model, img, strategy="beam")`).
    `prefix` forces the first words (branching: "what if it had said *cat* here?"); a prefix ending in <EOS>
    forces the end, which rescores a given caption. The last record's `stop` says why decoding ended, and its
    `history` holds the final caption's earlier records. Guided decoding takes the image's `constraint` when given
    (it depends only on the image and guide_threshold: the app keeps it with the image), else works it out.
    """
    config = GenerationConfig.make(config, **settings)
    _check_model(model)
    vocab = model.vocab
    max_len = config.resolved_max_len(model.config.max_len)
    prefix = [int(p) for p in prefix]
    for p in prefix:
        if not 0 <= p < len(vocab) or p in vocab.unsaid:
            raise ValueError(f"prefix token {p} is not a word of this model's vocabulary (size {len(vocab)})")
    features = _features(model, image, features)
    if len(features) != 1:
        raise ValueError(f"stream decodes one image; got features of {len(features)} (use caption_batch for many)")
    if config.strategy == "beam":
        yield from _beam(model, features, config, max_len, prefix)
        return
    if config.strategy == "guided":
        if constraint is None:
            constraint = constraint_for(features, vocab, config.guide_threshold, expected=expected_words(model, features))
        yield from _beam(model, features, config, max_len, prefix, constraint)
        return
    generator = None
    if config.strategy == "sample":
        generator = torch.Generator(device=features.vector.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    rules, warpers = processors_for(config, vocab).split()
    logits, state = model.decoder.start(features)
    tokens: list[int] = []
    done: list[Step] = []
    path: list[Node] | None = [] if config.tree else None  # greedy and sampling search one path: every node chosen
    cum = 0.0
    ended = _ended("max_len", None, False)
    for t in range(max_len):
        (unk,), (unk_top,) = _unk_probs(logits, vocab)
        hist = _history([tokens])
        logp = F.log_softmax(rules(logits, hist), dim=-1)  # (1, V): the records' probabilities
        token = prefix[t] if t < len(prefix) else int(_pick(warpers(logp, hist), generator is not None, generator))
        logp = logp[0]
        if path is not None:
            at = cum + float(logp[token])
            path.append(Node(t, t - 1 if t else None, t, token, vocab.itos[token], at, at, None, "chosen"))
            yield SearchStep(t, (path[-1],))
        if token == vocab.eos_id:
            ended = _ended("eos", unk, unk_top)
            break
        if done:
            yield done[-1]  # held back one step so the last record can say why decoding stopped
        cum += float(logp[token])
        tokens.append(token)
        done.append(_record(vocab, t, token, logp, config.num_alternatives, cum, tokens, _attention(state), unk))
        logits, state = model.decoder.step(torch.tensor([token], device=features.vector.device), state)
    if done:
        yield replace(done[-1], **ended, history=tuple(done[:-1]), tree=None if path is None else tuple(path))


@dataclass
class _Hyp:
    tokens: list[int]
    # per word: (log-prob row of its step, cumulative score, attention, p(<UNK>)): records are built only when shown
    rows: list[tuple]
    score: float  # sum of log-probabilities
    end: tuple[float, bool] = (0.0, False)  # a finished one: p(<UNK>) at its <EOS> step, and whether <UNK> led there
    node: int | None = None  # a recorded search (GenerationConfig.tree): its last word's Node (finished: its <EOS>'s)

    def records(self, vocab, k: int, first: int = 0) -> list[Step]:
        return [_record(vocab, t, self.tokens[t], row, k, cum, self.tokens[: t + 1], att, unk)
                for t, (row, cum, att, unk) in enumerate(self.rows[first:], start=first)]


def _common_prefix(sequences: list[list[int]]) -> int:
    """The length of the longest prefix that all `sequences` share."""
    n = min(map(len, sequences))
    for i in range(n):
        if any(seq[i] != sequences[0][i] for seq in sequences):
            return i
    return n


def _beam(model, features: ImageFeatures, config: GenerationConfig, max_len: int, prefix: list[int],
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
    vocab, k, beam_size = model.vocab, config.num_alternatives, config.beam_size
    device = features.vector.device
    required = sorted({vocab.stoi[w] for w in constraint.words}) if constraint is not None else []
    groups = (0, 1) if required else (0,)
    is_required = torch.zeros(len(vocab), dtype=torch.bool, device=device)
    is_required[required] = True
    is_required[vocab.eos_id] = False  # ending keeps a hypothesis in its own group
    rules = processors_for(config, vocab, constraint=constraint, forced=len(prefix))
    logits, state = model.decoder.start(features)
    live = [_Hyp([], [], 0.0)]
    met = [False]  # per live hypothesis: has it used a required word?
    finished: dict[int, list[_Hyp]] = {g: [] for g in groups}
    norm = lambda h: h.score / max(1, len(h.tokens)) ** config.length_penalty  # noqa: E731
    tag = (lambda r: r) if constraint is None else (lambda r: replace(r, constraint=constraint))  # noqa: E731
    streamed = 0  # words streamed so far: the candidates' common prefix, less the last word of the shortest
    nodes: list[Node] | None = [] if config.tree else None

    def node(parent: int | None, t: int, token: int, total: float, words: int, group: int, status: str,
             rule: str | None = None) -> int:
        nodes.append(Node(len(nodes), parent, t, token, vocab.itos[token], total,
                          total / max(1, words) ** config.length_penalty, group if required else None, status, rule))
        return nodes[-1].id

    def done(g: int, hyps: list[_Hyp], t: int) -> bool:
        ends = sorted((norm(h) for h in finished[g] if h.tokens), reverse=True)
        if not hyps:
            return True
        if len(ends) < beam_size:
            return False
        if beam_size == 1:  # the first end, as greedy decoding: beam search of size 1 is greedy, word for word
            return True
        best_live = max(h.score for h in hyps) / max(1, t + 1) ** config.length_penalty
        return best_live <= ends[beam_size - 1]

    for t in range(max_len):
        unk, unk_top = _unk_probs(logits, vocab)
        if nodes is None:
            logp = F.log_softmax(rules(logits, _history([h.tokens for h in live])), dim=-1)  # (n, V)
        else:
            hist = _history([h.tokens for h in live])
            ruled = rules(logits, hist)
            logp, first = F.log_softmax(ruled, dim=-1), len(nodes)
            # What each word a rule removed would have scored: its log-probability before the rules, plus its
            # hypothesis's score (-inf for the rest). (Renormalised after the rules, the others' rise a little.)
            so_far = torch.tensor([h.score for h in live], device=device).unsqueeze(1)  # (n, 1)
            before = torch.where((ruled == -math.inf) & (logits != -math.inf),
                                 F.log_softmax(logits.float(), dim=-1) + so_far, -math.inf)
        total = logp + torch.tensor([h.score for h in live], device=logp.device).unsqueeze(1)  # (n, V)
        if t < len(prefix):  # forced word: every beam takes it
            forced = torch.full_like(total, -math.inf)
            forced[:, prefix[t]] = total[:, prefix[t]]
            total = forced
        # The group each expansion lands in: met already, or meeting it with this word.
        dest = torch.tensor(met, device=device).unsqueeze(1) | is_required.unsqueeze(0) if required else None  # (n, V)
        survivors, parents, survivor_met = [], [], []
        for g in groups:
            scores_g = total if dest is None else total.masked_fill(dest != bool(g), -math.inf)
            width = min(2 * beam_size, scores_g.numel())
            scores, flat = torch.topk(scores_g.reshape(-1), width)  # (width,)
            kept = 0
            scanned = list(zip(scores.tolist(), flat.tolist()))
            taken, floor = len(scanned), -math.inf  # (recorded search) expansions looked at, the lowest kept score
            for j, (score, index) in enumerate(scanned):
                if score == -math.inf:
                    taken = j
                    break
                parent, token = divmod(index, logp.size(1))
                h = live[parent]
                if token == vocab.eos_id:  # its score counts the <EOS>: ending is a choice, and not a free one
                    end = None if nodes is None else node(h.node, t, token, score, len(h.tokens), g, "finished")
                    finished[g].append(_Hyp(h.tokens, h.rows, score, (unk[parent], unk_top[parent]), end))
                else:
                    row = (logp[parent], score, _attention(state, parent), unk[parent])
                    at = None if nodes is None else node(h.node, t, token, score, t + 1, g, "kept")
                    survivors.append(_Hyp(h.tokens + [token], h.rows + [row], score, node=at))
                    parents.append(parent)
                    survivor_met.append(bool(g))
                    kept, floor = kept + 1, score
                if kept == beam_size:
                    taken = j + 1
                    break
            if nodes is not None:
                for score, index in scanned[taken:]:  # outscored: in the top 2 x beam_size, but the beam was full
                    if score == -math.inf:
                        break
                    parent, token = divmod(index, logp.size(1))
                    node(live[parent].node, t, token, score, t + (token != vocab.eos_id), g, "pruned")
                if t >= len(prefix):  # (a forced word of a branch: every other word is the user's choice, not a rule's)
                    _record_blocked(node, live, logits, hist, before, dest, g, floor if kept == beam_size else -math.inf,
                                    beam_size, t, vocab.eos_id, rules)
        if nodes is not None:
            yield SearchStep(t, tuple(nodes[first:]))
        if not survivors or all(done(g, [h for h, m in zip(survivors, survivor_met) if m == bool(g)], t) for g in groups):
            break
        candidates = [h.tokens for h in survivors] + [h.tokens for g in groups for h in finished[g] if h.tokens]
        agreed = min(_common_prefix(candidates), min(map(len, candidates)) - 1)
        if agreed > streamed:
            yield from (tag(r) for r in survivors[0].records(vocab, k, first=streamed)[: agreed - streamed])
            streamed = agreed
        live, met = survivors, survivor_met
        state = state.select(torch.tensor(parents, device=device))
        logits, state = model.decoder.step(torch.tensor([h.tokens[-1] for h in live], device=device), state)
    ended = {g: [h for h in finished[g] if h.tokens] for g in groups}
    fit = free = None  # guided: the best caption with a required word, and the best without
    if required:
        fit = max(ended[1], key=norm, default=None) or max((h for h, m in zip(live, met) if m), key=norm, default=None)
        free = max(ended[0], key=norm, default=None) or max((h for h, m in zip(live, met) if not m), key=norm, default=None)
    if ended[groups[-1]]:  # the best caption that meets the constraint (plain beam: the best ended one)
        pool, stop, ok = ended[groups[-1]], "eos", True
    elif ended[0]:  # guided, and no caption with a required word ended: the unconstrained best
        pool, stop, ok = ended[0], "eos", False
    else:  # no beam ended: take the best live one rather than fail (one that meets the constraint first)
        live_met = [h for h, m in zip(live, met) if m]
        pool, stop, ok = live_met or live, "max_len", bool(live_met)
    best = max(pool, key=norm)
    unfit = ok and free is not None and norm(free) - norm(best) > config.guide_margin
    if unfit:  # the word fits only into a sentence the model believes much less than its own: say nothing
        best, ok = free, False
        stop = "eos" if any(free is h for h in ended[0]) else "max_len"
    tree = None
    if nodes is not None:
        at = best.node
        while at is not None:  # the final caption's path, from its last word (or its <EOS>) back to its first
            nodes[at] = replace(nodes[at], status="chosen")
            at = nodes[at].parent
        tree = tuple(nodes)
    if best.tokens:
        steps = best.records(vocab, k)
        ended_as = _ended(stop, *best.end) if stop == "eos" else _ended(stop, None, False)
        last = replace(steps[-1], **ended_as, history=tuple(tag(r) for r in steps[:-1]), tree=tree)
        yield from last.history[streamed:]
        if constraint is not None:
            final = constraint
            if required:
                used = next((vocab.itos[tok] for tok in best.tokens if tok in set(required)), None)
                final = replace(constraint, met=ok, used=used if ok else None, margin=config.guide_margin,
                                fit=None if fit is None else norm(fit), free=None if free is None else norm(free),
                                unfit=unfit)
            last = replace(last, constraint=final)
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


def last(steps: Iterator[Step]) -> Step | None:
    """The last Step record of a stream (None for a stream without words; a recorded search's SearchSteps skipped)."""
    out = None
    for record in steps:
        if isinstance(record, Step):
            out = record
    return out


def final(model, image=None, config: GenerationConfig | None = None, *, features: ImageFeatures | None = None,
          prefix: Sequence[int] = (), **settings) -> Step | None:
    """The last record of `stream`: `final(...).caption_steps()` are the caption's words, `.stop` why it ended."""
    return last(stream(model, image, config, features=features, prefix=prefix, **settings))


def caption(model, image=None, config: GenerationConfig | None = None, *, features: ImageFeatures | None = None,
            prefix: Sequence[int] = (), **settings) -> str:
    """The caption of one image: the text of the last record of `stream`. Greedy without a prefix takes
    `generate_batch` instead, the same words without the inspector's per-step records (top-k, attention copies,
    p(<UNK>), text so far), which nobody reads here."""
    config = GenerationConfig.make(config, **settings)
    if config.strategy == "greedy" and not prefix:
        _check_model(model)
        one = _features(model, image, features)
        if len(one) != 1:
            raise ValueError(f"caption decodes one image; got features of {len(one)} (use caption_batch for many)")
        with torch.inference_mode():
            tokens = generate_batch(model, one, config)  # (1, T)
        return model.vocab.decode(tokens[0].tolist())
    out = final(model, image, config, features=features, prefix=prefix)
    return out.text if out is not None else ""


def rescore(model, image=None, tokens: Sequence[int] = (), *, features: ImageFeatures | None = None,
            num_alternatives: int = 5) -> list[Step]:
    """The Step records of a given caption (probabilities and alternatives at every word)."""
    eos = model.vocab.eos_id
    return list(stream(model, image, features=features, prefix=[*tokens, eos], max_len=len(tokens) + 1,
                       num_alternatives=num_alternatives))


@torch.inference_mode()
def caption_batch(model, images: Sequence | None = None, config: GenerationConfig | None = None, *,
                  features: ImageFeatures | None = None, batch_size: int = 32, steps: bool = False,
                  **settings) -> list[str] | list[Step | None]:
    """Captions of many images (or of batched `features`): the encoder batched; greedy decoding batched across
    images, other strategies image by image through `stream`. With `steps=True`, each image's last Step record
    instead of its text (as `final` gives it: the whole caption's records, why it stopped, guided's constraint),
    every image decoded through `stream`; None for an image without a caption."""
    config = GenerationConfig.make(config, **settings)
    _check_model(model)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected 1 or more")
    if (images is None) == (features is None):
        raise ValueError("give either images or features=, not both or neither")
    n = len(images) if features is None else len(features)
    out: list = []
    for start in range(0, n, batch_size):
        if features is None:
            x = preprocess_batch(list(images[start : start + batch_size]), model.config)  # (b, 3, S, S)
            chunk = model.encode(x.to(device_of(model)))
        else:
            chunk = features.select(slice(start, start + batch_size)).to(device_of(model))
        if config.strategy == "greedy" and not steps:
            tokens = generate_batch(model, chunk, config)  # (b, T): every precision is batch-invariant
            out.extend(model.vocab.decode(row.tolist()) for row in tokens)
        else:
            one = config if steps else replace(config, num_alternatives=0)
            lasts = [final(model, config=one, features=chunk.select(slice(i, i + 1))) for i in range(len(chunk))]
            out.extend(lasts if steps else [last.text if last is not None else "" for last in lasts])
    return out


def generate_batch(model, features: ImageFeatures, config: GenerationConfig | None = None, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched greedy (or, with strategy "sample", sampled) decoding of n images -> token ids (n, T), <EOS>-padded.

    The fast path for many images (caption_batch) and for self-critical training's rollouts, through the same
    processors as `stream` (processors_for: the rules, then sampling's temperature, top-k and top-p). No records:
    only the tokens. `generator` draws the samples (default: one seeded with config.seed, else torch's own).
    """
    config = config or GenerationConfig()
    vocab, sample = model.vocab, config.strategy == "sample"
    if config.strategy not in ("greedy", "sample"):
        raise ValueError(f"strategy={config.strategy!r}: generate_batch decodes greedy or sample (beam: stream)")
    if sample and generator is None and config.seed is not None:
        generator = torch.Generator(device=features.vector.device).manual_seed(config.seed)
    rules = processors_for(config, vocab)
    n = len(features)
    logits, state = model.decoder.start(features)
    tokens = torch.zeros(n, 0, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(config.resolved_max_len(model.config.max_len)):
        nxt = _pick(rules(logits, tokens), sample, generator).cpu()  # (n,)
        tokens = torch.cat((tokens, nxt.unsqueeze(1)), dim=1)  # (n, t+1)
        alive &= nxt != vocab.eos_id
        if not alive.any():
            break
        logits, state = model.decoder.step(nxt.to(features.vector.device), state)
    return tokens
