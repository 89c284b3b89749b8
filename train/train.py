"""Train a captioner: teacher forcing on cached features, then optional self-critical fine-tuning (CIDEr-D reward).

    python -m train.train --data ../shared/data/flickr8k --out runs/flickr8k
    python -m train.train --out runs/flickr8k --resume          # after an interruption
    torchrun --nproc_per_node=2 -m train.train ...               # DistributedDataParallel

Every epoch: dev loss, BLEU/CIDEr-D/ROUGE-L of greedy captions, a metrics.jsonl line, a PNG plot,
sample captions; the best epoch by CIDEr-D is exported as a Hub-format folder (runs/NAME/best).
Checkpoints are written atomically; Ctrl-C saves before exiting; --resume continues mid-epoch.
"""
# The loop only. Settings: train/config.py; batches and the four input modes: train/inputs.py; the losses:
# train/objectives.py; checkpoints: train/checkpoint.py. The model is used through model.forward_features,
# model.encoder.from_backbone, generate_batch and caption_batch only, so a new decoder needs no edit here.
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from captioner.decode import caption_batch
from captioner.model import Captioner
from captioner.vocab import Vocabulary
from train.checkpoint import Progress, atomic_dir, has_checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig, parse_args
from train.inputs import TrainInputs, load_splits
from train.objectives import CaptionObjective, validation_loss

__all__ = ["TrainConfig", "Trainer", "train", "main", "lr_at"]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `base` down to 5% of it at step `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def decode_val(model, feats: torch.Tensor, device, **settings) -> list[str]:
    """Captions of cached backbone features (N, F), batched."""
    model.eval()
    with torch.inference_mode():
        features = model.encoder.from_backbone(feats.to(device))
    return caption_batch(model, features=features, batch_size=128, **settings)


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


def new_model(cfg: TrainConfig, train_set) -> Captioner:
    """A fresh model: the vocabulary of the training captions, the ImageNet backbone unless --no-pretrained."""
    from train.backbones import init_backbone

    vocab = Vocabulary.build((c for s in train_set for c in s.captions), min_freq=cfg.min_freq)
    model = Captioner(cfg.model_config(len(vocab)), vocab)
    if cfg.pretrained:
        init_backbone(model.encoder, cfg.backbone)
    if cfg.embed_init:
        torch.nn.init.normal_(model.decoder.embed.weight, std=cfg.embed_init)
    return model


def start(cfg: TrainConfig, train_set, ckpt: Path, resume: bool, is_main: bool):
    """(cfg, model, optimizer state or None, Progress, epochs the --init model had): from the checkpoint on
    --resume, else from --init's saved model, else a new model."""
    say = (lambda text: print(text, file=sys.stderr)) if is_main else (lambda text: None)
    if resume and has_checkpoint(ckpt):
        model, opt_state, record = load_checkpoint(ckpt)
        cfg.check_resume(TrainConfig.from_dict(record["train_config"]))
        progress = Progress.from_record(record)
        say(f"resuming from epoch {progress.epoch} step {progress.step_in_epoch}")
        return cfg, model, opt_state, progress, model.config.extra.get("init_trained_epochs")
    if resume:
        say(f"--resume: no checkpoint in {ckpt}, starting fresh")
    if not cfg.init:
        return cfg, new_model(cfg, train_set), None, Progress(), None
    model = Captioner.from_pretrained(cfg.init)  # its vocabulary, sizes and backbone weights carry on
    cfg = cfg.with_architecture_of(model.config)
    say(f"starting from {cfg.init}")
    return cfg, model, None, Progress(), model.config.extra.get("trained_epochs")


def run_name(src: str) -> str:
    """What a saved model records of the model it started from: a local run's name ("runs/a/best" -> "a"; the
    export finds it beside the run), never a path of the machine it trained on; a Hub id as it is."""
    path = Path(src)
    if not path.exists():
        return src
    path = path.resolve()
    return path.parent.name if path.name in ("best", "checkpoint") else path.name


class Trainer:
    """One run: the model, its inputs and objective, the optimizer, and the record that checkpoints carry."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.check()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.device = device = pick_device(cfg.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                self.device = device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.out / "checkpoint"

        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train_set, self.val_set = load_splits(cfg)
        cfg, model, opt_state, self.progress, self.init_epochs = start(cfg, train_set, self.ckpt, resume, self.is_main)
        self.cfg, self.model, self.vocab = cfg, model, model.vocab
        model.to(device)
        from captioner.precision import for_training

        self.precision = for_training(cfg.precision, device)
        if self.is_main:
            print(f"vocabulary: {len(self.vocab)} words; device: {device}; world size {self.world}; "
                  f"precision {self.precision} (--precision {cfg.precision})", file=sys.stderr)
        self.inputs = TrainInputs(cfg, model, train_set, self.val_set, self.vocab, device=device, world=self.world,
                                  rank=self.rank, progress=cfg.progress and self.is_main)
        self.objective = CaptionObjective(model, self.inputs.pool, self.vocab, self.inputs.references, cfg, device=device,
                                          precision=self.precision)
        self.step_loss = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.step_loss = DDP(self.objective, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = self.optimizer(cfg.lr)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.xe_steps = cfg.epochs * len(self.inputs.epoch(0, self_critical=False))
        self.scst_steps = cfg.scst_epochs * len(self.inputs.epoch(0, self_critical=True))
        self.stop = False

    def optimizer(self, lr: float) -> torch.optim.AdamW:
        scaled = self.inputs.scaled_parameters()
        groups = [{"params": [p for p in self.params if id(p) not in scaled], "lr_scale": 1.0}]
        if scaled:
            groups.append({"params": [p for p in self.params if id(p) in scaled], "lr_scale": self.cfg.tune_lr_scale})
        return torch.optim.AdamW(groups, lr=lr, weight_decay=self.cfg.weight_decay)

    def learning_rate(self, self_critical: bool) -> float:
        cfg, step = self.cfg, self.progress.global_step
        scale = self.progress.lr_scale
        if not self_critical:
            if cfg.lr_schedule == "plateau":
                return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * scale
            return lr_at(step, self.xe_steps, cfg.lr, cfg.warmup_steps)
        if cfg.scst_schedule == "constant":
            return cfg.scst_lr
        return lr_at(step - self.xe_steps, self.scst_steps, cfg.scst_lr, 0)  # self-critical steps so far

    def on_sigint(self, signum, frame) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: saving a checkpoint after this batch (Ctrl-C again to abort)", file=sys.stderr)

    def fit(self) -> dict:
        import threading

        main_thread = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, self.on_sigint) if main_thread else None
        try:
            while self.progress.epoch < self.cfg.epochs + self.cfg.scst_epochs:
                epoch = self.progress.epoch
                stats = self.run_epoch(epoch)
                if stats is None:
                    return {"interrupted": True, **asdict(self.progress)}
                if self.is_main:
                    self.end_epoch(epoch, *stats)
                if self.world > 1:  # every rank follows the main one's early-stopping decision
                    decision = torch.tensor([self.progress.stale, self.progress.lr_scale])
                    torch.distributed.broadcast(decision, 0)
                    self.progress.stale, self.progress.lr_scale = int(decision[0]), float(decision[1])
                self.progress.epoch, self.progress.step_in_epoch = self.next_epoch(epoch), 0
                if self.is_main:
                    self.save()
                if self.world > 1:
                    torch.distributed.barrier()
            result = {"best": self.progress.best, "history": self.progress.history}
            if self.is_main and self.progress.best is not None and self.cfg.eval_beam:
                result["final"] = self.final_scores()
            return result
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if self.world > 1:
                torch.distributed.destroy_process_group()

    def next_epoch(self, epoch: int) -> int:
        """The epoch after `epoch`: with --patience, a phase whose dev CIDEr-D has not set a new best for that many
        epochs ends (teacher forcing goes on to the self-critical epochs, if any; those end the run)."""
        cfg = self.cfg
        phase_end = cfg.epochs if epoch < cfg.epochs else cfg.epochs + cfg.scst_epochs
        if epoch + 1 < phase_end and (not cfg.patience or self.progress.stale < cfg.patience):
            return epoch + 1
        if self.is_main and epoch + 1 < phase_end:
            print(f"early stop: no new best dev CIDEr-D for {cfg.patience} epochs; "
                  f"{'self-critical training' if phase_end == cfg.epochs and cfg.scst_epochs else 'the run'} ends this phase",
                  file=sys.stderr)
        self.progress.stale, self.progress.lr_scale, self.progress.phase_best = 0, 1.0, None
        return max(epoch + 1, phase_end)

    def run_epoch(self, epoch: int):
        """Train one epoch (or its rest, on --resume) -> (self-critical, start time, last lr, mean loss or reward),
        or None when interrupted (after saving a checkpoint)."""
        from tqdm.auto import tqdm

        cfg, progress = self.cfg, self.progress
        scst = epoch >= cfg.epochs
        # an epoch resumed mid-way keeps the time and running totals of its first part
        partial = progress.partial or {"seconds": 0.0, "running": 0.0, "seen": 0}
        progress.partial = None
        t0 = time.time() - partial["seconds"]
        if scst and not progress.scst_optimizer:
            # Fresh Adam moments: the teacher-forcing ones are scaled to far larger gradients and would shrink every
            # self-critical step to almost nothing.
            self.opt = self.optimizer(cfg.scst_lr)
            progress.scst_optimizer = True
        batches = self.inputs.epoch(epoch, self_critical=scst)
        bar = tqdm(total=len(batches), initial=progress.step_in_epoch, unit="batch", disable=not (cfg.progress and self.is_main),
                   desc=f"epoch {epoch + 1}/{cfg.epochs + cfg.scst_epochs}{' scst' if scst else ''}")
        running, seen, lr = partial["running"], partial["seen"], None
        for bi in range(progress.step_in_epoch, len(batches)):
            lr = self.learning_rate(scst)
            for g in self.opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            batch = self.inputs.batch(batches[bi], progress.global_step, self_critical=scst)
            loss, value = self.step_loss(batch, scst)
            running += value * len(batch)
            seen += len(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            progress.global_step += 1
            progress.step_in_epoch = bi + 1
            rate = seen / max(1e-9, time.time() - t0)
            bar.set_postfix({("reward" if scst else "loss"): f"{running / max(1, seen):.3f}",
                             ("img/s" if scst else "captions/s"): f"{rate:.0f}"})
            bar.update(1)
            if self.stop:
                if self.is_main:
                    part = {"seconds": time.time() - t0, "running": running, "seen": seen}
                    self.save(epoch=epoch, partial=part)
                    print(f"saved {self.ckpt} at epoch {epoch + 1}, batch {bi + 1}; continue with --resume", file=sys.stderr)
                bar.close()
                return None
        bar.close()
        return scst, t0, lr, running / max(1, seen)

    def save(self, **overrides) -> None:
        record = asdict(replace(self.progress, **overrides))
        save_checkpoint(self.ckpt, self.model, self.opt, {**record, "train_config": asdict(self.cfg)})

    def end_epoch(self, epoch: int, scst: bool, t0: float, lr, train_value: float) -> None:
        """Score the dev split, log the epoch (metrics.jsonl, plot, samples) and export the best model so far."""
        from train.evaluate import score

        model, progress, val_set = self.model, self.progress, self.val_set
        val_pooled = self.inputs.val_features(model)  # (N, F)
        vl = validation_loss(model, val_pooled, self.inputs.val_batches(), pad_id=self.vocab.pad_id, device=self.device,
                             unk_id=None if self.cfg.learn_unk else self.vocab.unk_id)
        caps_val = decode_val(model, val_pooled, self.device, strategy="greedy")
        metrics = score(caps_val, self.inputs.val_references)
        sample_ids = range(min(self.cfg.sample_images, len(val_set)))
        record = {"epoch": epoch + 1, "phase": "scst" if scst else "xe", "seconds": round(time.time() - t0, 1),
                  "threads": torch.get_num_threads(), "precision": self.precision, "last_lr": lr,
                  ("train_reward" if scst else "train_loss"): train_value, "val_loss": vl, **metrics,
                  "samples": {os.path.basename(val_set[i].image): caps_val[i] for i in sample_ids}}
        progress.history.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        plot(progress.history, self.out / "plot.png")
        print(f"epoch {epoch + 1}: val loss {vl:.3f}  BLEU-4 {metrics['BLEU-4']:.3f}  CIDEr-D {metrics['CIDEr-D']:.3f}  "
              f"ROUGE-L {metrics['ROUGE-L']:.3f}  distinct {metrics['distinct']:.2f}  cut off {metrics['cut_off']}  "
              f"({record['seconds']:.0f} s, {self.precision})", file=sys.stderr)
        # This phase's best so far drives --patience and the plateau schedule (the run's best picks best/).
        if progress.phase_best is None or metrics["CIDEr-D"] > progress.phase_best:
            progress.phase_best, progress.stale = metrics["CIDEr-D"], 0
        else:
            progress.stale += 1
            if not scst and self.cfg.lr_schedule == "plateau":
                progress.lr_scale *= self.cfg.plateau_decay
        for name, c in record["samples"].items():
            print(f"    {name}: {c}", file=sys.stderr)
        if progress.best is None or metrics["CIDEr-D"] > progress.best["CIDEr-D"]:
            progress.best = {"epoch": epoch + 1, **metrics}
            model.config.extra = {"trained_epochs": epoch + 1, "dev_greedy": metrics}
            if self.cfg.init:  # where these weights started, and how much training they had already had
                model.config.extra.update(init=run_name(self.cfg.init), init_trained_epochs=self.init_epochs)
            atomic_dir(self.out / "best", model.save_pretrained)

    def final_scores(self) -> dict:
        """Greedy and beam scores of the best model on the dev split (final_metrics.json)."""
        from train.evaluate import format_table, score

        best = Captioner.from_pretrained(self.out / "best").to(self.device)
        feats = self.inputs.val_features(best)  # (N, F), through the best model's own trained parts
        refs, beam = self.inputs.val_references, self.cfg.eval_beam
        rows = {"greedy": score(decode_val(best, feats, self.device, strategy="greedy"), refs),
                f"beam {beam}": score(decode_val(best, feats, self.device, strategy="beam", beam_size=beam), refs)}
        (self.out / "final_metrics.json").write_text(json.dumps(rows, indent=1))
        print(format_table(rows), file=sys.stderr)
        return rows


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or on `resume` continue) the training `cfg` describes -> {"best", "history", "final"} or {"interrupted": True, ...}."""
    return Trainer(cfg, resume).fit()


def main(argv=None) -> int:
    cfg, resume = parse_args(argv, description=__doc__)
    try:
        result = train(cfg, resume=resume)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
