"""Decoding as a generator of small frozen Step records.

Everything (greedy, sampling, beam search, branching, the CLI, the app) drives the decoder through
`Decoder.step`; `caption()` just drains `stream()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .preprocess import preprocess
from .vocab import detokenize

STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class Candidate:
    token: int
    word: str
    prob: float  # the model's probability of this word at this step


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
    stop: str | None = None  # on the last record: "eos" (the model ended it) or "max_len"


@dataclass
class _Hyp:
    tokens: list[int]
    last: tuple | None  # (t, token, log-prob row) of the newest word: its Step is built only if it is shown
    score: float  # sum of log-probabilities

    def step(self, vocab, k: int) -> Step:
        t, token, row = self.last
        return _record(vocab, t, token, row, k, self.score, self.tokens)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode_image(model, image) -> torch.Tensor:
    """A PIL image, path or bytes -> image feature (1, E); a feature tensor (E,) or (1, E) passes through."""
    if isinstance(image, torch.Tensor) and image.dim() in (1, 2) and image.is_floating_point():
        return image.reshape(1, -1).to(_device(model))  # (1, E)
    x = image if isinstance(image, torch.Tensor) else preprocess(image, model.config)
    return model.encode(x.reshape(1, *x.shape[-3:]).to(_device(model)))  # (1, E)


def _check(model, strategy: str, max_len: int | None, beam_size: int, temperature: float, top_p: float, top_k: int, num_alternatives: int) -> int:
    if model.vocab is None:
        raise ValueError("this model has no vocabulary; load it with Captioner.from_pretrained or pass vocab=")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    max_len = model.config.max_len if max_len is None else max_len
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: expected at least 1 word")
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size}: expected 1 or more")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected a positive number")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected a value in (0, 1]")
    if top_k < 0 or num_alternatives < 0:
        raise ValueError(f"top_k={top_k}, num_alternatives={num_alternatives}: expected 0 or more")
    return max_len


def _mask(logits: torch.Tensor, vocab, histories: Sequence[Sequence[int]], no_repeat_ngram: int) -> torch.Tensor:
    """Never emit <PAD>/<SOS>/<UNK>, never end before the first word, optionally block repeated n-grams."""
    logits = logits.clone()
    logits[:, [vocab.pad_id, vocab.sos_id, vocab.unk_id]] = -math.inf
    for row, hist in enumerate(histories):
        if not hist:
            logits[row, vocab.eos_id] = -math.inf
        n = no_repeat_ngram
        if n and len(hist) >= n - 1:
            tail = tuple(hist[len(hist) - n + 1 :]) if n > 1 else ()
            banned = {hist[i + n - 1] for i in range(len(hist) - n + 1) if tuple(hist[i : i + n - 1]) == tail}
            if banned:
                logits[row, list(banned)] = -math.inf
    return logits


def _start(model, feature: torch.Tensor, n: int):
    """Feed the image at t=0 and <SOS> at t=1 (as in training); returns the logits for the first word."""
    _, state = model.decoder.step(feature.expand(n, -1), None)  # step 0's prediction is ignored
    sos = torch.full((n,), model.vocab.sos_id, dtype=torch.long, device=feature.device)
    return model.decoder.step(sos, state)  # (n, V), state


def _record(vocab, t, token, logp_row, k, cum, tokens) -> Step:
    probs = logp_row.exp()
    top = torch.topk(probs, min(k, probs.numel())) if k else None
    alts = tuple(Candidate(int(i), vocab.itos[int(i)], float(p)) for p, i in zip(top.values, top.indices) if p > 0) if top else ()
    words = [vocab.itos[i] for i in tokens]
    return Step(t, int(token), vocab.itos[int(token)], float(probs[token]), float(cum), alts,
                float(probs[vocab.eos_id]), tuple(tokens), detokenize(words))


def _keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Scores (..., V) with all but the k highest of each row set to -inf; k = 0 keeps them all."""
    if not k:
        return scores
    kth = scores.topk(min(k, scores.size(-1)), dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, -math.inf)


def _pick(logp: torch.Tensor, *, sample: bool, temperature: float, top_k: int, top_p: float, generator) -> int:
    """Choose one token from a row of log-probabilities (greedy, or sampled with temperature/top-k/top-p)."""
    if not sample:
        return int(torch.argmax(logp))
    scores = _keep_top_k(logp / temperature, top_k)
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # smallest set reaching top_p; always keeps the first
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream(
    model,
    image,
    *,
    strategy: str = "greedy",
    max_len: int | None = None,
    num_alternatives: int = 5,
    beam_size: int = 3,
    length_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    no_repeat_ngram: int = 0,
    prefix: Sequence[int] = (),
) -> Iterator[Step]:
    """Yield one Step per generated word (beam: the current best hypothesis each step, then the final one).

    `prefix` forces the first words (branching: "what if it had said *cat* here?"); a prefix ending in <EOS>
    forces the end, which rescores a given caption. The last record's `stop` says why decoding ended.
    """
    max_len = _check(model, strategy, max_len, beam_size, temperature, top_p, top_k, num_alternatives)
    vocab = model.vocab
    prefix = [int(p) for p in prefix]
    for p in prefix:
        if not 0 <= p < len(vocab) or p in (vocab.pad_id, vocab.sos_id, vocab.unk_id):
            raise ValueError(f"prefix token {p} is not a word of this model's vocabulary (size {len(vocab)})")
    feature = encode_image(model, image)  # (1, E)
    if strategy == "beam":
        yield from _beam(model, feature, max_len, num_alternatives, beam_size, length_penalty, no_repeat_ngram, prefix)
        return
    generator = None
    if strategy == "sample":
        generator = torch.Generator(device=feature.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    logits, state = _start(model, feature, 1)
    tokens: list[int] = []
    cum = 0.0
    pending: Step | None = None  # held back one step so the last record can say why decoding stopped
    for t in range(max_len):
        logp = F.log_softmax(_mask(logits, vocab, [tokens], no_repeat_ngram), dim=-1)[0]  # (V,)
        if t < len(prefix):
            token = prefix[t]
        else:
            token = _pick(logp, sample=strategy == "sample", temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if token == vocab.eos_id:
            if pending is not None:
                yield Step(**{**pending.__dict__, "stop": "eos"})
            return
        if pending is not None:
            yield pending
        cum += float(logp[token])
        tokens.append(token)
        pending = _record(vocab, t, token, logp, num_alternatives, cum, tokens)
        logits, state = model.decoder.step(torch.tensor([token], device=feature.device), state)
    if pending is not None:
        yield Step(**{**pending.__dict__, "stop": "max_len"})


def _beam(model, feature, max_len, k, beam_size, length_penalty, no_repeat_ngram, prefix) -> Iterator[Step]:
    """Beam search, beams batched through one decoder step; never fails when no beam ends."""
    vocab = model.vocab
    logits, state = _start(model, feature, 1)
    live = [_Hyp([], None, 0.0)]
    finished: list[_Hyp] = []
    norm = lambda h: h.score / max(1, len(h.tokens)) ** length_penalty  # noqa: E731
    pending: Step | None = None
    for t in range(max_len):
        logp = F.log_softmax(_mask(logits, vocab, [h.tokens for h in live], no_repeat_ngram), dim=-1)  # (n, V)
        total = logp + torch.tensor([h.score for h in live], device=logp.device).unsqueeze(1)  # (n, V)
        if t < len(prefix):  # forced word: every beam takes it
            forced = torch.full_like(total, -math.inf)
            forced[:, prefix[t]] = total[:, prefix[t]]
            total = forced
        width = min(2 * beam_size, total.numel())
        scores, flat = torch.topk(total.reshape(-1), width)  # (width,)
        survivors, parents = [], []
        for score, index in zip(scores.tolist(), flat.tolist()):
            if score == -math.inf:
                break
            parent, token = divmod(index, logp.size(1))
            h = live[parent]
            if token == vocab.eos_id:
                finished.append(_Hyp(h.tokens, h.last, h.score))
            else:
                survivors.append(_Hyp(h.tokens + [token], (t, token, logp[parent]), score))
                parents.append(parent)
            if len(survivors) == beam_size:
                break
        done = len(finished) >= beam_size or not survivors
        if done:
            break
        if pending is not None:
            yield pending
        pending = survivors[0].step(vocab, k)  # the best live hypothesis so far
        live = survivors
        state = model.decoder.select_state(state, torch.tensor(parents, device=feature.device))
        logits, state = model.decoder.step(torch.tensor([h.tokens[-1] for h in live], device=feature.device), state)
    ended = [h for h in finished if h.tokens]
    pool = ended or live  # no beam ended: take the best live one rather than fail
    best = max(pool, key=norm)
    if best.last is not None:
        yield Step(**{**best.step(vocab, k).__dict__, "stop": "eos" if ended else "max_len"})


def caption(model, image, **kwargs) -> str:
    """The caption of one image: the text of the last record of `stream`."""
    last = None
    for last in stream(model, image, **kwargs):
        pass
    return last.text if last is not None else ""


def rescore(model, image, tokens: Sequence[int], *, num_alternatives: int = 5) -> list[Step]:
    """The Step records of a given caption (probabilities and alternatives at every word)."""
    return list(stream(model, image, prefix=[*tokens, model.vocab.eos_id], max_len=len(tokens) + 1, num_alternatives=num_alternatives))


@torch.inference_mode()
def caption_batch(model, images: Sequence, *, strategy: str = "greedy", max_len: int | None = None, batch_size: int = 32, **kwargs) -> list[str]:
    """Captions of many images: encoder batched; greedy decoding batched across images, other strategies per image."""
    from .preprocess import preprocess_batch

    max_len = _check(model, strategy, max_len, kwargs.get("beam_size", 3), kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0), kwargs.get("top_k", 0), 0)
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor) and chunk.dim() == 2:
            features = chunk.to(_device(model))  # already features (b, E)
        else:
            features = model.encode(preprocess_batch(list(chunk), model.config).to(_device(model)))  # (b, E)
        if strategy == "greedy" and not kwargs.get("no_repeat_ngram") and not kwargs.get("prefix"):
            out.extend(_greedy_batch(model, features, max_len))
        else:
            out.extend(caption(model, f, strategy=strategy, max_len=max_len, num_alternatives=0, **kwargs) for f in features)
    return out


def generate_batch(model, features: torch.Tensor, max_len: int, *, sample: bool = False, top_k: int = 0,
                   generator=None) -> torch.Tensor:
    """Batched greedy (or sampled) decoding from image features (n, E) -> token ids (n, T), <EOS>-padded.

    The fast path for many images (caption_batch) and for self-critical training's rollouts; top_k > 0 samples
    from the k likeliest words only.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = the whole vocabulary), got {top_k}")
    vocab = model.vocab
    n = features.size(0)
    logits, state = _start(model, features, n)
    tokens = torch.zeros(n, 0, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(max_len):
        logits[:, [vocab.pad_id, vocab.sos_id, vocab.unk_id]] = -math.inf
        if t == 0:
            logits[:, vocab.eos_id] = -math.inf
        if sample:
            logits = _keep_top_k(logits, top_k)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1).cpu()  # (n,)
        else:
            nxt = logits.argmax(-1).cpu()  # (n,)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, vocab.eos_id))
        tokens = torch.cat((tokens, nxt.unsqueeze(1)), dim=1)  # (n, t+1)
        alive &= nxt != vocab.eos_id
        if not alive.any():
            break
        logits, state = model.decoder.step(nxt.to(features.device), state)
    return tokens


def _greedy_batch(model, features: torch.Tensor, max_len: int) -> list[str]:
    return [model.vocab.decode(row.tolist()) for row in generate_batch(model, features, max_len)]
