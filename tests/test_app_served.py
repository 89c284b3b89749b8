"""The app served over HTTP and driven by gradio_client: streaming, bad uploads, concurrent users, app.py start-up."""
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner.app.handlers import WORD_DELAY as APP_WORD_DELAY
from captioner.decode import caption, stream
from tiny import app_env, assert_all_different, free_port, serve_demo, start_app

# gradio 6.31's queue statistics use a pandas option that pandas 3 deprecates (not this app's code)
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 8
WORD_DELAY = APP_WORD_DELAY  # the served app streams at its own pace (conftest's `server`)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    out = {}
    for i in range(3):
        a = np.random.RandomState(10 + i).randint(0, 256, (60 + 8 * i, 80, 3), dtype=np.uint8)
        out[f"photo{i}"] = d / f"photo{i}.jpg"
        Image.fromarray(a).save(out[f"photo{i}"], quality=92)
    out["text"] = d / "notes.jpg"  # a text file renamed .jpg
    out["text"].write_text("shopping list: eggs, milk\n")
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    out["truncated"] = d / "cut.jpg"
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return out


def expected(model, path) -> str:
    """What the app's defaults give (app.APP_DEFAULTS, the served max_len)."""
    from captioner.app import APP_DEFAULTS

    return caption(model, str(path), APP_DEFAULTS, max_len=MAX_LEN)


def test_caption_streams_growing_partials_then_the_final_caption(server, model, files):
    client = Client(server, verbose=False)
    job = client.submit(handle_file(str(files["photo0"])), api_name="/caption")  # the app's defaults
    updates = [(text, len(table["data"])) for text, _, table, _ in job]
    final = job.result()[0]
    assert final == expected(model, files["photo0"]) and len(final.split()) >= 3
    partials = [u for u in updates if u[0] != final]
    assert len({text for text, _ in partials}) >= 3, updates
    # One more word each update (the history has one row a word).
    words = [n for _, n in updates]
    assert words == list(range(1, MAX_LEN + 1)), updates  # the last update is the final caption


def test_greedy_partials_are_prefixes_of_each_other(server, model, files):
    client = Client(server, verbose=False)
    texts = [out[0] for out in client.submit(handle_file(str(files["photo1"])), "greedy", api_name="/caption")]
    assert len(texts) >= 3 and texts[-1] == caption(model, str(files["photo1"]), strategy="greedy", max_len=MAX_LEN)
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a) and len(b) > len(a)


def test_other_outputs_are_the_step_bars_and_the_history(server, model, files):
    client = Client(server, verbose=False)
    text, bars, table, assessment = client.predict(handle_file(str(files["photo1"])), "greedy", api_name="/caption")
    assert text == caption(model, str(files["photo1"]), strategy="greedy", max_len=MAX_LEN)
    final = list(stream(model, str(files["photo1"]), strategy="greedy", max_len=MAX_LEN))[-1]
    # the last step's top words: 5, less those a decoding rule blocked there (a repeated phrase has probability 0)
    assert [c["label"] for c in bars["confidences"]] == [a.word for a in final.alternatives] and len(final.alternatives) >= 3
    assert bars["label"] == bars["confidences"][0]["label"]
    assert [row[1] for row in table["data"]] == [model.vocab.itos[t] for t in final.tokens]
    assert len(table["data"]) == MAX_LEN
    # the last output: whether the photo is familiar and how sure the caption is (None: the model cannot say)
    assert set(assessment) == {"familiar", "confidence", "familiarity"} and assessment["familiar"] in (True, False, None)


def test_guided_decoding_and_its_threshold_by_name(server, model, files):
    client = Client(server, verbose=False)
    path = str(files["photo2"])
    text = client.predict(handle_file(path), strategy="guided", guide_threshold=0.3, api_name="/caption")[0]
    assert text == caption(model, path, strategy="guided", guide_threshold=0.3, max_len=MAX_LEN)
    with pytest.raises(AppError, match="guide_threshold=1.5"):
        client.predict(handle_file(path), strategy="guided", guide_threshold=1.5, api_name="/caption")


@pytest.mark.parametrize("name,message", [("text", "notes.jpg: not an image file PIL can read"),
                                          ("truncated", "cut.jpg: the image data is damaged or truncated")])
def test_bad_uploads_are_clear_errors_and_the_server_goes_on(server, model, files, name, message):
    client = Client(server, verbose=False)
    with pytest.raises(AppError) as e:
        client.predict(handle_file(str(files[name])), api_name="/caption")
    assert str(e.value).startswith(message)
    assert "Traceback" not in str(e.value) and "/tmp" not in str(e.value)
    assert client.predict(handle_file(str(files["photo2"])), api_name="/caption")[0] == expected(model, files["photo2"])


def test_branch_streams_the_caption_decoded_from_the_changed_word(server, model, files):
    client = Client(server, verbose=False)
    from captioner.app import APP_DEFAULTS

    path = str(files["photo0"])
    final = list(stream(model, path, APP_DEFAULTS, max_len=MAX_LEN))[-1]
    alt = next(a for a in final.caption_steps()[2].alternatives if a.token != final.tokens[2] and a.word != "<EOS>")
    want = list(stream(model, path, APP_DEFAULTS, max_len=MAX_LEN, prefix=[*final.tokens[:2], alt.token]))
    for word in (alt.word, alt.token):
        job = client.submit(handle_file(path), 3, word, api_name="/branch")
        texts = [out[0] for out in job]
        assert texts == [w.text for w in want], (word, texts)
        text, bars, table, assessment = job.result()
        assert set(assessment) == {"familiar", "confidence", "familiarity"}  # the finished branch's verdicts
        assert [row[1] for row in table["data"]] == [w.word for w in want[-1].caption_steps()]
    with pytest.raises(AppError, match="not a word of the model's vocabulary"):
        client.predict(handle_file(path), 3, "zebrafish-unicorn", api_name="/branch")
    with pytest.raises(AppError, match="step=9: this caption has 8 words"):
        client.predict(handle_file(path), 9, alt.word, api_name="/branch")


def test_caption_files_names_bad_files_and_captions_the_rest(server, model, files):
    import csv
    import json

    client = Client(server, verbose=False)
    names = ["photo0", "text", "photo1", "truncated"]
    table, downloads = client.predict([handle_file(str(files[n])) for n in names], api_name="/caption_files")
    assert table["headers"] == ["image", "caption", "familiar", "confidence", "error"]
    rows = table["data"]
    assert [r[0] for r in rows] == [files[n].name for n in names]
    assert rows[0][1] == expected(model, files["photo0"]) and rows[2][1] == expected(model, files["photo1"])
    assert rows[1][1] == "" and rows[1][4].startswith("not an image file PIL can read")
    assert rows[3][1] == "" and rows[3][4].startswith("the image data is damaged or truncated")
    assert not any("/tmp" in cell for r in rows for cell in r)
    by_name = {os.path.basename(d): d for d in downloads}
    assert set(by_name) == {"captions.csv", "captions.json"}
    with open(by_name["captions.csv"], newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [table["headers"], *rows]
    with open(by_name["captions.json"], encoding="utf-8") as f:
        records = json.load(f)
    assert [r["image"] for r in records] == [r[0] for r in rows] and records[0]["caption"] == rows[0][1]
    assert "caption" not in records[1] and records[1]["error"] == rows[1][4]
    assert [r.get("familiar") for r in records] == [{"yes": True, "no": False, "": None}[r[2]] for r in rows]


def test_uploads_over_20mb_are_refused(server, tmp_path):
    import httpx

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + os.urandom(21 * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):  # the client checks first
        Client(server, verbose=False).predict(handle_file(str(big)), api_name="/caption")
    r = httpx.post(server + "gradio_api/upload", files={"files": ("big.jpg", big.read_bytes(), "image/jpeg")}, timeout=120)
    assert r.status_code == 413 and "20" in r.text  # and so does the server


@pytest.fixture(scope="module")
def distinct_server(distinct):
    """The app serving the tiny model whose captions differ per photo (conftest's `distinct`)."""
    with serve_demo(distinct[0], "distinct (tests)") as url:
        yield url


@pytest.mark.slow
def test_sixteen_concurrent_users_all_get_their_caption(distinct_server, distinct, distinct_dir):
    """Each of 16 concurrent users uploads one of six photos whose captions all differ: a caption crossed between
    sessions, or a batch that shuffles, fails."""
    model, _ = distinct
    _, paths = distinct_dir
    want = [expected(model, p) for p in paths]
    assert_all_different(want)

    def user(i):
        client = Client(distinct_server, verbose=False)
        return i % len(paths), client.predict(handle_file(str(paths[i % len(paths)])), api_name="/caption")[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(user, range(16)))
    assert len(results) == 16
    assert [text for _, text in results] == [want[k] for k, _ in results]
    order = [3, 0, 5, 1, 4, 2]
    table, _ = Client(distinct_server, verbose=False).predict([handle_file(str(paths[i])) for i in order], api_name="/caption_files")
    assert [(r[0], r[1]) for r in table["data"]] == [(paths[i].name, want[i]) for i in order]


# ---------------------------------------------------------------- app.py


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "model folder '/no/such/folder' does not exist"),
    (["--model", str(ROOT / "examples")], "missing config.json, model.safetensors, vocab.json"),
])
def test_app_with_a_bad_model_exits_with_one_clear_line(args, message):
    r = subprocess.run([sys.executable, "app.py", *args, "--port", str(free_port())], cwd=ROOT, env=app_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the model") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.slow
def test_app_py_serves_the_model_it_is_given(model_dir, distinct, distinct_dir):
    """--model wins over $CAPTIONER_MODEL (which names another model here); the port comes from $GRADIO_SERVER_PORT;
    --threads sets torch's threads. Each photo gets the given model's own caption."""
    given, paths = distinct_dir
    proc, url = start_app(given, "--threads", "1", env={"CAPTIONER_MODEL": str(model_dir)}, port_from_env=True)
    try:
        client = Client(url, verbose=False)
        want = [expected(distinct[0], p) for p in paths[:3]]
        assert_all_different(want)
        assert [client.predict(handle_file(str(p)), api_name="/caption")[0] for p in paths[:3]] == want
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    from captioner.precision import inference_plan

    enc, dec = inference_plan("auto")
    runs = enc if enc == dec else f"encoder {enc}, decoder {dec}"  # what app.py's default --precision auto picks here
    assert f"model: {given} ({len(distinct[0].vocab)} words); precision: {runs}; torch threads: 1" in out, out
    assert "Traceback" not in out, out
    # Gradio's hint names a launch() argument this command has no way to set; the app names its own flag instead.
    assert f"Running on local URL:  {url}" in out and "start it with --share" in out and "share=True" not in out, out


@pytest.mark.slow
def test_a_simulated_space_starts_without_a_traceback(model_dir):
    """SYSTEM=spaces with a SPACE_ID is how Gradio knows it runs on a Space: it then starts its hot-reload watcher,
    which fails where Hugging Face's `spaces` package is absent. The app says so in one line, no traceback."""
    proc, url = start_app(model_dir, env={"SYSTEM": "spaces", "SPACE_ID": "someone/captioner"})
    try:
        time.sleep(2)  # the watcher's thread fails right after the server starts
        assert Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out
    assert "Running on local URL" in out, out


def test_share_is_a_flag_and_off_by_default():
    import app

    assert app.parser().parse_args([]).share is False and app.parser().parse_args(["--share"]).share is True
    assert "--share" in app.parser().format_help()


def test_app_py_has_no_import_side_effects():
    code = "import os, sys; sys.argv = ['x', '--model', '/nope']; import app; print(os.environ.get('GRADIO_ANALYTICS_ENABLED'), 'gradio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["None", "False"], r.stdout + r.stderr


@pytest.mark.may_skip  # another OS or C library: nothing to test
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_app_limits_malloc_arenas_on_glibc():
    import platform

    import app

    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"C library is {platform.libc_ver()[0] or 'unknown'}, not glibc")
    assert app.limit_malloc_arenas(2) is True
