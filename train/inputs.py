"""The data side of training: which captions and images make each batch, and what the model sees of an image.

Four input modes behind one interface (`TrainInputs`):
- cached features: the frozen CNN ran once per image (train/features.py); a row is its backbone features;
- augmented views (--augment-views K): K more cached views of every training image; each row draws one per step;
- mirrored photos (--flip P): one more cached view, the photo mirrored; a share P of the rows shows it, with "left"
  and "right" swapped in its captions and references;
- cached maps (--tune-top-stages N): the cache holds the maps below the CNN's last N stages, which run (and
  learn) every step;
- raw images (--finetune-backbone): nothing cached; every step preprocesses the images and runs the whole CNN.
A `Batch` holds the rows (`x`) in whatever form the mode keeps them; `TrainInputs.pool`, a module that trains with
the model, turns them into backbone features, which is all `model.forward_features` and `model.encoder.from_backbone`
need. The training loop asks for an epoch's batches and for each `Batch`, and never asks which mode it is in.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn


@dataclass
class Batch:
    x: torch.Tensor  # one row per caption (teacher forcing) or per image (self-critical), on the device
    images: list[int]  # the training image of each row
    captions: torch.Tensor | None  # (T, B) teacher forcing: each row's caption; self-critical: one reference per image
    #                                (only with --scst-xe-weight), else None
    flipped: list[bool] | None = None  # rows that show the photo mirrored (--flip): their words swap left and right

    def __len__(self) -> int:
        return len(self.images)


def load_splits(cfg):
    """The training and validation samples (cut to --limit-train / --limit-val)."""
    from train.data import load_dataset

    samples, report = load_dataset(cfg.data, fmt=cfg.format, image_root=cfg.images, splits=(cfg.train_split, cfg.val_split))
    train = [s for s in samples if s.split == cfg.train_split]
    val = [s for s in samples if s.split == cfg.val_split]
    if cfg.limit_train:
        train = train[: cfg.limit_train]
    if cfg.limit_val:
        val = val[: cfg.limit_val]
    if not train or not val:
        raise ValueError(f"{cfg.data}: found {len(train)} {cfg.train_split!r} and {len(val)} {cfg.val_split!r} images; both are needed")
    print(f"data: {len(train)} train images, {len(val)} val images; skipped: {report}", file=sys.stderr)
    return train, val


def encode_captions(vocab, samples, max_tokens: int) -> tuple[list[int], list[list[int]]]:
    """(image of each caption, token ids of each caption), every caption of every sample, cut to max_tokens."""
    image_index, captions = [], []
    for i, s in enumerate(samples):
        for c in s.captions:
            ids = vocab.encode(c)
            if len(ids) > max_tokens:
                ids = ids[: max_tokens - 1] + [vocab.eos_id]
            image_index.append(i)
            captions.append(ids)
    return image_index, captions


def view_choice(views: int, rows: int, seed: int, step: int) -> torch.Tensor:
    """Which of `views` views (0 = the plain image) each of `rows` rows shows at this step: (rows,) LongTensor.
    Seeded by the step, so --resume draws the same views again."""
    pick = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, views, (rows,), generator=pick)


def flip_choice(share: float, rows: int, seed: int, step: int) -> list[bool]:
    """Which of `rows` rows show the mirrored photo at this step (a share `share` on average); seeded by the step
    apart from the view draws, so --resume flips the same rows again."""
    if not share:
        return [False] * rows
    pick = torch.Generator().manual_seed(seed * 2_000_003 + step + 1)
    return (torch.rand(rows, generator=pick) < share).tolist()


SIDES = {"left": "right", "right": "left"}  # what a mirror swaps in a caption


def swap_sides(words: list[str]) -> list[str]:
    """A caption's words as they describe the mirrored photo: "left" and "right" swapped."""
    return [SIDES.get(w, w) for w in words]


def swap_side_ids(ids: list[int], vocab) -> list[int]:
    """Token ids with the ids of "left" and "right" swapped (those absent from the vocabulary stay as they are)."""
    pairs = {vocab.stoi[a]: vocab.stoi[b] for a, b in SIDES.items() if a in vocab.stoi and b in vocab.stoi}
    return [pairs.get(i, i) for i in ids]


def draw_views(views: torch.Tensor, rows: list[int], seed: int, step: int) -> torch.Tensor:
    """Cached rows, each from one view drawn at random: views (1 + K, N, ...) -> (len(rows), ...)."""
    return views[view_choice(views.size(0), len(rows), seed, step), rows]


def pooled_features(model, x: torch.Tensor, top_stages: int, device) -> torch.Tensor:
    """(N, F) pooled features (or (N, R, F) regions) of cached features or maps, through `model`'s own top stages,
    without gradients."""
    if not top_stages:
        return x
    from train.features import split_backbone

    top = split_backbone(model.encoder.backbone, top_stages, spatial=model.encoder.spatial)[1]
    model.eval()
    with torch.inference_mode():
        return torch.cat([top(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)])  # (N, F) / (N, R, F)


class BackboneFeatures(nn.Module):
    """Images (B, 3, S, S) -> backbone features, through the encoder's (trainable) CNN."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.backbone_features(images)


class _Cached:
    """Features (or, with top_stages, maps) cached on disk once per image and view; rows pass through `pool`."""

    def __init__(self, cfg, model, train_images: list[str], val_images: list[str], device, progress: bool):
        from train.features import MIRROR, extract_features

        self.top_stages, self.device, self.spatial = cfg.tune_top_stages, device, model.encoder.spatial
        from captioner.precision import for_training

        precision = for_training(cfg.precision, "cpu")  # extraction runs on the CPU
        feats = extract_features(model.cpu(), train_images + val_images, cfg.feature_cache, progress=progress,
                                 top_stages=self.top_stages, precision=precision)
        model.to(device)
        self.train, self.val = feats[: len(train_images)], feats[len(train_images) :]
        self.views = None
        if cfg.augment_views:
            views = [extract_features(model.cpu(), train_images, cfg.feature_cache, view=k, progress=progress,
                                      top_stages=self.top_stages, precision=precision)
                     for k in range(1, cfg.augment_views + 1)]
            model.to(device)
            self.views = torch.stack([self.train, *views])  # (1 + views, N, F) or (1 + views, N, C, H, W)
        self.mirrored = None
        if cfg.flip:
            self.mirrored = extract_features(model.cpu(), train_images, cfg.feature_cache, view=MIRROR, progress=progress,
                                             top_stages=self.top_stages, precision=precision)
            model.to(device)

    def pool(self, model) -> nn.Module:
        if not self.top_stages:
            return nn.Identity()
        from train.features import split_backbone

        top = split_backbone(model.encoder.backbone, self.top_stages, spatial=self.spatial)[1]
        return top.requires_grad_(True)  # its batch norms keep their ImageNet statistics: the backbone stays in eval mode

    def rows(self, rows: list[int], seed: int, step: int, flipped: list[bool]) -> torch.Tensor:
        x = self.train[rows] if self.views is None else draw_views(self.views, rows, seed, step)
        if any(flipped):
            mask = torch.tensor(flipped)
            x[mask] = self.mirrored[[r for r, f in zip(rows, flipped) if f]]  # x is a copy: indexing copies
        return x.to(self.device)

    def val_features(self, model) -> torch.Tensor:
        return pooled_features(model, self.val, self.top_stages, self.device)


class _Images:
    """Nothing cached: each step preprocesses its images (or their augmented views) for the trainable CNN."""

    def __init__(self, cfg, model, train_images: list[str], val_images: list[str], device, progress: bool):
        self.train, self.val, self.views, self.device, self.config = train_images, val_images, cfg.augment_views, device, model.config

    def pool(self, model) -> nn.Module:
        return BackboneFeatures(model.encoder)

    def _images(self, sources: list) -> torch.Tensor:
        from captioner.preprocess import preprocess_batch

        return preprocess_batch(sources, self.config).to(self.device)  # (B, 3, S, S)

    def rows(self, rows: list[int], seed: int, step: int, flipped: list[bool]) -> torch.Tensor:
        from train.features import MIRROR, augmented_view

        drawn = view_choice(1 + self.views, len(rows), seed, step).tolist() if self.views else [0] * len(rows)
        drawn = [MIRROR if f else k for k, f in zip(drawn, flipped)]  # --flip and --augment-views exclude each other
        return self._images([augmented_view(self.train[r], k) if k else self.train[r] for r, k in zip(rows, drawn)])

    def val_features(self, model) -> torch.Tensor:
        """The validation images through `model`'s CNN as it is now."""
        model.eval()
        with torch.inference_mode():
            return torch.cat([model.encoder.backbone_features(self._images(self.val[i : i + 32])).cpu()
                              for i in range(0, len(self.val), 32)])


class TrainInputs:
    """The batches of a run and the features of its validation images, in the run's input mode."""

    def __init__(self, cfg, model, train_set, val_set, vocab, *, device, world: int = 1, rank: int = 0, progress: bool = True):
        self.cfg, self.vocab, self.world, self.rank = cfg, vocab, world, rank
        model.encoder.set_trainable(cfg.finetune_backbone)
        mode = _Images if cfg.finetune_backbone else _Cached
        self.source = mode(cfg, model, [s.image for s in train_set], [s.image for s in val_set], device, progress)
        self.pool = self.source.pool(model)  # batch.x -> backbone features; what of the CNN trains is in here
        self.image_index, self.captions = encode_captions(vocab, train_set, cfg.max_tokens)
        self.captions_of: dict[int, list[int]] = {}  # training image -> its caption indices
        for c, i in enumerate(self.image_index):
            self.captions_of.setdefault(i, []).append(c)
        self.references = [s.captions for s in train_set]  # the self-critical reward's references
        self.val_references = [s.captions for s in val_set]
        self.val_image_index, self.val_captions = encode_captions(vocab, val_set, cfg.max_tokens)

    def scaled_parameters(self) -> set[int]:
        """ids of the parameters that learn at --tune-lr-scale times the lr (the tuned top stages)."""
        return {id(p) for p in self.pool.parameters()} if self.cfg.tune_top_stages else set()

    def epoch(self, epoch: int, self_critical: bool) -> list[list[int]]:
        """This process's batches of an epoch: caption indices (teacher forcing) or image indices (self-critical)."""
        from train.data import bucket_batches

        cfg = self.cfg
        if self_critical:
            order = list(range(len(self.references)))
            random.Random(cfg.seed + epoch).shuffle(order)
            batches = [order[i : i + cfg.scst_batch_images] for i in range(0, len(order), cfg.scst_batch_images)]
        else:
            lengths = [len(c) for c in self.captions]
            batches = list(bucket_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch))
        return batches[: len(batches) // self.world * self.world][self.rank :: self.world]

    def batch(self, indices: list[int], step: int, self_critical: bool) -> Batch:
        """The Batch of one of `epoch`'s index lists at global step `step` (which seeds its view draws)."""
        from train.data import collate_captions

        cfg, pad = self.cfg, self.vocab.pad_id
        flipped = flip_choice(cfg.flip, len(indices), cfg.seed, step)
        if not self_critical:
            rows = [self.image_index[i] for i in indices]
            chosen = [self.captions[i] for i in indices]
        else:
            rows, chosen = list(indices), None
            if cfg.scst_xe_weight:  # one reference caption per image, drawn by the step
                pick = random.Random(cfg.seed * 1_000_003 + step)
                chosen = [self.captions[pick.choice(self.captions_of[i])] for i in indices]
        x = self.source.rows(rows, cfg.seed, step, flipped)  # rollouts from augmented views too, as in teacher forcing
        captions = None
        if chosen is not None:
            chosen = [swap_side_ids(c, self.vocab) if f else c for c, f in zip(chosen, flipped)]
            captions = collate_captions(chosen, pad_id=pad).to(self.source.device)  # (T, B)
        return Batch(x, rows, captions, flipped)

    def val_features(self, model) -> torch.Tensor:
        """Backbone features (N, F) of the validation images as `model` sees them (its own top stages or CNN)."""
        return self.source.val_features(model)

    def val_batches(self, size: int = 256) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(validation image of each caption, captions (T, B)) in chunks: every validation caption once."""
        from train.data import collate_captions

        for b in range(0, len(self.val_captions), size):
            yield self.val_image_index[b : b + size], collate_captions(self.val_captions[b : b + size], pad_id=self.vocab.pad_id)
