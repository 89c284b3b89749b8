"""A training run's checkpoint, written atomically: the model (Hub format), the optimizer's state (safetensors for its
tensors, JSON for the rest), the CPU random state and the trainer's record (trainer.json: the run's Progress and its
TrainConfig). The trainer writes and reads it; export and sweep only read a run's record (`trainer_state`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

TRAINER_FILE = "trainer.json"


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


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's state dict as (tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    """The inverse of optimizer_to_files: a state dict for Optimizer.load_state_dict."""
    state: dict = {}
    for key, v in (*tensors.items(), *meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Progress:
    """Where a training run stands, saved in every checkpoint (trainer.json) so that --resume continues from it."""

    epoch: int = 0  # epochs done (teacher forcing, then self-critical)
    step_in_epoch: int = 0  # batches done in the current epoch
    global_step: int = 0  # batches done in all: the teacher-forcing learning-rate schedule counts these
    history: list = field(default_factory=list)  # one record per epoch: losses, dev scores, seconds, sample captions
    best: dict | None = None  # the best epoch's record by dev CIDEr-D (what best/ holds)
    phase_best: float | None = None  # this phase's best dev CIDEr-D: drives --patience and the plateau schedule
    stale: int = 0  # epochs since phase_best last rose
    lr_scale: float = 1.0  # --lr-schedule plateau: the product of the decays so far in this phase
    scst_optimizer: bool = False  # the optimizer was rebuilt for self-critical training (fresh Adam moments)
    partial: dict | None = None  # an epoch interrupted mid-way: its seconds, running loss or reward, captions seen

    @classmethod
    def from_record(cls, record: dict) -> "Progress":
        """A checkpoint's trainer.json record -> its Progress (other keys, such as train_config, are not progress)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if record.get(f.name) is not None})


def save_checkpoint(folder: Path, model, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        model.save_pretrained(d)
        tensors, meta = optimizer_to_files(opt)
        save_file(tensors, str(d / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(d / "rng.safetensors"))
        (d / TRAINER_FILE).write_text(json.dumps({**state, "optimizer": meta}, indent=1))

    atomic_dir(folder, write)


def has_checkpoint(folder: Path) -> bool:
    return folder.exists() or folder.with_name(folder.name + ".old").exists()


def load_checkpoint(folder: Path):
    """(model, optimizer state dict, trainer record) of a checkpoint; restores the CPU random state it saved."""
    from safetensors.torch import load_file

    from captioner.model import Captioner

    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # interrupted during the swap
    model = Captioner.from_pretrained(folder)
    meta = json.loads((folder / TRAINER_FILE).read_text())
    opt_state = optimizer_from_files(load_file(str(folder / "optimizer.safetensors")), meta.pop("optimizer"))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return model, opt_state, meta


def trainer_state(out: Path) -> dict:
    """A run folder's last checkpoint record (epoch done, history, train_config, ...), or {} before its first checkpoint."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / TRAINER_FILE).exists():
            return json.loads((folder / TRAINER_FILE).read_text())
    return {}
