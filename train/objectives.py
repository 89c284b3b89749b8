"""What a training step minimises: one module that knows teacher forcing and self-critical training.

- Teacher forcing: cross-entropy (with label smoothing) of each caption given the image and the caption's previous
  words, through `model.forward_features`.
- Self-critical sequence training (Rennie et al. 2017): captions sampled through `generate_batch` from the model's
  own policy, rewarded with CIDEr-D against the image's references, minus a baseline (the mean reward of the other
  samples of the same image, or with --scst-baseline greedy the reward of its greedy caption); optionally plus a
  weighted teacher-forcing loss (--scst-xe-weight).

Only the decoder's seam is used (`model.forward_features`, `model.encoder.from_backbone`, `generate_batch`), so a new
decoder trains without an edit here. DistributedDataParallel wraps `CaptionObjective`, so both phases synchronise
their gradients the same way.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.decode import generate_batch
from captioner.generation import GenerationConfig
from captioner.model import caption_loss
from captioner.precision import autocast

END = "<eos>"  # the end of a caption as a word of the reward's n-grams (spaCy never makes this token from text)


class CiderReward:
    """CIDEr-D of sampled captions against their training image's references (punctuation dropped, as in scoring);
    document frequencies over all the training references, counted on first use.

    With `eos`, a caption's end is a word too, on both sides: references end with it, and so does a sample that
    ended (not one cut at the length limit). "a man in front of a <eos>" then misses the n-grams "of a <eos>" and
    "a <eos>" that no reference has, so stopping mid-phrase is paid for, as evaluation's scores pay for it."""

    def __init__(self, references: Sequence[Sequence[str]], vocab, *, eos: bool = True):
        self.references, self.vocab, self.eos = references, vocab, eos
        self.tokens: list | None = None
        self.mirrored: dict[int, list] = {}  # image -> its references with left/right swapped, made on first use
        self.cider = None

    def __call__(self, rows: list[list[int]], images: list[int], samples: int, flipped: list[bool] | None = None) -> torch.Tensor:
        """Rewards (B, samples) of token rows (B * samples, T), each image's samples consecutive. An image that was
        shown mirrored (`flipped`) is scored against its references with "left" and "right" swapped."""
        from train.evaluate import PUNCT
        from train.inputs import swap_sides

        if self.cider is None:
            from train.cider import CiderD
            from train.evaluate import score_tokens

            end = [END] if self.eos else []
            self.tokens = [[score_tokens(c).split() + end for c in refs] for refs in self.references]
            self.cider = CiderD(self.tokens)
        rewards = []
        for r, row in enumerate(rows):
            words = [w for w in self.vocab.words(row) if w not in PUNCT]  # scored like the references
            if self.eos and self.vocab.eos_id in row:
                words.append(END)
            image = images[r // samples]
            if flipped and flipped[r // samples]:
                if image not in self.mirrored:
                    self.mirrored[image] = [swap_sides(t) for t in self.tokens[image]]
                refs = self.mirrored[image]
                rewards.append(self.cider.score(words, ("mirrored", image), refs))  # its own key: other ref vectors
            else:
                rewards.append(self.cider.score(words, image, self.tokens[image]))
        return torch.tensor(rewards).view(-1, samples)


class CaptionObjective(nn.Module):
    """`objective(batch, self_critical) -> (loss, value)`: the loss to minimise and what the progress line averages
    (the teacher-forcing loss, or the mean self-critical reward).

    `pool` turns a batch's rows into backbone features (the input side's module: cached features pass through, cached
    maps go through the tuned top stages, images through the CNN)."""

    def __init__(self, model: nn.Module, pool: nn.Module, vocab, references: Sequence[Sequence[str]], cfg, *, device,
                 precision: str = "fp32"):
        super().__init__()
        self.model, self.pool, self.vocab = model, pool, vocab
        self.autocast = lambda: autocast(precision, device)  # forward passes and rollouts; the losses stay float32
        self.label_smoothing = cfg.label_smoothing
        self.unk_id = None if cfg.learn_unk else vocab.unk_id  # <UNK> never a target (see caption_loss)
        self.samples, self.xe_weight = cfg.scst_samples, cfg.scst_xe_weight
        # the rollouts: drawn from the k likeliest words (0: all) of the rules every caption obeys, up to max_tokens
        # less <SOS> and <EOS>
        self.rollout = GenerationConfig(strategy="sample", max_len=cfg.max_tokens - 2, top_k=cfg.scst_top_k, top_p=1.0,
                                        no_repeat_ngram=0)
        # --scst-baseline greedy: each image's greedy caption, under the same rules and length
        self.greedy = (GenerationConfig(strategy="greedy", max_len=cfg.max_tokens - 2, no_repeat_ngram=0)
                       if cfg.scst_baseline == "greedy" else None)
        self.reward = CiderReward(references, vocab, eos=cfg.scst_reward_eos)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)  # the rollouts' draws

    def forward(self, batch, self_critical: bool = False) -> tuple[torch.Tensor, float]:
        self.model.train(not self_critical)  # self-critical steps sample and learn without dropout
        return self.self_critical(batch) if self_critical else self.teacher_forcing(batch)

    def logits(self, x: torch.Tensor, captions: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """captions (T, B * repeat) -> float32 logits (T, B * repeat, V); each row of x serves `repeat` consecutive
        captions."""
        with self.autocast():
            logits = self.model.forward_features(self.pool(x).repeat_interleave(repeat, dim=0), captions)
        return logits.float()

    def cross_entropy(self, x: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        return caption_loss(self.logits(x, captions), captions, pad_id=self.vocab.pad_id, unk_id=self.unk_id,
                            label_smoothing=self.label_smoothing)

    def teacher_forcing(self, batch) -> tuple[torch.Tensor, float]:
        loss = self.cross_entropy(batch.x, batch.captions)
        return loss, loss.item()

    def self_critical(self, batch) -> tuple[torch.Tensor, float]:
        """Sample captions; reward = CIDEr-D minus the baseline (the mean reward of the other samples of the same image,
        or its greedy caption's reward)."""
        from train.data import collate_captions

        n, vocab, device = self.samples, self.vocab, batch.x.device
        with torch.no_grad(), self.autocast():  # the model is in eval mode: rollouts without dropout
            pooled = self.pool(batch.x)  # (B, F) or (B, R, F)
            seqs = generate_batch(self.model, self.model.encoder.from_backbone(pooled.repeat_interleave(n, dim=0)),
                                  self.rollout, generator=self.generator)  # (B*n, T)
            greedy = (generate_batch(self.model, self.model.encoder.from_backbone(pooled), self.greedy).tolist()
                      if self.greedy is not None else None)  # (B, T)
        rows = seqs.tolist()
        reward = self.reward(rows, batch.images, n, batch.flipped)  # (B, n)
        if greedy is not None:  # Rennie et al.: better than the test-time caption, not than the other samples
            baseline = self.reward(greedy, batch.images, 1, batch.flipped)  # (B, 1)
        else:
            baseline = (reward.sum(1, keepdim=True) - reward) / max(1, n - 1)
        advantage = (reward - baseline).view(-1).to(device)  # (B*n,)
        sampled = []  # the sampled captions, as teacher-forcing input
        for row in rows:
            end = row.index(vocab.eos_id) if vocab.eos_id in row else len(row)
            sampled.append([vocab.sos_id, *row[:end], vocab.eos_id])
        caps = collate_captions(sampled, pad_id=vocab.pad_id).to(device)  # (T, B*n)
        # Gradients through the same dropout-free policy that sampled (dropout here would score other captions), and
        # over the same words: rollouts never draw <PAD>/<SOS>/<UNK>, so they are out of this softmax too. Left in, the
        # normaliser's gradient let <UNK> drift up unchecked until it held ~all the raw mass at every step.
        logits = self.logits(batch.x, caps, repeat=n)  # (T, B*n, V)
        logits[..., list(vocab.unsaid)] = -torch.inf
        mask = caps != vocab.pad_id  # (T, B*n)
        mask[0] = False  # position 0 predicts <SOS> from the image: not part of the sampled caption
        logp = F.log_softmax(logits, -1).gather(2, caps.unsqueeze(2)).squeeze(2).masked_fill(~mask, 0.0)  # (T, B*n)
        loss = -(advantage.unsqueeze(0) * logp).sum() / mask.sum()
        if self.xe_weight and batch.captions is not None:  # a little teacher forcing keeps the language model from drifting
            loss = loss + self.xe_weight * self.cross_entropy(batch.x, batch.captions)
        return loss, float(reward.mean())


def validation_loss(model, features: torch.Tensor, batches, *, pad_id: int, device, unk_id: int | None = None) -> float:
    """Per-token teacher-forcing loss (no label smoothing) of (image rows, captions) batches over backbone features;
    with `unk_id`, <UNK> targets are left out as in training."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for rows, captions in batches:
            c = captions.to(device)  # (T, B)
            logits = model.forward_features(features[rows].to(device), c)  # (T, B, V)
            targets = c != pad_id  # (T, B): what caption_loss averages over
            if unk_id is not None:
                targets &= c != unk_id
            n = int(targets.sum())
            total += float(caption_loss(logits, c, pad_id=pad_id, unk_id=unk_id)) * n
            count += n
    return total / max(1, count)
