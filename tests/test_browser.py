"""The app in a real browser (Debian's chromium driven by Playwright): upload, streaming, inspector, branching.

Serves the real model when there is one, $CAPTIONER_MODEL or else the bundled captioner/default_model/
(and then also saves a screenshot under the test's tmp_path), else the tiny random model. Skipped where
/usr/bin/chromium is missing (CI installs it with `apt-get install -y chromium`). Tests write only to temporary
folders: `bash scripts/screenshots.sh` refreshes the README's assets/screenshot.png on purpose.
"""
import os
from pathlib import Path

import pytest

from captioner.decode import stream
from tiny import endless_model_dir, serve_demo

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
DEFAULT_MODEL = ROOT / "captioner" / "default_model"
PHOTO = ROOT / "examples" / "cameraman.jpg"  # people outdoors: the kind of photo Flickr8k is made of
SECOND_PHOTO = ROOT / "examples" / "coffee.jpg"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT = 90_000  # ms: a shared 2-core machine can be slow to start a browser and render Gradio

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),  # gradio 6.31's queue statistics, not the app
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model, real): the app on a free port, with the real model if there is one."""
    real = bool(os.environ.get("CAPTIONER_MODEL")) or (DEFAULT_MODEL / "model.safetensors").exists()
    if real:
        from captioner.loading import load_model

        model = load_model()  # $CAPTIONER_MODEL, else the bundled default, as app.py does
        label = os.environ.get("CAPTIONER_MODEL") or "captioner/default_model (bundled)"
    else:
        from captioner import load

        folder = endless_model_dir(tmp_path_factory.mktemp("browser_model"), 8)  # 8-word captions
        model, label = load(folder), "tiny random model (tests)"
    with serve_demo(model, label) as url:
        yield url, model, real


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def default_steps(model, path, **kw):
    """What the app's defaults give (greedy, the model's max length)."""
    return list(stream(model, str(path), strategy="greedy", max_len=model.config.max_len, num_alternatives=5, **kw))


RECORD_CAPTIONS = """() => {
    window.__captions = [];
    const box = document.querySelector('#caption textarea');
    window.__recorder = setInterval(() => {
        const v = box.value;
        if (window.__captions[window.__captions.length - 1] !== v) window.__captions.push(v);
    }, 5);
}"""


def caption_value(page) -> str:
    return page.locator("#caption textarea").input_value()


def toasts(page) -> str:
    return "\n".join(page.locator(".toast-body").all_inner_texts())


def test_upload_stream_inspect_branch(served, browser, tmp_path):
    url, model, real = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#photo input[type=file]", state="attached")
    assert "Captioner" in page.title()
    assert "vocabulary" in page.locator("#model-info").inner_text()

    # 0. No image, then a text file named .jpg: clear messages, and the page goes on working.
    page.click("#caption-btn")
    page.wait_for_function("() => [...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes('No image yet'))")
    bad = tmp_path / "notes.jpg"
    bad.write_text("a shopping list, not a photo\n")
    page.set_input_files("#photo input[type=file]", str(bad))
    page.wait_for_function("() => [...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes('notes.jpg: not an image file'))")
    assert "Traceback" not in toasts(page)
    page.evaluate("() => document.querySelectorAll('[data-testid=toast-close]').forEach(b => b.click())")  # dismiss them
    page.wait_for_function("() => !document.querySelector('[data-testid=toast-body]')")

    # 1. Upload (drag-and-drop and the file picker both end in this input); the caption streams in.
    page.evaluate(RECORD_CAPTIONS)
    page.set_input_files("#photo input[type=file]", str(PHOTO))
    page.wait_for_function("() => document.querySelector('#step-info').innerText.includes('Step 1 of')")
    want = default_steps(model, PHOTO)
    final = want[-1]
    assert caption_value(page) == final.text
    seen = [v for v in page.evaluate("window.__captions") if v]
    assert len(set(seen)) >= 2, seen  # at least one partial caption before the final one
    assert seen[-1] == final.text
    texts = iter(s.text for s in want)  # what the box showed is a subsequence of the core's streamed texts
    assert all(v in texts for v in seen), "\n".join(["seen:", *seen, "core:", *[s.text for s in want]])
    history = page.locator("#history").inner_text()
    for word in {model.vocab.itos[t] for t in final.tokens} - {"<EOS>"}:
        assert word in history

    # 2. The inspector: the confidence-coloured caption, then step 2 via "Next".
    assert "".join(page.locator("#confidence").inner_text().split()).endswith("".join(final.text.split()))
    page.click("#next-step")
    page.wait_for_function("() => document.querySelector('#step-info').innerText.includes('Step 2 of')")
    steps = [s for s in stream(model, str(PHOTO), strategy="greedy", prefix=list(final.tokens), max_len=len(final.tokens))]
    assert page.locator("#prefix textarea, #prefix input").first.input_value() == steps[0].text
    info = page.locator("#step-info").inner_text()
    assert f"{steps[1].eos_prob:.1%}" in info and steps[1].word in info
    alternatives = page.locator("#step-alternatives").inner_text()
    assert all(a.word in alternatives for a in steps[1].alternatives)

    # 3. Branch: pick another word for step 2 and re-decode from there.
    labels = page.locator("#branch label")
    assert labels.count() == len(steps[1].alternatives)
    choice = next(i for i in range(labels.count())
                  if labels.nth(i).locator("input").get_attribute("value") not in (str(steps[1].token), str(model.vocab.eos_id)))
    token = int(labels.nth(choice).locator("input").get_attribute("value"))
    labels.nth(choice).click()
    if real:  # the finished caption, inspected at step 2 with another word picked
        page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
    before = caption_value(page)
    page.click("#redecode-btn")
    page.wait_for_function("() => document.querySelector('#step-info').innerText.includes('Branched')")
    branched = default_steps(model, PHOTO, prefix=[final.tokens[0], token])[-1]
    after = caption_value(page)
    assert after == branched.text and after != before
    assert page.locator("#step-info").inner_text().startswith("Step 2 of")
    assert model.vocab.itos[token] in page.locator("#step-info").inner_text()
    assert "".join(page.locator("#confidence").inner_text().split()).endswith("".join(after.split()))

    # 4. An example from the gallery captions too.
    page.locator(f"button.gallery-item:has(img[src*='{SECOND_PHOTO.name}'])").click()
    expected = default_steps(model, SECOND_PHOTO)[-1].text
    page.wait_for_function("t => document.querySelector('#caption textarea').value === t", arg=expected)
    assert not errors, errors
    page.close()
