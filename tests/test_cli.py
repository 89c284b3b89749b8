"""The command line on a tiny model: captions, JSON lines, per-step output, bad files reported per file."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from captioner.decode import caption
from tiny import assert_all_different, tiny_model


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_folder_json_steps_and_bad_files(tmp_path):
    from captioner.decode import caption

    model = tiny_model(2, max_len=6)
    model.save_pretrained(tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (30, 40, 3), dtype=np.uint8)).save(imgs / f"p{i}.png")
    (imgs / "broken.jpg").write_text("not a jpeg")
    (imgs / "notes.txt").write_text("ignored: not an image suffix")

    r = run_cli(imgs, "--model", tmp_path / "model", "--json", "--strategy", "greedy")
    assert r.returncode == 1  # one file failed
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    good = {os.path.basename(d["image"]): d["caption"] for d in lines if "caption" in d}
    bad = [d for d in lines if "error" in d]
    assert set(good) == {"p0.png", "p1.png", "p2.png"}
    for name, text in good.items():
        assert text == caption(model, imgs / name)
    # 30 x 40 pixels of noise: unfamiliar by rule, even for a model without familiarity statistics (no confidence then)
    assert all(d["familiar"] is False and d["confidence"] is None and d["familiarity"]["reason"] == "only 40×30 pixels"
               for d in lines if "caption" in d)
    assert len(bad) == 1 and bad[0]["image"].endswith("broken.jpg") and "not an image" in bad[0]["error"]

    r = run_cli(imgs / "p0.png", "--model", tmp_path / "model", "--json", "--steps", "--num-alternatives", "2")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["steps"] and all(len(s["alternatives"]) <= 2 for s in rec["steps"])

    r = run_cli(imgs / "p0.png", "--model", tmp_path / "model")
    assert r.returncode == 0 and r.stdout.strip().split("\t")[1:] == [caption(model, imgs / "p0.png", strategy="greedy"),
                                                                      "[unfamiliar photo: likely wrong]"]


@pytest.mark.slow
def test_cli_bad_model_and_settings(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "p.png")
    r = run_cli(tmp_path, "--model", tmp_path / "missing")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    tiny_model().save_pretrained(tmp_path / "m")
    r = run_cli(tmp_path, "--model", tmp_path / "m", "--strategy", "beam", "--beam-size", "0")
    assert r.returncode == 2 and "beam_size=0" in r.stderr


def test_cli_usage_errors_and_an_unknown_backbone_exit_2(tmp_path, capsys):
    """In this process (captioner.cli.main, as `python -m captioner` runs it): exit 2 and one line saying why."""
    from captioner.cli import main

    Image.new("RGB", (20, 20)).save(tmp_path / "p.png")
    tiny_model().save_pretrained(tmp_path / "m")
    for flags, message in ((["--batch-size", "0"], "error: batch_size=0: expected 1 or more"),
                           (["--labels", "-1"], "error: labels=-1: expected 0 or more")):
        assert main([str(tmp_path / "p.png"), "--model", str(tmp_path / "m"), *flags]) == 2
        out, err = capsys.readouterr()
        assert err.strip() == message and not out
    # a config naming an unknown backbone: exit 2 (not 1, "some images failed") with the reason (timm's own words)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "backbone": "no_such_backbone"}))
    assert main([str(tmp_path / "p.png"), "--model", str(tmp_path / "m")]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("error: ") and "Unknown model (no_such_backbone)" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_empty_folder_order_and_help(tmp_path):
    model = tiny_model(2, max_len=6)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    r = run_cli(tmp_path / "empty", "--model", tmp_path / "model")
    assert r.returncode == 2 and "no images found" in r.stderr and not r.stdout
    # --json keeps the order of the inputs, bad files in their place
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_text("not a jpeg")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(tmp_path / "c.png")
    r = run_cli(tmp_path / "c.png", tmp_path / "b.jpg", tmp_path / "a.png", "--model", tmp_path / "model", "--json")
    names = [os.path.basename(json.loads(line)["image"]) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and names == ["c.png", "b.jpg", "a.png"]
    # every flag has help text
    r = run_cli("--help")
    flags = re.findall(r"^  (--[a-z-]+)", r.stdout, flags=re.M)
    assert {"--beam-size", "--length-penalty", "--temperature", "--max-len", "--no-repeat-ngram", "--batch-size"} <= set(flags)
    for flag in ("--beam-size", "--length-penalty", "--temperature", "--max-len", "--no-repeat-ngram", "--batch-size"):
        assert re.search(re.escape(flag) + r" [A-Z_]+\s+[a-z]", r.stdout), f"{flag} has no help text"


def test_cli_each_photo_gets_its_own_caption_in_input_order(distinct, distinct_dir, tmp_path, capsys):
    """On the model whose captions differ per photo: out of order, across encoder batches, a bad file in between
    (captioner.cli.main in this process; the tests above run `python -m captioner`)."""
    from captioner.cli import main

    model, photos = distinct
    model_dir, paths = distinct_dir
    expected = {str(p): caption(model, img) for p, img in zip(paths, photos)}
    assert_all_different(expected.values())
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    order = [str(paths[i]) for i in (4, 1, 5)] + [str(tmp_path / "bad.jpg")] + [str(paths[i]) for i in (0, 3, 2)]
    for extra in (["--batch-size", "2"], ["--steps"]):
        assert main([*order, "--model", str(model_dir), "--json", *extra]) == 1  # 1: the bad file
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [d["image"] for d in lines] == order
        assert [d.get("caption") for d in lines] == [expected.get(p) for p in order]


def test_which_model_and_revision_are_loaded(distinct, distinct_dir, tmp_path, monkeypatch, capsys):
    """--model, else $CAPTIONER_MODEL, else the bundled model; --revision, else $CAPTIONER_REVISION."""
    from captioner.cli import main
    from captioner.loading import DEFAULT_MODEL, load_model

    given, paths = distinct_dir
    other = tmp_path / "other"
    tiny_model(4, max_len=6).save_pretrained(other)
    photo = str(paths[0])
    mine, theirs = caption(distinct[0], photo), caption(tiny_model(4, max_len=6), photo)
    assert mine != theirs  # the two models tell themselves apart on this photo

    def cli_caption(*args):
        assert main([photo, *args]) == 0
        return capsys.readouterr().out.strip().split("\t")[1]

    monkeypatch.setenv("CAPTIONER_MODEL", str(other))
    monkeypatch.setenv("CAPTIONER_REVISION", "from-env")
    assert cli_caption("--model", str(given)) == mine  # --model wins over $CAPTIONER_MODEL
    assert cli_caption() == theirs  # no --model: $CAPTIONER_MODEL
    assert load_model().source == str(other) and load_model().revision == "from-env"
    assert load_model(given, revision="given").revision == "given"  # --revision wins over $CAPTIONER_REVISION
    monkeypatch.delenv("CAPTIONER_MODEL")
    monkeypatch.delenv("CAPTIONER_REVISION")
    bundled = load_model()
    assert Path(bundled.source) == DEFAULT_MODEL and bundled.revision is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_folder_shows_its_progress_on_a_terminal_only(distinct, distinct_dir, monkeypatch, capsys):
    """On a terminal, stderr gets a bar redrawn in place (photos done, photos/s, time left) that is erased at the end;
    stdout has only the results. Where stderr is no terminal (a pipe, a file, CI), nothing extra is written."""
    from captioner.cli import Progress, main

    model_dir, photos = distinct_dir
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([str(p) for p in photos] + ["--model", str(model_dir), "--json", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(p) for p in photos]  # stdout: JSON only
    drawn = terminal.getvalue()
    assert f"0/{len(photos)} photos" in drawn and f"{len(photos)}/{len(photos)} photos" in drawn
    assert "photos/s" in drawn and "s left" in drawn and "\r" in drawn
    assert drawn.endswith("\r\x1b[K")  # erased
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([str(p) for p in photos] + ["--model", str(model_dir), "--json", "--no-progress"]) == 0
    assert terminal.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert main([str(p) for p in photos] + ["--model", str(model_dir), "--json"]) == 0
    assert sys.stderr.getvalue() == ""
    # the numbers: 3 of 12 photos after 1.5 s -> 2 photos/s, 4.5 s left
    ticks = iter([0.0, 1.5])
    bar = Progress(12, _Terminal(), clock=lambda: next(ticks))
    bar.done = 3
    assert bar.line() == "[######..................] 3/12 photos  2.0 photos/s  4 s left"


def test_the_json_line_is_the_decode_record_the_app_downloads(distinct, distinct_dir, capsys):
    """One record format: the CLI's --json line is formatting.decode_record of the photo's decode (what the app's
    "Download decoding (JSON)" writes, with its settings and prefix), field for field."""
    from captioner.cli import main
    from captioner.confidence import Assessor
    from captioner.decode import encoded, final
    from captioner.familiarity import degenerate
    from captioner.formatting import decode_record, model_label
    from captioner.loading import load_model

    _, photos = distinct
    model_dir, paths = distinct_dir
    flags = ["--strategy", "beam", "--beam-size", "2", "--labels", "0"]
    assert main([str(p) for p in paths[:3]] + ["--model", str(model_dir), "--json", "--steps", *flags]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = load_model(str(model_dir))
    features = next(encoded(model, photos[:3]))
    assessor = Assessor.of(model)
    for i, (line, img) in enumerate(zip(lines, photos)):
        one = features.select(slice(i, i + 1))
        last = final(model, features=one, strategy="beam", beam_size=2)
        want = decode_record(last, model=model_label(model, str(model_dir)), precision=model.precision,
                             assessment=assessor.assess(one, last.caption_steps(), rule=degenerate(img), model=model))
        assert line.pop("image") == str(paths[i]) and line == json.loads(json.dumps(want))
        assert line["steps"] and line["caption"] == last.text and line["model"].startswith(str(model_dir))
