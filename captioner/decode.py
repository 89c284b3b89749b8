"""Decoding as a generator of small frozen Step records.

`encode` runs the CNN once per image; `stream` decodes from its ImageFeatures through the decoder's own seam
(`start`, `step`) with the settings of one GenerationConfig. Greedy, sampling, beam search, guided decoding,
branching, the CLI, the app and self-critical training's rollouts (`generate_batch`) all go through that seam;
`caption()` just drains `stream()`. Every loop applies the same processors (captioner/processors.py: the rules, then
sampling's temperature, top-k and top-p) and picks the argmax or a draw (`_pick`); the Step records are in
captioner/steps.py, beam search and guided decoding in captioner/beam.py.

Guided decoding is constrained beam search (Anderson et al., "Guided Open Vocabulary Image Captioning with
Constrained Beam Search", EMNLP 2017) with one disjunctive constraint: the caption must use one of the words that
the CNN's confident ImageNet labels map to (captioner.imagenet.constraint_for). Hypotheses are kept in two beams,
without and with a required word; the caption returned is the best that has one, else the unconstrained best.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .beam import beam
from .confidence import expected_words
from .formatting import describe_stop as describe_stop
from .generation import GenerationConfig
from .imagenet import Constraint, constraint_for
from .model import ImageFeatures, device_of, encode
from .preprocess import preprocess_batch
from .processors import processors_for
from .steps import Candidate as Candidate
from .steps import Node, SearchStep, Step, attention_of, history, step_record, stop_fields, unk_probs


def _features(model, image, features: ImageFeatures | None) -> ImageFeatures:
    if (image is None) == (features is None):
        raise ValueError("give either an image or features= (from decode.encode), not both or neither")
    return encode(model, image) if features is None else features.to(device_of(model))


def _check_model(model) -> None:
    if model.vocab is None:
        raise ValueError("this model has no vocabulary; load it with Captioner.from_pretrained or pass vocab=")



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
        yield from beam(model, features, config, max_len, prefix)
        return
    if config.strategy == "guided":
        if constraint is None:
            constraint = constraint_for(features, vocab, config.guide_threshold, expected=expected_words(model, features))
        yield from beam(model, features, config, max_len, prefix, constraint)
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
    ended = stop_fields("max_len", None, False)
    for t in range(max_len):
        (unk,), (unk_top,) = unk_probs(logits, vocab)
        hist = history([tokens])
        logp = F.log_softmax(rules(logits, hist), dim=-1)  # (1, V): the records' probabilities
        token = prefix[t] if t < len(prefix) else int(_pick(warpers(logp, hist), generator is not None, generator))
        logp = logp[0]
        if path is not None:
            at = cum + float(logp[token])
            path.append(Node(t, t - 1 if t else None, t, token, vocab.itos[token], at, at, None, "chosen"))
            yield SearchStep(t, (path[-1],))
        if token == vocab.eos_id:
            ended = stop_fields("eos", unk, unk_top)
            break
        if done:
            yield done[-1]  # held back one step so the last record can say why decoding stopped
        cum += float(logp[token])
        tokens.append(token)
        done.append(step_record(vocab, t, token, logp, config.num_alternatives, cum, tokens, attention_of(state), unk))
        logits, state = model.decoder.step(torch.tensor([token], device=features.vector.device), state)
    if done:
        yield replace(done[-1], **ended, history=tuple(done[:-1]), tree=None if path is None else tuple(path))


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
    chunks = encoded(model, images, batch_size) if features is None else (
        features.select(slice(start, start + batch_size)).to(device_of(model)) for start in range(0, len(features), batch_size))
    out: list = []
    for chunk in chunks:
        if config.strategy == "greedy" and not steps:
            tokens = generate_batch(model, chunk, config)  # (b, T): int8 is batch-invariant; float32 to its last bits
            out.extend(model.vocab.decode(row.tolist()) for row in tokens)
        else:
            one = config if steps else replace(config, num_alternatives=0)
            lasts = [final(model, config=one, features=chunk.select(slice(i, i + 1))) for i in range(len(chunk))]
            out.extend(lasts if steps else [last.text if last is not None else "" for last in lasts])
    return out


def encoded(model, images: Sequence, batch_size: int = 32) -> Iterator[ImageFeatures]:
    """The images' features, `batch_size` images at a time: each batch preprocessed and encoded together (the CLI
    keeps them for the CNN's labels and the confidence, caption_batch decodes them)."""
    for start in range(0, len(images), batch_size):
        x = preprocess_batch(list(images[start : start + batch_size]), model.config)  # (b, 3, S, S)
        yield model.encode(x.to(device_of(model)))


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
