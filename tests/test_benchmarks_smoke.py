"""Smoke test of the benchmarks: --quick on the tiny model runs every section and prints its tables.

Asserts structure only (sections, columns, JSON keys), never timings: the machine running tests may be busy.
"""
import json

import pytest

from tiny import tiny_model


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from benchmarks import run

    tmp = tmp_path_factory.mktemp("bench")
    model_dir = tmp / "tiny"
    tiny_model().save_pretrained(model_dir)
    out = tmp / "results.json"
    import io
    from contextlib import redirect_stdout

    import torch

    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = run.main(["--quick", "--model", str(model_dir), "--threads", "1", "--json", str(out), "--peer-scale", "tiny",
                           "--sections", "latency,batch,peers,app,train,decoders"])
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this whole process: the tests after this one keep theirs
    return rc, buf.getvalue(), json.loads(out.read_text())


@pytest.mark.slow
def test_runs_and_prints_tables(bench):
    rc, text, _ = bench
    assert rc == 0
    for heading in ("# Captioner benchmarks", "## 1. Per-image latency", "## 2. Batch throughput", "## 3. Peers", "## 4. App",
                    "## 5. Training", "## 7. Show-and-Tell against the attention decoder", "## Targets"):
        assert heading in text, heading
    assert "## 6. Levers" not in text and "with proposed levers" not in text
    assert "| stage | median ms |" in text
    assert "| batch size | images | images/s | ms/image |" in text
    assert "| target | goal |" in text


@pytest.mark.slow
def test_json_structure(bench):
    _, _, res = bench
    m = res["machine"]
    for key in ("cpu", "logical_cores", "torch", "torch_threads"):
        assert key in m
    assert res["settings"]["threads"] == 1 and res["settings"]["quick"] is True
    stages = [r["stage"] for r in res["sections"]["latency"]["rows"]]
    for want in ("preprocess from decoded PIL image", "preprocess from JPEG file", "encoder", "decoder start", "one decode step",
                 "whole caption, greedy", "whole caption, beam 3", "whole caption, sample", "time to first streamed word"):
        assert any(s.startswith(want) for s in stages), want
    for r in res["sections"]["latency"]["rows"]:
        assert r["median_ms"] > 0 and r["n"] >= 1
    assert [r["batch_size"] for r in res["sections"]["batch"]["rows"]] == [1, 8, 32]
    peers = {r["peer"]: r for r in res["sections"]["peers"]["rows"]}
    # Every peer is measured: a row "skipped" for a missing optional package (transformers: requirements-dev.txt)
    # would drop its checks silently, so it fails here, saying which package.
    skipped = {r["peer"]: r["skipped"] for r in peers.values() if "skipped" in r}
    assert not skipped, f"peers skipped, their checks would vanish: {skipped}"
    assert any(p.startswith("Show-and-Tell") for p in peers) and any(p.startswith("BLIP") for p in peers) \
        and any(p.startswith("ViT-GPT2") for p in peers), sorted(peers)
    for r in peers.values():
        assert r["greedy_tokens"] <= 16 and r["greedy_x_ours"] > 0
        if not r["peer"].startswith("Show-and-Tell"):
            assert r["greedy_tokens"] == 16 and r["beam3_tokens"] == 16  # exactly 16 new tokens
    # The app section's figures, required: app_bench turns any failure into "skipped", which must not pass.
    app = res["sections"]["app"]
    assert "skipped" not in app, f"app benchmark skipped: {app['skipped']}"
    for key in ("cold_start_s", "click_to_first_word_ms", "click_to_full_caption_ms", "rss_after_load_mb"):
        assert isinstance(app.get(key), (int, float)) and app[key] > 0, (key, app.get(key))
    assert app["streamed_outputs_per_caption"] >= 1 and app["example_caption"] and app["clicks"] >= 1
    assert {r["stage"].split(",")[0] for r in res["sections"]["train"]["rows"]} >= {"encoder.backbone_features", "training step on cached features"}
    tuned = [r for r in res["sections"]["train"]["rows"] if r["note"].startswith("--tune-top-stages")]
    assert [r["note"] for r in tuned] == ["--tune-top-stages 1", "--tune-top-stages 2"] and all(r["captions_per_s"] > 0 for r in tuned)
    assert set(res["sections"]) == {"latency", "batch", "peers", "app", "train", "decoders"}
    dec = res["sections"]["decoders"]
    assert [r["stage"] for r in dec["rows"]][:2] == ["whole greedy caption (encoder included)", "time to first streamed word"]
    assert all(r["show_tell_ms"] > 0 and r["attend_ms"] > 0 and r["ratio"] > 0 for r in dec["rows"])
    assert dec["decoder_params_m"]["attend"] > dec["decoder_params_m"]["show-tell"]
    assert [t["key"] for t in res["targets"]][:2] == ["greedy_ms", "first_word_ms"]
    assert all(set(t) == {"key", "target", "goal", "op", "measured", "status"} for t in res["targets"])
    assert all(t["status"] in ("pass", "MISS", "n/a") for t in res["targets"])


def test_unknown_section_is_refused(capsys):
    from benchmarks import run

    for gone in ("nope", "levers"):  # levers: section 6, removed once its speed-ups moved into the package
        with pytest.raises(SystemExit):
            run.main(["--sections", gone])


@pytest.mark.slow
def test_issue_35_rows_before_and_after(tmp_path):
    """benchmarks.folders on a tiny attention model, --quick: every row has a before and an after, batch captions are
    all identical to single ones, and each runtime ran where it should. Structure only, never timings."""
    import io
    from contextlib import redirect_stdout

    import torch

    from benchmarks import folders
    from tiny import attend_model

    attend_model(0).save_pretrained(tmp_path / "m")
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = folders.main(["--quick", "--model", str(tmp_path / "m"), "--threads", "1", "--photos", "6",
                               "--json", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and "## Issue 35: before and after" in buf.getvalue()
    rows = {r["what"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    for what in ("decoder step, batch 1", "decoder step, batch 6", "encoder, batch 1", "greedy caption, JPEG file to text",
                 "caption_batch, 6 photos", "6 photos batched / one at a time", "load_model (cold start)",
                 "peak RSS, load + 8 captions"):
        assert rows[what]["before"] > 0 and rows[what]["after"] > 0, what
    assert rows["6 batch captions identical to one-at-a-time (after)"]["after"] == 6


@pytest.mark.slow
def test_eyes_section_swaps_only_the_backbone(tmp_path):
    """--sections eyes on a small attention model with Lite0: every Lite at its native side behind that decoder, in
    every setting this CPU runs, each caption exactly WORDS words; Lite0's ratio to itself is 1. Never timings."""
    import io
    from contextlib import redirect_stdout

    import torch

    from benchmarks import eyes, run
    from captioner.lite0 import VARIANTS
    from tiny import tiny_model

    tiny_model(decoder="attend", backbone="tf_efficientnet_lite0", image_size=224, max_len=8).save_pretrained(tmp_path / "m")
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            rc = run.main(["--quick", "--model", str(tmp_path / "m"), "--threads", "1", "--json", str(tmp_path / "r.json"),
                           "--sections", "eyes"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and "## 8. A bigger eye" in buf.getvalue() and "| backbone | side | regions |" in buf.getvalue()
    sec = json.loads((tmp_path / "r.json").read_text())["sections"]["eyes"]
    settings = [k for k in ("app", "bf16 encoder", "ONNX encoder") if k not in sec["skipped"]]
    assert "app" in settings
    assert [(r["backbone"], r["setting"]) for r in sec["rows"]] == [(n, k) for n in VARIANTS for k in settings]
    grids = {r["backbone"]: (r["side"], r["regions"]) for r in sec["rows"]}
    assert grids == {"tf_efficientnet_lite0": (224, "7x7 = 49"), "tf_efficientnet_lite1": (240, "8x8 = 64"),
                     "tf_efficientnet_lite2": (260, "9x9 = 81")}
    assert all(r["words"] == eyes.WORDS and r["encoder_ms"] > 0 and r["caption_ms"] > 0 for r in sec["rows"])
    assert all(r["x_lite0_same_setting"] == 1.0 for r in sec["rows"] if r["backbone"] == "tf_efficientnet_lite0")
    assert sec["rows"][0]["x_today"] == 1.0 and sec["rows"][0]["fits"]
