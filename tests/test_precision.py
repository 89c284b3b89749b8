"""Precision: which number format training and inference run in, chosen from the CPU's own capabilities."""
import json

import pytest
import torch
from safetensors import safe_open

from captioner import precision
from test_train import tiny_args, write_dataset


def cpu_without_bf16(monkeypatch):
    """What torch reports on a CPU without bfloat16 in hardware (an older Xeon, many laptops): patched, since this
    machine has it."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


def test_training_auto_falls_back_to_fp32_without_native_bf16(monkeypatch):
    cpu_without_bf16(monkeypatch)
    assert not precision.native_bf16()
    assert precision.for_training("auto", "cpu") == "fp32"
    assert precision.for_training("bf16", "cpu") == "bf16"  # asked for by name: honoured, if slow
    cpu_with_bf16(monkeypatch)
    assert precision.for_training("auto", "cpu") == "bf16"
    assert precision.for_training("fp32", "cpu") == "fp32"


def test_amx_alone_counts_as_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.for_training("auto", "cpu") == "bf16"


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp8'"):
        precision.for_training("fp8")
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="--precision 'half'"):
        TrainConfig(precision="half").check()


def test_autocast_runs_the_forward_in_bf16():
    lin = torch.nn.Linear(4, 3)
    with precision.autocast("bf16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with precision.autocast("fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_tiny_bf16_run_trains_and_saves_a_float32_model_that_loads(tmp_path):
    from captioner.loading import load
    from train.config import parse_args
    from train.train import train

    data = write_dataset(tmp_path / "data", n_train=4, n_dev=2)
    out = tmp_path / "run"
    cfg, resume = parse_args(tiny_args(data, out, precision="bf16", epochs=2, **{"eval-beam": 0, "no-progress": True,
                                                                                  "decoder": "attend"}))
    result = train(cfg, resume=resume)
    assert not result.get("interrupted")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["precision"] for h in history] == ["bf16", "bf16"]
    with safe_open(out / "best" / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}
    assert dtypes == {torch.float32}
    model = load(out / "best")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the checkpoint the run would resume from holds float32 weights and optimizer state too
    for ckpt in (out / "checkpoint" / "model.safetensors", out / "checkpoint" / "optimizer.safetensors"):
        with safe_open(ckpt, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float32}, ckpt


def test_plateau_schedule_and_early_stopping(tmp_path):
    """With lr 0 nothing changes, so dev CIDEr-D never sets a new best after epoch 1: --patience 1 ends teacher forcing
    after epoch 2 and goes on to the self-critical epochs, which end after their own second epoch."""
    from train.config import parse_args
    from train.train import Trainer

    data = write_dataset(tmp_path / "data", n_train=4, n_dev=2)
    out = tmp_path / "run"
    cfg, _ = parse_args(tiny_args(data, out, epochs=5, lr="0", patience=1, **{
        "lr-schedule": "plateau", "scst-epochs": 4, "scst-lr": "0", "scst-batch-images": 4, "scst-samples": 2,
        "eval-beam": 0, "no-progress": True}))
    trainer = Trainer(cfg)
    trainer.fit()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["phase"]) for h in history] == [(1, "xe"), (2, "xe"), (6, "scst"), (7, "scst")]
    # the plateau schedule: warm-up, then the lr times plateau_decay per stale epoch
    trainer.cfg.lr, trainer.cfg.warmup_steps = 1e-3, 10
    trainer.meta.update(global_step=4, lr_scale=1.0)
    assert trainer.learning_rate(False) == pytest.approx(5e-4)
    trainer.meta.update(global_step=50, lr_scale=0.25)
    assert trainer.learning_rate(False) == pytest.approx(2.5e-4)
