"""Every training setting in one typed dataclass: its default, its help text (what `--help` prints), its checks.

`python -m train.train` and `python -m train.sweep` build their flags from these fields; a run's checkpoint stores
them (trainer.json's train_config), so `--resume` continues with the settings it had. Where the runs log
(docs/experiments.md) found that a setting's other values gave no gain, its help says so.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

from captioner.config import CaptionerConfig
from captioner.settings import add_flags, kind
from captioner.settings import setting as _setting

# The settings that are the model's architecture, named as in CaptionerConfig: a new model takes them from the
# training settings (model_config), and a model training starts from (--init) gives them back (with_architecture_of).
ARCHITECTURE = ("backbone", "decoder", "attention_size", "attention_score", "region_size", "embed_size", "hidden_size",
                "num_layers", "image_size", "resize")


@dataclass
class TrainConfig:
    # --- data
    data: str = _setting("../shared/data/flickr8k", "dataset folder (or JSON for karpathy/coco)")
    format: str | None = _setting(None, "flickr8k | flickr8k-token | karpathy | coco; detected when not given")
    images: str | None = _setting(None, "image folder for the JSON formats")
    train_split: str = _setting("train", "the split trained on (it alone builds the vocabulary)")
    val_split: str = _setting("dev", "the split scored every epoch (and that picks the best epoch)")
    out: str = _setting("runs/default", "run folder: checkpoint/, best/, metrics.jsonl, plot.png, final_metrics.json")
    limit_train: int = _setting(0, "use only the first N training images (smoke runs; 0 = all)")
    limit_val: int = _setting(0, "score only the first N validation images (smoke runs; 0 = all)")
    min_freq: int = _setting(5, "vocabulary: words seen at least this often in the training captions")
    max_tokens: int = _setting(22, "longest training caption in tokens, <SOS>/<EOS> included (longer ones are cut)")
    # --- model
    backbone: str = _setting("tf_efficientnet_lite0", "the CNN (any timm name); tf_efficientnet_lite2 at --image-size 260 "
                                                      "gave no gain on Flickr8k's 224x224 photos (runs/lite2_plain)")
    pretrained: bool = _setting(True, "ImageNet init of the backbone (offline for the EfficientNet-Lite family only)")
    image_size: int = _setting(224, "encoder input side")
    resize: str = _setting("squash", "squash (the Flickr8k copy here is pre-squashed to 224x224) or crop")
    decoder: str = _setting("show-tell", "show-tell: the image enters the LSTM once, at t=0 (the reference design); attend: "
                                         "soft attention over the CNN's spatial map at every word (Xu et al. 2015; the bundled model)")
    attention_size: int = _setting(512, "attend: size of the attention's keys and queries")
    attention_score: str = _setting("dot", "attend: dot (scaled dot product of query and key) or mlp (Xu et al.'s "
                                           "w . tanh(key + query))")
    region_size: int = _setting(0, "attend: size each region is projected to (the context vector); 0 = --embed-size")
    embed_size: int = _setting(512, "size of the image feature and of the word embeddings")
    hidden_size: int = _setting(512, "LSTM hidden size")
    num_layers: int = _setting(1, "LSTM layers (every run used 1; 2 is tested, not tuned)")
    dropout: float = _setting(0.5, "dropout on the image feature, word embeddings and LSTM output (the bundled model: 0.5; "
                                   "show-tell did best at 0.3, docs/experiments.md)")
    embed_init: float = _setting(0.0, "std of a normal init of the word embeddings; 0 keeps PyTorch's N(0, 1). "
                                      "0.1 gave no gain (runs/sweep/embed_init=0.1)")
    init: str | None = _setting(None, "start from this saved model (folder or Hub id), e.g. self-critical after teacher "
                                      "forcing; its vocabulary, sizes and backbone carry on")
    # --- teacher forcing
    epochs: int = _setting(15, "teacher-forcing epochs")
    batch_size: int = _setting(128, "captions per teacher-forcing step")
    lr: float = _setting(1e-3, "teacher-forcing peak learning rate (warm-up, then --lr-schedule); 2e-3 gave a lower dev "
                               "loss, CIDEr-D no better")
    lr_schedule: str = _setting("cosine", "teacher forcing after warm-up: cosine (to 5% of --lr over --epochs) or plateau "
                                          "(constant, times --plateau-decay whenever dev CIDEr-D did not rise)")
    plateau_decay: float = _setting(0.5, "--lr-schedule plateau: the lr's factor after an epoch without a new best dev CIDEr-D")
    patience: int = _setting(0, "early stopping: end a phase (teacher forcing, then self-critical) after this many epochs "
                                "without a new best dev CIDEr-D (0 = run every epoch)")
    weight_decay: float = _setting(1e-4, "AdamW weight decay")
    warmup_steps: int = _setting(200, "linear warm-up steps of the teacher-forcing learning rate")
    learn_unk: bool = _setting(False, "teach <UNK> as a target where a caption has a rare word. Decoding never says it, so "
                                      "models that learned it put their mass on it after 'in front of a' and, with it "
                                      "masked, ended there (docs/experiments.md)")
    label_smoothing: float = _setting(0.1, "teacher-forcing label smoothing; 0 was worse (runs/sweep/ls0)")
    grad_clip: float = _setting(5.0, "gradient norm clipping")
    # --- self-critical training
    scst_epochs: int = _setting(0, "self-critical epochs after teacher forcing (reward CIDEr-D)")
    scst_lr: float = _setting(5e-5, "self-critical learning rate (the bundled model: 1e-4)")
    scst_schedule: str = _setting("constant", "constant, or cosine: scst_lr decays to 5% of itself over the "
                                              "self-critical epochs (gave no gain: runs/drop02_scst_cos, drop03_scst_cos)")
    scst_samples: int = _setting(5, "sampled captions per image; baseline = the mean reward of the others. 10 gave no "
                                    "gain and diverged later (runs/drop03_scst_n10)")
    scst_batch_images: int = _setting(64, "images per self-critical step")
    scst_baseline: str = _setting("mean", "what each sample's reward is measured against: mean (the mean reward of the "
                                          "image's other samples, Luo 2020's 'new SCST') or greedy (the reward of the "
                                          "image's greedy caption, Rennie et al. 2017)")
    scst_top_k: int = _setting(5, "rollouts sample from the k likeliest words (label smoothing leaves ~10% on random "
                                  "words); 10 started lower (runs/drop03_scst_k10)")
    scst_xe_weight: float = _setting(0.0, "adds this times the teacher-forcing loss of one reference per image to each "
                                          "self-critical step; 0.1 kept the dev loss and caption variety up but gave no "
                                          "CIDEr-D gain (runs/drop03_scst_xe01)")
    scst_reward_eos: bool = _setting(True, "the reward's n-grams include the caption's end, so stopping after 'of a' "
                                           "scores below finishing the phrase (Rennie et al.'s code does the same)")
    # --- what trains of the CNN, and its inputs
    finetune_backbone: bool = _setting(False, "train the whole CNN too, on raw images (no feature cache; needs a GPU to "
                                              "be practical; teacher forcing only)")
    tune_top_stages: int = _setting(0, "train the CNN's last N stages and head conv too, on cached maps of the frozen "
                                       "stages below. 1 gave no gain (runs/tune1); 2 beat the frozen CNN in teacher "
                                       "forcing, not after self-critical training (runs/tune2_scst). With --decoder attend the "
                                       "tuned top gives the regions")
    tune_lr_scale: float = _setting(0.1, "those stages learn at this times lr (and scst_lr): pretrained weights need "
                                         "small steps")
    feature_cache: str = _setting(".cache/features", "folder of cached backbone features, keyed by backbone, weights "
                                                     "and preprocessing")
    augment_views: int = _setting(0, "extra cached views of each training image (random crop + mirror); each caption "
                                     "draws one per step (the bundled model: 0)")
    flip: float = _setting(0.0, "share of training rows that show the photo mirrored left to right, their captions' "
                                "'left' and 'right' swapped (in teacher forcing and in the self-critical references)")
    # --- evaluation and running
    eval_beam: int = _setting(3, "beam size scored after the last epoch (0 = none); beam 3 helped teacher-forcing "
                                 "models, not self-critical ones")
    sample_images: int = _setting(4, "fixed dev images whose captions are logged every epoch")
    seed: int = _setting(0, "seeds the initial weights, batch order, view draws and rollouts")
    device: str = _setting("auto", "auto picks cuda, then mps, then cpu")
    threads: int = _setting(0, "torch CPU threads; 0 keeps torch's default")
    precision: str = _setting("auto", "forward passes (and feature extraction) in fp32 or bf16 autocast; weights, optimizer "
                                      "and loss stay float32. auto: bf16 where the CPU computes it natively (AVX512-BF16 "
                                      "or AMX) or on CUDA, else fp32")
    progress: bool = _setting(True, "progress bars")

    def check(self) -> None:
        """Refuse settings that cannot work together, with the flag's name."""
        from captioner.model import DECODERS

        if self.decoder not in DECODERS:
            raise ValueError(f"--decoder {self.decoder!r}: choose one of {', '.join(DECODERS)}")
        if self.scst_baseline not in ("mean", "greedy"):
            raise ValueError(f"--scst-baseline {self.scst_baseline!r}: choose mean or greedy")
        if self.scst_schedule not in ("constant", "cosine"):
            raise ValueError(f"--scst-schedule {self.scst_schedule!r}: choose constant or cosine")
        if self.scst_epochs and self.finetune_backbone:
            raise ValueError("--scst-epochs with --finetune-backbone: self-critical training runs on cached features; "
                             "fine-tune with teacher forcing, then run --scst-epochs with --init on its best model")
        if self.tune_top_stages and self.finetune_backbone:
            raise ValueError("--tune-top-stages with --finetune-backbone: the first trains the last stages on cached maps, "
                             "the second the whole CNN on images; choose one")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"--flip {self.flip}: a share of the rows, between 0 and 1")
        if self.flip and self.augment_views:
            raise ValueError("--flip with --augment-views: augmented views mirror without swapping left and right; "
                             "choose one")
        if self.tune_top_stages < 0:
            raise ValueError(f"--tune-top-stages {self.tune_top_stages}: must be >= 0")
        from captioner.precision import TRAINING

        if self.precision not in TRAINING:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(TRAINING)}")
        if self.lr_schedule not in ("cosine", "plateau"):
            raise ValueError(f"--lr-schedule {self.lr_schedule!r}: choose cosine or plateau")
        if not 0.0 < self.plateau_decay <= 1.0:
            raise ValueError(f"--plateau-decay {self.plateau_decay}: must be in (0, 1]")
        if self.patience < 0:
            raise ValueError(f"--patience {self.patience}: must be >= 0")
        if self.scst_xe_weight < 0:
            raise ValueError(f"--scst-xe-weight {self.scst_xe_weight}: must be >= 0")

    def model_config(self, vocab_size: int) -> CaptionerConfig:
        """The config of a new model trained with these settings, for a vocabulary of `vocab_size` words."""
        return CaptionerConfig(**{name: getattr(self, name) for name in ARCHITECTURE}, dropout=self.dropout,
                               vocab_size=vocab_size, train_backbone=self.finetune_backbone)

    def with_architecture_of(self, config: CaptionerConfig) -> "TrainConfig":
        """These settings with a saved model's architecture (training goes on from it: its sizes carry on)."""
        return replace(self, **{name: getattr(config, name) for name in ARCHITECTURE})

    def check_resume(self, saved: "TrainConfig") -> None:
        """A --resume keeps what shapes the model and its optimizer's groups."""
        for name in ("decoder", "embed_size", "hidden_size", "num_layers", "min_freq", "backbone", "tune_top_stages",
                     "attention_score", "region_size"):
            if getattr(saved, name) != getattr(self, name):
                raise ValueError(f"--resume: {name}={getattr(self, name)!r} differs from the checkpoint's {getattr(saved, name)!r}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, settings: dict) -> "TrainConfig":
        """Settings as a checkpoint stores them; names this version does not know are dropped."""
        return cls(**{k: v for k, v in settings.items() if k in cls.names()})




def setting_types() -> dict[str, type]:
    """Each TrainConfig field and the type its flag parses to (str for --init, --format, --images)."""
    return {f.name: kind(TrainConfig, f.name) for f in fields(TrainConfig)}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with its settings")
    return p


def parse_args(argv=None, description: str | None = None) -> tuple[TrainConfig, bool]:
    """Flags override the defaults, or on --resume the checkpoint's own settings (so a bare --resume continues as it was)."""
    from train.checkpoint import trainer_state

    given = vars(build_parser(description).parse_args(argv))
    resume = given.pop("resume")
    settings = trainer_state(Path(given.get("out", TrainConfig.out))).get("train_config", {}) if resume else {}
    return TrainConfig.from_dict({**settings, **given}), resume
