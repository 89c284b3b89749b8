"""Refresh the README's screenshots of the app, on purpose (the tests never write into the repository).

    python scripts/screenshots.py [--out-dir assets] [--only desktop|phone]

Serves the app in this process with the real model ($CAPTIONER_MODEL, else the bundled captioner/default_model/),
opens it in Debian's chromium (/usr/bin/chromium) through Playwright, uploads examples/cat.jpg, waits for the
caption, and saves:
  desktop: screenshot.png, 1400 px wide, the whole page, inspecting step 3 (with the bundled model and the app's
           guided default: "cat") with another word picked to branch on (with what the CNN sees beside the caption
           for a model with an ImageNet head, and, for a model that attends, step 3's attention heatmap);
  phone:   screenshot-phone.png, 390 x 844, the screen as a phone shows it once the caption is done (the photo,
           the caption right under it, what the CNN sees, and this step's words);
and, for the bundled model, made_with.json: the sha256 of the weights they show (the README's caption table is
refreshed with them by hand, from `python -m captioner`).
Run it through `bash scripts/screenshots.sh`, which sets up the dev requirements first.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # captioner, and tests/tiny.py's serve_demo

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CHROMIUM = "/usr/bin/chromium"
PHOTO = ROOT / "examples" / "cat.jpg"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT = 90_000  # ms: a shared 2-core machine can be slow to start a browser and render Gradio
VIEWPORTS = {"desktop": ({"width": 1400, "height": 1000}, "screenshot.png"),
             "phone": ({"width": 390, "height": 844}, "screenshot-phone.png")}


def captioned_page(browser, url: str, viewport: dict, **context_kw):
    """A page of the app with PHOTO uploaded and its caption finished."""
    page = browser.new_page(viewport=viewport, **context_kw)
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#photo input[type=file]", state="attached")
    page.set_input_files("#photo input[type=file]", str(PHOTO))
    page.wait_for_function("() => document.querySelector('#step-info').innerText.includes('Step 1 of')")
    if page.locator("#cnn-labels").is_visible():
        page.wait_for_function("() => document.querySelector('#cnn-labels').innerText.includes('The CNN sees')")
    return page


def desktop(browser, url: str, path: Path) -> None:
    page = captioned_page(browser, url, VIEWPORTS["desktop"][0])
    old = page.eval_on_selector("#heatmap img", "i => i.src") if page.locator("#heatmap img").count() else None
    for step in (2, 3):
        page.click("#next-step")
        page.wait_for_function(f"() => document.querySelector('#step-info').innerText.includes('Step {step} of')")
    if old is not None:  # a model that attends: step 3's heatmap, loaded
        page.wait_for_function("s => { const i = document.querySelector('#heatmap img'); return i && i.src !== s && i.complete; }",
                               arg=old)
    labels = page.locator("#branch label")
    if labels.count() > 1:
        labels.nth(1).click()  # the runner-up word: what branching offers
    page.screenshot(path=str(path), full_page=True)
    page.close()


def phone(browser, url: str, path: Path) -> None:
    page = captioned_page(browser, url, VIEWPORTS["phone"][0], device_scale_factor=2, is_mobile=True, has_touch=True)
    page.screenshot(path=str(path))  # the screen, not the whole page: what a phone shows first
    page.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "assets",
                        help="where to save the PNGs (default: assets/)")
    parser.add_argument("--only", choices=sorted(VIEWPORTS), help="one screenshot instead of both")
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 1

    from playwright.sync_api import sync_playwright

    from captioner.loading import load_model
    from tiny import serve_demo

    model = load_model()  # $CAPTIONER_MODEL, else the bundled default, as app.py does
    label = os.environ.get("CAPTIONER_MODEL") or "captioner/default_model (bundled)"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with serve_demo(model, label) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for name in [args.only] if args.only else sorted(VIEWPORTS):
                path = args.out_dir / VIEWPORTS[name][1]
                {"desktop": desktop, "phone": phone}[name](browser, url, path)
                print(f"saved {path}")
        finally:
            browser.close()
    if not os.environ.get("CAPTIONER_MODEL"):
        record_model(args.out_dir / "made_with.json")
    return 0


def record_model(path: Path) -> None:
    """Which weights the pictures (and the README's caption table, refreshed with them) were made with: the bundled
    model's sha256. tests/test_readme.py fails once the weights change without the pictures being made again."""
    import hashlib
    import json

    digest = hashlib.sha256((ROOT / "captioner" / "default_model" / "model.safetensors").read_bytes()).hexdigest()
    path.write_text(json.dumps({"model.safetensors sha256": digest,
                                "made with it": ["assets/screenshot.png", "assets/screenshot-phone.png", "assets/tree.png",
                                                 "README.md's table of captions"]}, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
