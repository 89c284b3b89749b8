"""Issue 24: no request may take the server from everyone else. Each reproduction of the issue against a served app
on 127.0.0.1: bounded settings, bounded memory per request, uploads limited as they stream, sessions that end, and a
clear error (never {"error": null}) for every bad value."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from gradio_calls import call, data_url, jpeg, rss, settings
from gradio_client import Client, handle_file
from PIL import Image

from captioner.app.limits import MAX_FILES, MAX_UPLOAD_BYTES, REQUEST_PIXELS
from captioner.decode import caption
from captioner.generation import LIMITS, GenerationConfig
from tiny import serve_demo

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

MAX_LEN = 6


def test_limits_are_one_table_the_sliders_use(model):
    """The app's ranges are LIMITS' `served` numbers; the library's reach further where that makes sense."""
    from captioner.app import build_demo

    assert LIMITS["max_len"].served == 60 and LIMITS["beam_size"].served == 10 and LIMITS["num_alternatives"].served == 20
    assert LIMITS["max_len"].high > 60 and LIMITS["beam_size"].high > 10
    sliders = {c.label: c for c in build_demo(model, "tiny").blocks.values() if type(c).__name__ == "Slider"}
    assert sliders["Beam size"].maximum == LIMITS["beam_size"].served
    assert sliders["Max length (words)"].maximum == LIMITS["max_len"].served
    assert sliders["Words shown per step"].maximum == LIMITS["num_alternatives"].served
    assert sliders["Top-k"].maximum == LIMITS["top_k"].served
    for bad, message in [(dict(max_len=1.5), "max_len=1.5: expected a whole number from 1 to 200"),
                         (dict(temperature=float("nan")), "temperature=nan"), (dict(beam_size=True), "beam_size=True"),
                         (dict(top_p=float("inf")), "top_p=inf")]:
        with pytest.raises(ValueError, match=message):
            GenerationConfig(**bad)
    with pytest.raises(ValueError, match="from 1 to 60 in the app"):
        GenerationConfig(max_len=61).check_served()
    assert GenerationConfig(max_len=200, beam_size=100).max_len == 200  # the CLI and Python may ask for more


def test_ordinary_photos_reach_the_model_bit_identical_and_huge_ones_are_reduced_as_opened(model, tmp_path):
    """Photos up to ORDINARY_PIXELS are not touched (the examples' model inputs are exactly a plain decode's); a larger
    JPEG is decoded at a reduced scale (draft) and a PNG box-reduced, both keeping at least KEEP_SHORT_SIDE."""
    import torch

    from captioner.app.layout import example_paths
    from captioner.loading import load_model
    from captioner.preprocess import KEEP_SHORT_SIDE, open_image, resize, to_tensor

    bundled = load_model(None)
    for path in example_paths():
        plain = Image.open(path).convert("RGB")
        assert np.array_equal(np.asarray(resize(open_image(path), bundled.config)), np.asarray(resize(plain, bundled.config)))
        assert torch.equal(to_tensor(open_image(path), bundled.config), to_tensor(plain, bundled.config)), path
    for fmt in ("JPEG", "PNG"):
        p = tmp_path / f"huge.{fmt.lower()}"
        Image.new("RGB", (6000, 4000), (90, 120, 200)).save(p, fmt)
        img = open_image(p)
        assert KEEP_SHORT_SIDE <= min(img.size) < 2 * KEEP_SHORT_SIDE and abs(img.size[0] / img.size[1] - 1.5) < 0.01, (fmt, img.size)


HUGE = "9" * 5000
BAD_SETTINGS = [
    (dict(max_len=1_000_000, strategy="sample", temperature=1e6), "max_len=1000000: expected a whole number from 1 to 60"),
    (dict(beam_size=3000, strategy="beam"), "beam_size=3000: expected a whole number from 1 to 10"),
    (dict(max_len="inf"), "max_len='inf': expected a whole number"),
    (dict(beam_size=HUGE), "beam_size='9999"),
    (dict(max_len=1.5), "max_len=1.5: expected a whole number"),
    (dict(temperature="nan", strategy="sample"), "temperature='nan': expected a number above 0"),
    (dict(temperature="-inf"), "temperature='-inf'"),
    (dict(num_alternatives=21), "num_alternatives=21: expected a whole number from 0 to 20"),
    (dict(top_p="1e309"), "top_p='1e309': expected a number above 0"),
    (dict(seed=HUGE), "seed="),
]


@pytest.mark.parametrize("values,message", BAD_SETTINGS, ids=[str(i) for i in range(len(BAD_SETTINGS))])
def test_bad_settings_over_plain_http_are_clear_errors(server, values, message):
    kind, out = call(server, "caption", [data_url(jpeg()), *settings(**values)])
    assert kind == "error" and out is not None and message in out, (kind, out)


@pytest.mark.parametrize("step,word,message", [
    ("inf", "dog", "step='inf': give the number of the word"), (HUGE, "dog", "step='9999"),
    (1.5, "dog", "step=1.5: give the number"), ("1", "inf", "'inf' is not a word"),
    ("1", HUGE, "is not in the model's vocabulary"), ("1", "1e999", "'1e999' is not a word")])
def test_bad_branch_values_are_clear_errors(server, step, word, message):
    kind, out = call(server, "branch", [data_url(jpeg()), step, word, *settings()])
    assert kind == "error" and out is not None and message in out, (kind, out)


MALFORMED = [  # requests Gradio itself used to fail on with {"error": null}: each now a message that says what to send
    ("caption", [], "No image yet"),
    ("caption", [5, *settings()], "a value sent is not of the kind this endpoint takes"),
    ("caption", ["hello", *settings()], "a value sent is not of the kind"),
    ("caption", [{"orig_name": "x.jpg"}, *settings()], "has no uploaded file's path and no data: URL"),
    ("caption", [{"url": "http://127.0.0.1:9/x.jpg", "meta": {"_type": "gradio.FileData"}}, *settings()], "other URLs are not fetched"),
    ("caption", [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, *settings()], "Upload the file first"),
    ("branch", [], "Give the word to branch on"),
    ("caption_files", [], "No photos yet"),
    ("caption_files", [[1, 2]], "/caption_files: a value sent is not of the kind"),
]


@pytest.mark.parametrize("api,data,message", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_requests_are_clear_errors_not_null(server, api, data, message):
    kind, out = call(server, api, data)
    assert kind == "error" and out is not None and message in out, (kind, out)


def test_settings_left_out_of_an_api_call_take_their_defaults(server, model):
    """Only the image: the rest of `data` may be left out, as /call/v2 and gradio_client allow (the app's default is guided
    decoding, which is beam search for this model without an ImageNet head)."""
    kind, out = call(server, "caption", [data_url(jpeg(4))])
    assert kind == "complete" and out[0] == caption(model, jpeg(4), strategy="guided", max_len=MAX_LEN), (kind, out)


def test_a_normal_caption_is_not_queued_behind_hostile_ones(model):
    """Reproduction 2's latency: six long requests are in flight (max_len 60, greedy: this model's captions then run to
    31 words, the repeat rule ends them there, so each takes 6.2 s at 0.2 s a word); a normal caption (6 words) sent
    after them finishes before any of them does, not after they free a slot. (Sampled captions would end at random
    lengths, some at 10 words.)"""
    with serve_demo(model, "tiny (paced)", word_delay=0.2) as url:
        done: list[str] = []
        with ThreadPoolExecutor(7) as pool:
            hostile = [pool.submit(lambda i=i: (call(url, "caption", [data_url(jpeg(20 + i)), *settings(
                strategy="greedy", max_len=60)]), done.append("hostile"))[0]) for i in range(6)]
            time.sleep(1.0)  # all six running
            normal = pool.submit(lambda: (call(url, "caption", [data_url(jpeg(5)), *settings(strategy="greedy")]), done.append("normal"))[0])
            assert normal.result()[0] == "complete"
            assert [h.result()[0] for h in hostile] == ["complete"] * 6
        assert done[0] == "normal", done


def test_a_full_queue_refuses_at_once_with_gradios_answer(model, monkeypatch):
    """Past the queue's size a request is answered 503 "Queue is full" before its body is read (limits.queue_full)."""
    import captioner.app.limits as limits

    monkeypatch.setattr(limits, "CONCURRENCY", 1)
    monkeypatch.setattr(limits, "MAX_QUEUE", 2)
    with serve_demo(model, "tiny (small queue)", word_delay=0.05) as url, httpx.Client(timeout=60) as http:
        long = {"data": [data_url(jpeg(30)), *settings(strategy="sample", max_len=60)]}
        answers = [http.post(f"{url}gradio_api/call/caption", json=long) for _ in range(5)]
        codes = [r.status_code for r in answers]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [503, 503], codes  # one running, two waiting
        assert "Queue is full. Max size is 2" in answers[3].json()["detail"]
        # Not even read: a body Gradio could not parse (it answers 422 for one) still gets the 503.
        unread = http.post(f"{url}gradio_api/call/caption", content=b"not json", headers={"content-type": "application/json"})
        assert unread.status_code == 503 and "Queue is full" in unread.json()["detail"], (unread.status_code, unread.text)


def test_the_server_still_captions_after_the_bad_requests(server, model):
    kind, out = call(server, "caption", [data_url(jpeg(3)), *settings(strategy="greedy")])
    assert kind == "complete" and out[0] == caption(model, jpeg(3), strategy="greedy", max_len=MAX_LEN)


def test_a_data_url_over_the_upload_limit_is_refused_before_decoding(server):
    big = b"\xff\xd8" + bytes(21 * 2**20)  # 21 MB, as base64 28 MB: under the body limit, over the file limit
    kind, out = call(server, "caption", [data_url(big), *settings()])
    assert kind == "error" and "the image data sent is 21 MB; the limit is 20 MB" in out, (kind, out)
    t = time.monotonic()
    kind, out = call(server, "caption", [data_url(bytes(40 * 2**20)), *settings()])  # a 53 MB body: not even read
    assert kind == "refused" and out.startswith("413") and "maximum allowed size of 32 MB" in out, out
    assert time.monotonic() - t < 10


def test_upload_requests_are_limited_in_bytes_and_files(server):
    with httpx.Client(timeout=60) as http:
        many = [("files", (f"p{i}.jpg", b"x" * 100, "image/jpeg")) for i in range(MAX_FILES + 6)]
        r = http.post(server + "gradio_api/upload", files=many)
        assert r.status_code == 400 and f"at most {MAX_FILES}" in r.text, (r.status_code, r.text)
        big = [("files", (f"b{i}.jpg", bytes(19 * 2**20), "image/jpeg")) for i in range(MAX_UPLOAD_BYTES // (19 * 2**20) + 1)]
        try:
            r = http.post(server + "gradio_api/upload", files=big)
            assert r.status_code == 413 and "maximum allowed size of 128 MB" in r.text, (r.status_code, r.text)
        except httpx.TransportError:  # the server answered 413 and closed before the client finished sending
            pass
        ok = http.post(server + "gradio_api/upload", files=many[:MAX_FILES])
        assert ok.status_code == 200 and len(ok.json()) == MAX_FILES


# ---------------------------------------------------------------- memory: app.py in a subprocess, its RSS measured


@pytest.mark.slow
def test_sixteen_huge_flat_photos_stay_under_300_mb(app_process, model, tmp_path):
    """Reproduction 1: 16 PNGs of 6,320 x 6,320 (flat colour, 40 MP each, a few tens of kB) to /caption_files took the
    server to 3.62 GB. Now each is reduced as it is opened, photo by photo, and past REQUEST_PIXELS the rest are refused."""
    proc, url = app_process
    paths = []
    for i in range(16):
        p = tmp_path / f"flat{i}.png"
        Image.new("RGB", (6320, 6320), (20 * i, 100, 200)).save(p)
        paths.append(p)
    client = Client(url, verbose=False)
    client.predict(handle_file(str(paths[0])), api_name="/caption")  # warm: what one caption allocates anyway
    before = rss(proc)
    peak = [before]
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(client.predict, [handle_file(str(p)) for p in paths], api_name="/caption_files")
        while not job.done():
            peak.append(rss(proc))
            time.sleep(0.05)
        table, _ = job.result()
    allowed = REQUEST_PIXELS // (6320 * 6320)
    rows = table["data"]
    assert all(r[1] and not r[4] and r[2] == "no" for r in rows[:allowed]), rows  # flat colour: unfamiliar by rule
    assert all(not r[1] and "megapixels in all" in r[4] for r in rows[allowed:]), rows
    grew = (max(peak) - before) / 2**20
    print(f"RSS before {before / 2**20:.0f} MB, peak +{grew:.0f} MB, after +{(rss(proc) - before) / 2**20:.0f} MB")
    assert grew < 300
    assert client.predict(handle_file(str(paths[1])), api_name="/caption")[0]


@pytest.mark.slow
def test_500_short_sessions_leave_rss_flat(app_process):
    """Reproduction 4: every API call is a new session, and Gradio kept each one's state (about 1 MB with the bundled
    model) for up to 10,000 sessions. Now a session's state expires, and at most limits.SESSIONS are kept."""
    proc, url = app_process
    photo = data_url(jpeg(7, (320, 240)))
    with httpx.Client(timeout=60) as http:
        def one(i):
            r = http.post(f"{url}gradio_api/call/caption", json={"data": [photo, *settings(strategy="greedy")]})
            with http.stream("GET", f"{url}gradio_api/call/caption/{r.json()['event_id']}") as s:
                assert "event: complete" in "".join(s.iter_text())

        for i in range(50):
            one(i)
        after_50 = rss(proc)
        for i in range(450):
            one(i)
        after_500 = rss(proc)
    print(f"RSS after 50 sessions {after_50 / 2**20:.0f} MB, after 500 {after_500 / 2**20:.0f} MB")
    assert after_500 - after_50 < 50 * 2**20


def test_fair_share_gives_a_free_turn_to_the_least_served_and_bounds_how_many_compute():
    """turns.FairShare: with one slot held, a request that has had 5 s of CPU and a new one wait; the new one goes
    first. With two slots, never more than two compute at once."""
    import threading

    from captioner.app.turns import FairShare, Job

    share = FairShare(1)
    order: list[str] = []
    hog, old, new = Job(), Job(), Job()
    old.used = 5.0
    release = threading.Event()

    def run(name, job, hold=None):
        with share.turn(job):
            order.append(name)
            if hold:
                hold.wait(10)

    first = threading.Thread(target=run, args=("hog", hog, release))
    first.start()
    while not order:
        time.sleep(0.01)
    waiting = [threading.Thread(target=run, args=("old", old)), threading.Thread(target=run, args=("new", new))]
    for t in waiting:
        t.start()
        time.sleep(0.2)  # "old" asks first
    release.set()
    for t in [first, *waiting]:
        t.join(10)
    assert order == ["hog", "new", "old"]
    assert hog.used > 0.1 and new.used < hog.used

    share, busy, peak, lock = FairShare(2), [0], [0], threading.Lock()

    def work():
        with share.turn(Job()):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
            time.sleep(0.02)
            with lock:
                busy[0] -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: work(), range(40)))
    assert peak[0] == 2
    assert list(share.steps(Job(), iter("abc"))) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="slots=0"):
        FairShare(0)
