"""Train a captioner: teacher forcing on cached features, then optional self-critical fine-tuning (CIDEr-D reward).

    python -m train.train --data ../shared/data/flickr8k --out runs/flickr8k
    python -m train.train --out runs/flickr8k --resume          # after an interruption
    torchrun --nproc_per_node=2 -m train.train ...               # DistributedDataParallel

Every epoch: dev loss, BLEU/CIDEr-D/ROUGE-L of greedy captions, a metrics.jsonl line, a PNG plot,
sample captions; the best epoch by CIDEr-D is exported as a Hub-format folder (runs/NAME/best).
Checkpoints are written atomically; Ctrl-C saves before exiting; --resume continues mid-epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.config import CaptionerConfig
from captioner.decode import caption_batch, generate_batch
from captioner.model import Captioner, caption_loss
from captioner.vocab import Vocabulary
from train.evaluate import PUNCT


@dataclass
class TrainConfig:
    data: str = "../shared/data/flickr8k"  # dataset folder (or JSON for karpathy/coco)
    format: str | None = None  # flickr8k | flickr8k-token | karpathy | coco; None detects
    images: str | None = None  # image folder for the JSON formats
    train_split: str = "train"
    val_split: str = "dev"
    out: str = "runs/default"  # run folder: checkpoint/, best/, metrics.jsonl, plot.png
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # ImageNet init of the backbone (offline for tf_efficientnet_lite0 only)
    image_size: int = 224  # encoder input side
    resize: str = "squash"  # squash (Flickr8k copy here is pre-squashed to 224x224) or crop
    embed_size: int = 512
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    embed_init: float = 0.0  # std of a normal init of the word embeddings; 0 keeps PyTorch's N(0, 1), whose vectors dwarf the image's
    min_freq: int = 5  # vocabulary: words seen at least this often in the training captions
    max_tokens: int = 22  # longest training caption in tokens, <SOS>/<EOS> included (longer ones are cut)
    epochs: int = 15  # teacher-forcing epochs
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    scst_epochs: int = 0  # self-critical epochs after teacher forcing (CIDEr-D reward)
    scst_lr: float = 5e-5
    scst_schedule: str = "constant"  # constant, or cosine: scst_lr decays to 5% of itself over the self-critical epochs
    scst_samples: int = 5  # sampled captions per image; baseline = mean reward of the others
    scst_batch_images: int = 64
    scst_top_k: int = 5  # rollouts sample from the k likeliest words (label smoothing leaves ~10% on random words)
    scst_xe_weight: float = 0.0  # adds this times the teacher-forcing loss of one reference per image to each self-critical step
    init: str | None = None  # start from this saved model (folder or Hub id), e.g. self-critical after teacher forcing
    finetune_backbone: bool = False  # train the CNN too (needs a GPU to be practical; no feature cache)
    tune_top_stages: int = 0  # train the CNN's last N stages and head conv too, on cached maps of the frozen stages below
    tune_lr_scale: float = 0.1  # those stages learn at this times lr (and scst_lr): pretrained weights need small steps
    feature_cache: str = ".cache/features"
    augment_views: int = 0  # extra cached views of each training image (random crop + mirror); each caption draws one
    limit_train: int = 0  # use only the first N training images (tests, smoke runs)
    limit_val: int = 0
    eval_beam: int = 3  # beam size scored after the last epoch
    sample_images: int = 4  # fixed dev images whose captions are logged every epoch
    seed: int = 0
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------- checkpoints (atomic, safetensors + JSON)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def atomic_dir(target: Path, write) -> None:
    """Write a folder completely under a temporary name, then swap it in; a crash leaves the old one."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(folder: Path, model: Captioner, opt, state: dict) -> None:
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        model.save_pretrained(d)
        tensors, meta = _flatten_optimizer(opt)
        save_file(tensors, str(d / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(d / "rng.safetensors"))
        (d / "trainer.json").write_text(json.dumps({**state, "optimizer": meta}, indent=1))

    atomic_dir(folder, write)


def trainer_state(out: Path) -> dict:
    """A run folder's last checkpoint record (epoch done, history, train_config, ...), or {} before its first checkpoint."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / "trainer.json").exists():
            return json.loads((folder / "trainer.json").read_text())
    return {}


def load_checkpoint(folder: Path):
    from safetensors.torch import load_file

    from captioner.loading import load

    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # interrupted during the swap
    model = load(folder)
    meta = json.loads((folder / "trainer.json").read_text())
    opt_state = _unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), meta.pop("optimizer"))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return model, opt_state, meta


# ---------------------------------------------------------------- data


def prepare(cfg: TrainConfig):
    """Samples, vocabulary (training split only), encoded captions and cached features."""
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


def encode_captions(vocab: Vocabulary, train, max_tokens: int) -> tuple[list[int], list[list[int]]]:
    image_index, captions = [], []
    for i, s in enumerate(train):
        for c in s.captions:
            ids = vocab.encode(c)
            if len(ids) > max_tokens:
                ids = ids[: max_tokens - 1] + [vocab.eos_id]
            image_index.append(i)
            captions.append(ids)
    return image_index, captions


# ---------------------------------------------------------------- training


class FromFeatures(nn.Module):
    """What DDP wraps: teacher-forced logits from cached features (or from images when fine-tuning, or from cached
    maps through the trainable top stages of the backbone)."""

    def __init__(self, model: Captioner, finetune: bool, top: nn.Module | None = None):
        super().__init__()
        self.model, self.finetune, self.top = model, finetune, top

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Cached features (B, F) as they are, or cached maps (B, C, H, W) -> (B, F) through the top stages."""
        return x if self.top is None else self.top(x)

    def forward(self, x, captions, repeat: int = 1):
        """captions (T, B * repeat): each image's features serve `repeat` consecutive captions."""
        if self.finetune:
            return self.model(x, captions)
        return self.model.forward_features(self.pooled(x).repeat_interleave(repeat, dim=0), captions)  # (T, B*repeat, V)


def pooled_features(model: Captioner, x: torch.Tensor, top_stages: int, device) -> torch.Tensor:
    """(N, F) pooled features of cached features or maps, through `model`'s own top stages, without gradients."""
    if not top_stages:
        return x
    from train.features import split_backbone

    top = split_backbone(model.encoder.backbone, top_stages)[1]
    model.eval()
    with torch.inference_mode():
        return torch.cat([top(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)])  # (N, F)


def draw_views(views: torch.Tensor, rows: list[int], seed: int, step: int) -> torch.Tensor:
    """Features of `rows`, each from one view drawn at random: views (1 + K, N, F) -> (len(rows), F).
    Seeded by the step, so --resume draws the same views again."""
    pick = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return views[torch.randint(0, views.size(0), (len(rows),), generator=pick), rows]


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def val_loss(model, feats, val, vocab, cfg, device) -> float:
    _, caps = encode_captions(vocab, val, cfg.max_tokens)
    idx = [i for i, s in enumerate(val) for _ in s.captions]
    from train.data import collate_captions

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(caps), 256):
            c = collate_captions(caps[b : b + 256], pad_id=vocab.pad_id).to(device)  # (T, B)
            x = feats[idx[b : b + 256]].to(device)
            logits = model.forward_features(x, c)  # (T, B, V)
            n = int((c != vocab.pad_id).sum())
            total += float(caption_loss(logits, c, pad_id=vocab.pad_id)) * n
            count += n
    return total / max(1, count)


def decode_val(model, feats, device, **kw) -> list[str]:
    model.eval()
    with torch.inference_mode():
        features = model.encoder.from_backbone(feats.to(device))
    return caption_batch(model, features=features, batch_size=128, **kw)


def scst_batch(model, wrapped, feats, refs_tok, keys, cider, cfg, vocab, device, gen) -> tuple[torch.Tensor, float]:
    """Sample captions, reward = CIDEr-D minus the mean reward of the other samples of the same image."""
    from train.data import collate_captions

    n = cfg.scst_samples
    model.eval()  # sample without dropout
    with torch.no_grad():
        x = wrapped.module.pooled(feats) if hasattr(wrapped, "module") else wrapped.pooled(feats)  # (B, F)
        x = x.repeat_interleave(n, dim=0)  # (B*n, F)
        seqs = generate_batch(model, model.encoder.from_backbone(x), cfg.max_tokens - 2, sample=True, top_k=cfg.scst_top_k,
                              generator=gen)  # (B*n, T)
    rows = []
    rewards = []
    for r, row in enumerate(seqs.tolist()):
        words = [w for w in vocab.words(row) if w not in PUNCT]  # scored like the references
        img = r // n
        rewards.append(cider.score(words, keys[img], refs_tok[img]))
        end = row.index(vocab.eos_id) if vocab.eos_id in row else len(row)
        ids = [vocab.sos_id, *row[:end], vocab.eos_id]  # the sampled caption, as teacher-forcing input
        rows.append(ids)
    rew = torch.tensor(rewards).view(-1, n)  # (B, n)
    baseline = (rew.sum(1, keepdim=True) - rew) / max(1, n - 1)
    adv = (rew - baseline).view(-1).to(device)  # (B*n,)
    caps = collate_captions(rows, pad_id=vocab.pad_id).to(device)  # (T, B*n)
    # Gradients through the same dropout-free policy that sampled (dropout here would score other captions).
    logits = wrapped(feats, caps, repeat=n)  # (T, B*n, V)
    logp = F.log_softmax(logits, -1).gather(2, caps.unsqueeze(2)).squeeze(2)  # (T, B*n)
    mask = (caps != vocab.pad_id).float()
    mask[0] = 0.0  # position 0 predicts <SOS> from the image: not part of the sampled caption
    loss = -(adv.unsqueeze(0) * logp * mask).sum() / mask.sum()
    return loss, float(rew.mean())


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(ep, [h.get("train_loss", float("nan")) for h in history], label="train loss", color="tab:blue")
    ax1.plot(ep, [h["val_loss"] for h in history], label="dev loss", color="tab:cyan")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax2 = ax1.twinx()
    ax2.plot(ep, [h["CIDEr-D"] for h in history], label="dev CIDEr-D", color="tab:red", marker="o")
    ax2.set_ylabel("CIDEr-D")
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    from train.backbones import init_backbone
    from train.cider import CiderD
    from train.data import bucket_batches, collate_captions
    from train.evaluate import score, score_tokens
    from train.features import extract_features

    if cfg.scst_schedule not in ("constant", "cosine"):
        raise ValueError(f"--scst-schedule {cfg.scst_schedule!r}: choose constant or cosine")
    if cfg.scst_epochs and cfg.finetune_backbone:
        raise ValueError("--scst-epochs with --finetune-backbone: self-critical training runs on cached features; "
                         "fine-tune with teacher forcing, then run --scst-epochs with --init on its best model")
    if cfg.tune_top_stages and cfg.finetune_backbone:
        raise ValueError("--tune-top-stages with --finetune-backbone: the first trains the last stages on cached maps, "
                         "the second the whole CNN on images; choose one")
    if cfg.tune_top_stages < 0:
        raise ValueError(f"--tune-top-stages {cfg.tune_top_stages}: must be >= 0")
    if cfg.scst_xe_weight < 0:
        raise ValueError(f"--scst-xe-weight {cfg.scst_xe_weight}: must be >= 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    is_main = rank == 0

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, val_set = prepare(cfg)
    opt_state = None
    init_epochs = None
    if resume and (ckpt.exists() or ckpt.with_name("checkpoint.old").exists()):
        model, opt_state, meta = load_checkpoint(ckpt)
        vocab = model.vocab
        init_epochs = model.config.extra.get("init_trained_epochs")
        saved = TrainConfig(**{k: v for k, v in meta["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
        for name in ("embed_size", "hidden_size", "num_layers", "min_freq", "backbone", "tune_top_stages"):
            if getattr(saved, name) != getattr(cfg, name):
                raise ValueError(f"--resume: {name}={getattr(cfg, name)!r} differs from the checkpoint's {getattr(saved, name)!r}")
        if is_main:
            print(f"resuming from epoch {meta['epoch']} step {meta['step_in_epoch']}", file=sys.stderr)
    else:
        if resume and is_main:
            print(f"--resume: no checkpoint in {ckpt}, starting fresh", file=sys.stderr)
        meta = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None}
        if cfg.init:
            from captioner.loading import load

            model = load(cfg.init)  # its vocabulary, sizes and backbone weights carry on
            vocab, c = model.vocab, model.config
            init_epochs = c.extra.get("trained_epochs")
            cfg = replace(cfg, backbone=c.backbone, embed_size=c.embed_size, hidden_size=c.hidden_size,
                          num_layers=c.num_layers, image_size=c.image_size, resize=c.resize)
            if is_main:
                print(f"starting from {cfg.init}", file=sys.stderr)
        else:
            vocab = Vocabulary.build((c for s in train_set for c in s.captions), min_freq=cfg.min_freq)
            config = CaptionerConfig(
                backbone=cfg.backbone, embed_size=cfg.embed_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                dropout=cfg.dropout, vocab_size=len(vocab), train_backbone=cfg.finetune_backbone,
                image_size=cfg.image_size, resize=cfg.resize,
            )
            model = Captioner(config, vocab)
            if cfg.pretrained:
                init_backbone(model.encoder, cfg.backbone)
            if cfg.embed_init:
                torch.nn.init.normal_(model.decoder.embed.weight, std=cfg.embed_init)
    model.encoder.set_trainable(cfg.finetune_backbone)
    top = None
    if cfg.tune_top_stages:
        from train.features import split_backbone

        top = split_backbone(model.encoder.backbone, cfg.tune_top_stages)[1]
        top.requires_grad_(True)  # its batch norms keep their ImageNet statistics: the backbone stays in eval mode
    model.to(device)
    print(f"vocabulary: {len(vocab)} words; device: {device}; world size {world}", file=sys.stderr) if is_main else None

    # Features: the frozen backbone runs once per image (cached on disk, keyed by backbone+weights+preprocessing).
    all_images = [s.image for s in train_set] + [s.image for s in val_set]
    if cfg.finetune_backbone:
        train_x = [s.image for s in train_set]
    else:
        feats = extract_features(model.cpu(), all_images, cfg.feature_cache, progress=cfg.progress and is_main,
                                 top_stages=cfg.tune_top_stages)
        model.to(device)
        train_x, val_feats = feats[: len(train_set)], feats[len(train_set) :]
        if cfg.augment_views:
            views = [extract_features(model.cpu(), [s.image for s in train_set], cfg.feature_cache, view=k,
                                      progress=cfg.progress and is_main, top_stages=cfg.tune_top_stages)
                     for k in range(1, cfg.augment_views + 1)]
            model.to(device)
            train_views = torch.stack([train_x, *views])  # (1 + views, N, F) or (1 + views, N, C, H, W)
    if cfg.finetune_backbone:
        val_feats = extract_features(model.cpu(), [s.image for s in val_set], cfg.feature_cache, progress=False)
        model.to(device)

    image_index, captions = encode_captions(vocab, train_set, cfg.max_tokens)
    captions_of: dict[int, list[int]] = {}  # training image -> its caption indices
    for c, i in enumerate(image_index):
        captions_of.setdefault(i, []).append(c)
    lengths = [len(c) for c in captions]
    val_refs = [s.captions for s in val_set]
    wrapped = FromFeatures(model, cfg.finetune_backbone, top)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]

    def make_optimizer(lr: float) -> torch.optim.AdamW:
        tuned = {id(p) for p in top.parameters()} if top is not None else set()
        groups = [{"params": [p for p in params if id(p) not in tuned], "lr_scale": 1.0}]
        if tuned:
            groups.append({"params": [p for p in params if id(p) in tuned], "lr_scale": cfg.tune_lr_scale})
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)

    opt = make_optimizer(cfg.lr)
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    stop = {"now": False}

    def on_sigint(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
        print("\ninterrupt: saving a checkpoint after this batch (Ctrl-C again to abort)", file=sys.stderr)

    old_handler = signal.signal(signal.SIGINT, on_sigint) if threading_main() else None
    cider = None
    train_refs_tok = None
    total_epochs = cfg.epochs + cfg.scst_epochs
    steps_per_epoch = len(list(bucket_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed))) // world
    total_steps = cfg.epochs * steps_per_epoch
    scst_steps = cfg.scst_epochs * (math.ceil(len(train_set) / cfg.scst_batch_images) // world)
    sample_ids = list(range(min(cfg.sample_images, len(val_set))))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    try:
        from tqdm.auto import tqdm

        for epoch in range(meta["epoch"], total_epochs):
            scst = epoch >= cfg.epochs
            # an epoch resumed mid-way keeps the time and running totals of its first part
            partial = meta.pop("partial", None) or {"seconds": 0.0, "running": 0.0, "seen": 0}
            t0 = time.time() - partial["seconds"]
            if scst:
                if not meta.get("scst_optimizer"):
                    # Fresh Adam moments: the teacher-forcing ones are scaled to far larger gradients and would
                    # shrink every self-critical step to almost nothing.
                    opt = make_optimizer(cfg.scst_lr)
                    meta["scst_optimizer"] = True
                if cider is None:
                    train_refs_tok = [[score_tokens(c).split() for c in s.captions] for s in train_set]
                    cider = CiderD(train_refs_tok)
                order = list(range(len(train_set)))
                random.Random(cfg.seed + epoch).shuffle(order)
                batches = [order[i : i + cfg.scst_batch_images] for i in range(0, len(order), cfg.scst_batch_images)]
            else:
                batches = list(bucket_batches(lengths, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch))
            batches = batches[: len(batches) // world * world][rank::world]
            bar = tqdm(total=len(batches), initial=meta["step_in_epoch"], desc=f"epoch {epoch + 1}/{total_epochs}{' scst' if scst else ''}",
                       disable=not (cfg.progress and is_main), unit="batch")
            running, seen, lr = partial["running"], partial["seen"], None
            for bi in range(meta["step_in_epoch"], len(batches)):
                b = batches[bi]
                model.train(not scst)  # self-critical steps sample and learn without dropout
                if scst:
                    done = meta["global_step"] - cfg.epochs * steps_per_epoch  # self-critical steps so far
                    lr = cfg.scst_lr if cfg.scst_schedule == "constant" else lr_at(done, scst_steps, cfg.scst_lr, 0)
                    for g in opt.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    x = train_x[b]  # (B, F)
                    if cfg.augment_views:  # rollouts from augmented views too, as in teacher forcing
                        x = draw_views(train_views, b, cfg.seed, meta["global_step"])  # (B, F)
                    loss, reward = scst_batch(model, wrapped, x.to(device), [train_refs_tok[i] for i in b], b, cider, cfg, vocab, device, gen)
                    if cfg.scst_xe_weight:  # a little teacher forcing keeps the language model from drifting
                        pick = random.Random(cfg.seed * 1_000_003 + meta["global_step"])
                        gt = collate_captions([captions[pick.choice(captions_of[i])] for i in b], pad_id=vocab.pad_id).to(device)  # (T, B)
                        xe = caption_loss(wrapped(x.to(device), gt), gt, pad_id=vocab.pad_id, label_smoothing=cfg.label_smoothing)
                        loss = loss + cfg.scst_xe_weight * xe
                    running += reward * len(b)
                    seen += len(b)
                else:
                    lr = lr_at(meta["global_step"], total_steps, cfg.lr, cfg.warmup_steps)
                    for g in opt.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    caps = collate_captions([captions[i] for i in b], pad_id=vocab.pad_id).to(device)  # (T, B)
                    if cfg.finetune_backbone:
                        from captioner.preprocess import preprocess_batch

                        x = preprocess_batch([train_x[image_index[i]] for i in b], model.config).to(device)  # (B, 3, S, S)
                    else:
                        rows = [image_index[i] for i in b]
                        if cfg.augment_views:
                            x = draw_views(train_views, rows, cfg.seed, meta["global_step"]).to(device)  # (B, F)
                        else:
                            x = train_x[rows].to(device)  # (B, F)
                    loss = caption_loss(wrapped(x, caps), caps, pad_id=vocab.pad_id, label_smoothing=cfg.label_smoothing)
                    running += loss.item() * len(b)
                    seen += len(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                meta["global_step"] += 1
                meta["step_in_epoch"] = bi + 1
                rate = seen / max(1e-9, time.time() - t0)
                bar.set_postfix({("reward" if scst else "loss"): f"{running / max(1, seen):.3f}", ("img/s" if scst else "captions/s"): f"{rate:.0f}"})
                bar.update(1)
                if stop["now"]:
                    if is_main:
                        part = {"seconds": time.time() - t0, "running": running, "seen": seen}
                        save_checkpoint(ckpt, model, opt, {**meta, "epoch": epoch, "partial": part, "train_config": asdict(cfg)})
                        print(f"saved {ckpt} at epoch {epoch + 1}, batch {bi + 1}; continue with --resume", file=sys.stderr)
                    bar.close()
                    return {"interrupted": True, **meta}
            bar.close()
            # ---- end of epoch: evaluate on the validation split (main process only)
            if is_main:
                val_pooled = pooled_features(model, val_feats, cfg.tune_top_stages, device)  # (N, F)
                vl = val_loss(model, val_pooled, val_set, vocab, cfg, device)
                caps_val = decode_val(model, val_pooled, device, strategy="greedy")
                metrics = score(caps_val, val_refs)
                record = {"epoch": epoch + 1, "phase": "scst" if scst else "xe", "seconds": round(time.time() - t0, 1),
                          "threads": torch.get_num_threads(), "last_lr": lr,
                          ("train_reward" if scst else "train_loss"): running / max(1, seen), "val_loss": vl, **metrics,
                          "samples": {os.path.basename(val_set[i].image): caps_val[i] for i in sample_ids}}
                meta["history"].append(record)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                plot(meta["history"], out / "plot.png")
                print(f"epoch {epoch + 1}: val loss {vl:.3f}  BLEU-4 {metrics['BLEU-4']:.3f}  CIDEr-D {metrics['CIDEr-D']:.3f}  "
                      f"ROUGE-L {metrics['ROUGE-L']:.3f}  distinct {metrics['distinct']:.2f}", file=sys.stderr)
                for name, c in record["samples"].items():
                    print(f"    {name}: {c}", file=sys.stderr)
                if meta["best"] is None or metrics["CIDEr-D"] > meta["best"]["CIDEr-D"]:
                    meta["best"] = {"epoch": epoch + 1, **{k: v for k, v in metrics.items()}}
                    model.config.extra = {"trained_epochs": epoch + 1, "dev_greedy": metrics}
                    if cfg.init:  # where these weights started, and how much training they had already had
                        model.config.extra.update(init=cfg.init, init_trained_epochs=init_epochs)
                    atomic_dir(out / "best", model.save_pretrained)
                meta.update(epoch=epoch + 1, step_in_epoch=0)
                save_checkpoint(ckpt, model, opt, {**meta, "train_config": asdict(cfg)})
            else:
                meta.update(epoch=epoch + 1, step_in_epoch=0)
            if world > 1:
                torch.distributed.barrier()
        # ---- final: greedy and beam of the best model
        result = {"best": meta["best"], "history": meta["history"]}
        if is_main and meta["best"] is not None and cfg.eval_beam:
            from captioner.loading import load

            best = load(out / "best").to(device)
            best_val = pooled_features(best, val_feats, cfg.tune_top_stages, device)  # (N, F)
            rows = {"greedy": score(decode_val(best, best_val, device, strategy="greedy"), val_refs),
                    f"beam {cfg.eval_beam}": score(decode_val(best, best_val, device, strategy="beam", beam_size=cfg.eval_beam), val_refs)}
            (out / "final_metrics.json").write_text(json.dumps(rows, indent=1))
            from train.evaluate import format_table

            print(format_table(rows), file=sys.stderr)
            result["final"] = rows
        return result
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if world > 1:
            torch.distributed.destroy_process_group()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def setting_types() -> dict[str, type]:
    """Each TrainConfig field and the type its flag parses to (str where the default is None, e.g. --init)."""
    defaults = TrainConfig()
    return {f.name: str if getattr(defaults, f.name) is None else type(getattr(defaults, f.name)) for f in fields(TrainConfig)}


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    """Flags override the defaults, or on --resume the checkpoint's own settings (so a bare --resume continues as it was)."""
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for name, kind in setting_types().items():
        flag = "--" + name.replace("_", "-")
        kw = {"default": argparse.SUPPRESS, "help": f"default: {getattr(defaults, name)}"}
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=kind, **kw)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with its settings")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume")
    settings = trainer_state(Path(given.get("out", defaults.out))).get("train_config", {}) if resume else {}
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in {**settings, **given}.items() if k in names}), resume


def main(argv=None) -> int:
    cfg, resume = parse_args(argv)
    try:
        result = train(cfg, resume=resume)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
