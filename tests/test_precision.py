"""Precision: which number format training and inference run in, chosen from the CPU's own capabilities."""
import json

import pytest
import torch
from safetensors import safe_open
from test_train import tiny_args, write_dataset

from captioner import precision


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
    trainer.progress.global_step, trainer.progress.lr_scale = 4, 1.0
    assert trainer.learning_rate(False) == pytest.approx(5e-4)
    trainer.progress.global_step, trainer.progress.lr_scale = 50, 0.25
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
    # batched and streamed agree with one by one at every precision (the int8 decoder is batch-invariant)
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
    from captioner.int8 import RowInt8Linear, RowInt8LSTMCell
    from tiny import attend_model

    m = attend_model(0, hidden_size=64, embed_size=64)
    before = sum(p.numel() * p.element_size() for p in m.decoder.parameters())
    m.set_precision("int8")
    assert isinstance(m.decoder.cell, RowInt8LSTMCell)
    assert isinstance(m.decoder.query, RowInt8Linear) and isinstance(m.decoder.gate, RowInt8Linear)
    assert not isinstance(m.decoder.head, RowInt8Linear)  # the vocabulary projection stays float32 (captions change less)
    after = sum(p.numel() * p.element_size() for p in m.decoder.parameters())  # what stays float
    cell = sum(p.numel() * p.element_size() for p in (torch.nn.LSTMCell(128, 64).parameters()))
    assert after <= before - cell  # the cell's float32 weights are gone


# --- batch invariance: a row's numbers never depend on the rows beside it


@pytest.mark.parametrize("passes", [1, 2])
def test_int8_linear_rows_are_the_same_alone_and_in_any_batch(passes):
    """Bit for bit: each row is quantized by its own scale and the integer product is exact. Rows of very different
    magnitudes side by side are what moved a dynamically quantized row (its scale was the batch's)."""
    from captioner.int8 import RowInt8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q = RowInt8Linear(lin, passes=passes)
    x = torch.randn(9, 48, generator=g) * torch.tensor([1e-3, 1, 30, 1, 1, 1e2, 0.5, 2, 1]).unsqueeze(1)
    alone = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(q(x), alone)
    assert torch.equal(q(x.flip(0)).flip(0), alone)  # order does not matter either
    assert torch.equal(q(x.reshape(3, 3, 48)).reshape(9, 40), alone)  # nor the leading shape
    # and it still computes the layer: int8 error relative to the row's size, smaller with a second pass
    err = ((alone - lin(x)).abs().amax(1) / lin(x).abs().amax(1)).max()
    assert err < (0.03 if passes == 1 else 0.01), err
    # the old dynamic quantization, for contrast: the same rows in a batch moved
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    assert not torch.equal(dyn(x), torch.cat([dyn(x[i : i + 1]) for i in range(len(x))]))


def test_the_float_layers_before_the_int8_ones_run_once_per_image():
    """float32 GEMM kernels change with the number of rows, so a row's last bits moved with its batch on a Xeon with
    AMX, and the int8 rows after it rounded it apart (logits 8e-4 off). PerImageLinear computes each image by the
    call that computes it alone: bit for bit, 2-D rows, 3-D regions and the 1-output score alike."""
    from captioner.int8 import PerImageLinear, per_image

    g = torch.Generator().manual_seed(0)
    for shape, out in (((7, 48), 40), ((5, 9, 48), 40), ((5, 9, 48), 1)):
        lin = torch.nn.Linear(48, out)
        layer = PerImageLinear(lin)
        x = torch.randn(*shape, generator=g)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
        assert torch.equal(layer(x), alone) and torch.allclose(alone, lin(x), atol=1e-5)
    holder = torch.nn.Module()
    holder.conv = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="conv=Conv2d"):
        per_image(holder, ("conv",))


def test_int8_refuses_what_it_cannot_quantize():
    from captioner.int8 import RowInt8Linear, quantize

    with pytest.raises(ValueError, match="passes=3"):
        RowInt8Linear(torch.nn.Linear(4, 4), passes=3)
    holder = torch.nn.Module()
    holder.conv = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="conv=Conv2d"):
        quantize(holder, ("conv",))


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_a_decoder_step_gives_each_row_the_numbers_it_gets_alone(tmp_path, name):
    """The tiny attention model at each precision: start and three steps for 5 images together, and for each alone.
    The int8 layers are identical bit for bit (test above); the float layers around them (regions, attention score,
    vocabulary projection) may sum in another order for another batch size, so all agree to float32's rounding.
    (Dynamic quantization moved rows by up to a quantum of the batch's range.)"""
    from captioner.loading import load_model
    from captioner.preprocess import preprocess_batch
    from tiny import attend_model

    attend_model(0).save_pretrained(tmp_path / "m")
    m = load_model(tmp_path / "m", precision=name)
    photos = [p for s in range(2) for p in _photos()][:5]
    with torch.inference_mode():
        features = m.encode(preprocess_batch(photos, m.config))

        def run(feats, words):
            logits, state = m.decoder.start(feats)
            out = [logits]
            for w in words:
                logits, state = m.decoder.step(torch.tensor(w), state)
                out.append(logits)
            return torch.stack(out), state.h  # (steps, b, V), (b, H)

        words = [[4, 5, 6, 7, 4], [5, 5, 4, 6, 7], [6, 7, 7, 5, 4]]  # a different word per row at every step
        together, h = run(features, words)
        for i in range(5):
            alone, h1 = run(features.select(slice(i, i + 1)), [[w[i]] for w in words])
            torch.testing.assert_close(alone[:, 0], together[:, i], rtol=0, atol=1e-5)
            torch.testing.assert_close(h1[0], h[i], rtol=0, atol=1e-6)


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
    batched 32 at a time): 100 photos are too few to tell 94% from 95%. Issue 35's batch-invariant int8 decoder keeps
    982, so the guard is now 970.)"""
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
    assert same >= 970, f"{same} of 1,000 captions identical at {model.precision}"  # batch-invariant int8: 982
    assert len(set(caps)) > 500  # captions that differ per photo: identity is not trivially met


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", ["auto", "int8"])
def test_the_bundled_model_captions_a_batch_as_it_captions_each_photo(name):
    """Batch invariance on the real model: 40 dev photos captioned in batches of 32 (and a last one of 8) say what
    each says alone, and a decoder step's logits for a row agree with that row's alone."""
    from captioner.decode import caption, caption_batch
    from captioner.loading import load_model
    from captioner.preprocess import preprocess_batch

    model = load_model(precision=name)
    photos = _dev_photos(40)
    with torch.inference_mode():
        features = model.encode(preprocess_batch(photos, model.config))
    batched = caption_batch(model, features=features, batch_size=32)
    alone = [caption(model, features=features.select(slice(i, i + 1))) for i in range(len(photos))]
    assert len(set(alone)) > 30  # the photos get their own captions: a mix-up would show
    assert batched == alone
    with torch.inference_mode():
        logits, state = model.decoder.start(features)
        words = torch.arange(len(photos)) % 50 + 10
        logits, _ = model.decoder.step(words, state)
        for i in (0, 17, 39):
            one, s1 = model.decoder.start(features.select(slice(i, i + 1)))
            one, _ = model.decoder.step(words[i : i + 1], s1)
            torch.testing.assert_close(one[0], logits[i], rtol=0, atol=1e-4)


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


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_one_prefix_gets_one_set_of_numbers_in_every_view(tmp_path, name):
    """Issue 32's "one prefix, one set of numbers": the same words after the same photo get the same probabilities in
    the stream, a branch, re-decoding (rescore), beam search (its beams decoded 3 at a time) and a batch of other
    photos. Within float32's rounding: dynamic int8 differed in the second digit (19.3% against 19.5%)."""
    from captioner.decode import processors_for, stream
    from captioner.generation import GenerationConfig
    from captioner.loading import load_model
    from captioner.preprocess import preprocess_batch
    from tiny import attend_model, rescore

    attend_model(0).save_pretrained(tmp_path / "m")
    m = load_model(tmp_path / "m", precision=name)
    photos = _photos()
    with torch.inference_mode():
        features = m.encode(preprocess_batch(photos, m.config))
    one = features.select(slice(0, 1))
    probs = lambda steps: [s.prob for s in steps]  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=2e-6)  # noqa: E731

    streamed = list(stream(m, features=one))
    words = [s.token for s in streamed[-1].caption_steps()]
    assert len(words) >= 3
    redecoded = rescore(m, features=one, tokens=words)[: len(words)]
    assert [s.token for s in redecoded] == words
    close(probs(redecoded), probs(streamed))
    for a, b in zip(redecoded, streamed):  # the top alternatives: same words, same numbers
        assert [c.token for c in a.alternatives] == [c.token for c in b.alternatives]
        close([c.prob for c in a.alternatives], [c.prob for c in b.alternatives])
    branch = list(stream(m, features=one, prefix=words[:2]))  # forced words, then its own
    close(probs(branch[:2]), probs(streamed[:2]))
    beam = stream(m, features=one, strategy="beam", beam_size=3)
    *_, best = beam
    beam_steps = best.caption_steps()
    close(probs(beam_steps), probs(rescore(m, features=one, tokens=[s.token for s in beam_steps])[: len(beam_steps)]))
    # a batch: the photo's words on row 0, other photos saying other words beside it
    rules = processors_for(GenerationConfig(), m.vocab)
    with torch.inference_mode():
        logits, state = m.decoder.start(features)
        seen, said = [], torch.zeros(len(photos), 0, dtype=torch.long)
        for t, w in enumerate(words):
            p = torch.softmax(rules(logits, said), -1)
            seen.append(float(p[0, w]))
            nxt = torch.tensor([w] + [(w + 1 + i) % 4 + 4 for i in range(len(photos) - 1)])
            said = torch.cat((said, nxt.unsqueeze(1)), 1)
            logits, state = m.decoder.step(nxt, state)
    close(seen, probs(streamed))
