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


@pytest.mark.slow
def test_tiny_bf16_run_trains_and_saves_a_float32_model_that_loads(tmp_path):
    from captioner.model import Captioner
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
    model = Captioner.from_pretrained(out / "best")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the checkpoint the run would resume from holds float32 weights and optimizer state too
    for ckpt in (out / "checkpoint" / "model.safetensors", out / "checkpoint" / "optimizer.safetensors"):
        with safe_open(ckpt, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float32}, ckpt


@pytest.mark.slow
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


# --- inference


def test_auto_inference_plan_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    assert precision.inference_plan("auto") == ("fp32", "int8")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.inference_plan("auto") == ("fp32", "fp32")  # nothing measured there: float32
    assert precision.inference_plan("bf16") == ("bf16", "bf16")
    assert precision.inference_plan("int8") == ("fp32", "int8")
    with pytest.raises(ValueError, match="'int4'"):
        precision.inference_plan("int4")


def _photos():
    """Four small photos whose tiny-model captions differ (checked by the caller)."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray((np.random.RandomState(s).rand(64, 64, 3) * 255).astype("uint8")) for s in range(4)]


@pytest.mark.parametrize("name", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("decoder", ["attend", "show-tell"])
def test_every_precision_runs_a_tiny_model(tmp_path, name, decoder):
    from captioner.decode import caption, caption_batch, stream
    from tiny import attend_model, tiny_model

    model = attend_model(0) if decoder == "attend" else tiny_model(0, max_len=8)
    model.save_pretrained(tmp_path / "m")
    reference = [caption(model.optimize_for_inference(), p) for p in _photos()]
    if decoder == "attend":  # the tiny Show-and-Tell says one caption for every photo: its row checks mechanics only
        assert len(set(reference)) > 1, reference  # else a mix-up between photos would go unseen
    from captioner.loading import load_model

    m = load_model(tmp_path / "m", precision=name)
    assert m.precision == {"fp32": "fp32", "bf16": "bf16", "int8": "encoder fp32, decoder int8"}[name]
    caps = [caption(m, p) for p in _photos()]
    if name == "fp32":
        assert caps == reference
    # batched and streamed agree with one by one at every precision (an int8 decoder decodes each image alone)
    assert caption_batch(m, _photos(), batch_size=3) == caps
    last = None
    for last in stream(m, _photos()[1]):
        assert isinstance(last.prob, float) and 0.0 <= last.prob <= 1.0
    assert last.text == caps[1]
    if name != "fp32":
        with pytest.raises(ValueError, match="load it again"):
            m.save_pretrained(tmp_path / "again")
        with pytest.raises(ValueError, match="already set"):
            m.set_precision("fp32")


def test_int8_shrinks_the_decoder_weights():
    from tiny import attend_model

    m = attend_model(0, hidden_size=64, embed_size=64)
    before = sum(p.numel() * p.element_size() for p in m.decoder.parameters())
    m.set_precision("int8")
    from torch.ao.nn.quantized.dynamic import Linear as QLinear, LSTMCell as QLSTMCell

    assert isinstance(m.decoder.cell, QLSTMCell) and isinstance(m.decoder.query, QLinear) and isinstance(m.decoder.gate, QLinear)
    assert not isinstance(m.decoder.head, QLinear)  # the vocabulary projection stays float32 (captions change less)
    after = sum(p.numel() * p.element_size() for p in m.decoder.parameters())  # what stays float
    cell = sum(p.numel() * p.element_size() for p in (torch.nn.LSTMCell(128, 64).parameters()))
    assert after <= before - cell  # the cell's float32 weights are gone


def _dev_photos(n):
    from conftest import FLICKR8K

    names = (FLICKR8K / "Flickr_8k.devImages.txt").read_text().split()[:n]
    return [str(FLICKR8K / "Images" / name) for name in names]


needs_data = pytest.mark.skipif(not (__import__("conftest").FLICKR8K / "captions.txt").exists(),
                                reason="Flickr8k not found at ../shared/data/flickr8k")


@pytest.mark.slow
@pytest.mark.may_skip  # on a CPU without VNNI auto picks float32: nothing to guard, a legitimate skip even in CI
@needs_data
def test_what_auto_picks_keeps_the_greedy_captions():
    """The caption guard, on the 1,000 dev photos: at the precision auto picks on this CPU, at least 95% of the bundled
    model's greedy captions are identical to float32's. Skips where auto picks float32 (a CPU without VNNI). (It took
    the first 100 photos until the model of issue 21, whose int8 decoder keeps 94 of those and 951 of all 1,000 (a probe that
    batched 32 at a time): 100 photos are too few to tell 94% from 95%.)"""
    from captioner.decode import caption_batch
    from captioner.loading import load_model

    if precision.inference_plan("auto") == ("fp32", "fp32"):
        pytest.skip(f"auto picks float32 on this CPU ({precision.cpu_features()}): nothing to guard")
    photos = _dev_photos(1000)
    assert len(photos) == 1000
    base = caption_batch(load_model(precision="fp32"), photos)
    model = load_model(precision="auto")
    caps = caption_batch(model, photos)
    same = sum(a == b for a, b in zip(base, caps))
    assert same >= 950, f"{same} of 1,000 captions identical at {model.precision}"
    assert len(set(caps)) > 500  # captions that differ per photo: identity is not trivially met


@pytest.mark.slow
def test_benchmark_prints_every_precision_and_both_training_formats(tmp_path):
    """benchmarks.run's precision section on a tiny attention model: its table has a row per precision (with how many
    captions match float32's) and the training steps in float32 and bf16. Structure only, never timings."""
    import io
    from contextlib import redirect_stdout

    from benchmarks import run
    from tiny import attend_model

    attend_model(0).save_pretrained(tmp_path / "tiny")
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = run.main(["--quick", "--model", str(tmp_path / "tiny"), "--threads", "1", "--json", str(tmp_path / "r.json"),
                       "--sections", "precision"])
    assert rc == 0
    assert "## 6. Precision" in buf.getvalue()
    sec = json.loads((tmp_path / "r.json").read_text())["sections"]["precision"]
    rows = {r["precision"]: r for r in sec["inference"]["rows"]}
    assert set(rows) == {"fp32", "bf16", "int8", "auto"}
    assert rows["fp32"]["same_captions"].split("/")[0] == rows["fp32"]["same_captions"].split("/")[1]
    assert rows["int8"]["runs"] == "encoder fp32, decoder int8"
    for r in rows.values():
        assert r["greedy_ms"] > 0 and r["beam3_ms"] > 0 and r["batch32_ips"] > 0
    assert [(r["precision"], r["unit"]) for r in sec["training"]["rows"]] == [
        ("fp32", "captions/s"), ("bf16", "captions/s"), ("fp32", "images/s"), ("bf16", "images/s")]
