"""The recorded search (issue 34): what GenerationConfig.tree costs, and how fast the page redraws the largest search.

    python -m benchmarks.tree [--model SRC] [--quick] [--json PATH] [--no-browser] [--before REV]

1. Beam 3 and guided beam 3 on the example photos, with and without the tree, interleaved call by call (decoding
   from cached features, as the app re-decodes; 5 alternatives per step, the app's default). With --before REV,
   also captioner/decode.py as it was at git revision REV (before the tree: what "off" is compared with).
2. The app's largest search, guided beam 10 over 60 words on examples/cat.jpg (the served limits; two groups of 10;
   <EOS> masked so that the search runs all 60 steps): decoding with and without the tree, and drawing it
   (tree_view.render) at every step, the most the page does while the caption streams.
3. The page's update time for that search in Chromium (when /usr/bin/chromium and Playwright are there): each of the
   60 growing trees set into the tree's box as Gradio sets gr.HTML (innerHTML), with the app's style, timed until
   the next frame has been painted.
4. The served app (with Chromium): the app's largest search, guided beam 10 over 60 words on examples/cat.jpg (two
   groups), from the Caption click: the first tree drawn, the final tree drawn, how many times the tree was redrawn,
   and the page's longest task (main thread busy, as the browser's Long Tasks API reports it) while it streamed.
Markdown on stdout, progress on stderr. Times are medians; a shared machine makes them noisy, the ratios less so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from captioner.decode import SearchStep, encode, final, stream
from captioner.preprocess import open_image, to_tensor
from captioner.tree_view import render

from . import common
from .common import ROOT, Settings, log, machine_facts, md_table, measure, measure_interleaved
from .peers import _never_end

PHOTOS = ("examples/cat.jpg", "tests/data/cameraman.jpg", "examples/coffee.jpg", "tests/data/rocket.jpg")
CHROMIUM = "/usr/bin/chromium"


def decode_before(rev: str):
    """captioner/decode.py as it was at git revision `rev`, imported beside today's (same package, same model)."""
    import importlib.util
    import subprocess
    import tempfile

    text = subprocess.run(["git", "show", f"{rev}:captioner/decode.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    path = Path(tempfile.mkdtemp()) / "decode_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("captioner._decode_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def decoding_rows(model, s: Settings, before=None) -> list[dict]:
    feats = [encode(model, to_tensor(open_image(str(ROOT / p)), model.config)) for p in PHOTOS]
    rows = []
    for strategy in ("beam", "guided"):
        turn = {"i": 0}

        def variant(tree: bool | None):
            def call():
                f = feats[turn["i"] % len(feats)]
                if tree is None:  # the code before the tree (GenerationConfig's tree field is ignored there)
                    before.final(model, features=f, strategy=strategy, beam_size=3)
                else:
                    final(model, features=f, strategy=strategy, beam_size=3, tree=tree)
            return call

        def both():  # one photo per round, the same for every variant
            turn["i"] += 1

        fns = {"off": variant(False), "on": variant(True)}
        if before is not None:
            fns["before"] = variant(None)
        fns["_next"] = both  # last: every variant of a round decodes the same photo
        stats = measure_interleaved(fns, warmup=s.warmup, repeat=s.repeat * 2)
        off = stats["off"].median_ms
        rows.append({"what": f"{strategy} 3, one caption (features cached)", "off_ms": round(off, 2),
                     "on_ms": round(stats["on"].median_ms, 2), "ratio": round(stats["on"].median_ms / off, 3),
                     "n": stats["off"].n})
        if before is not None:
            b = stats["before"].median_ms
            rows.append({"what": f"{strategy} 3: the code before the tree (\"off\" column) against tree off (\"on\")",
                         "off_ms": round(b, 2), "on_ms": round(off, 2), "ratio": round(off / b, 3), "n": stats["before"].n})
    return rows


def largest(model, s: Settings) -> tuple[list[dict], list[str]]:
    """Guided beam 10 over 60 words: decoding with and without the tree, and drawing it step by step."""
    f = encode(model, to_tensor(open_image(str(ROOT / PHOTOS[0])), model.config))
    _never_end(model.decoder, model.vocab.eos_id)
    kw = dict(features=f, strategy="guided", beam_size=10, max_len=60)
    stats = measure_interleaved({"off": lambda: final(model, **kw), "on": lambda: final(model, **kw, tree=True)},
                                warmup=1, repeat=max(3, s.repeat // 4))
    records = list(stream(model, **kw, tree=True))
    nodes, frames = [], []
    for r in records:
        if isinstance(r, SearchStep):
            nodes.extend(r.nodes)
            frames.append(list(nodes))
    tree = records[-1].tree
    draws = measure(lambda: [render(fr, final=False) for fr in frames], warmup=1, repeat=max(3, s.repeat // 4))
    last = measure(lambda: render(tree), warmup=1, repeat=s.repeat)
    pages = [render(fr, final=False) for fr in frames] + [render(tree)]
    rows = [
        {"what": "guided 10 x 60 words, decoding", "off_ms": round(stats["off"].median_ms, 1),
         "on_ms": round(stats["on"].median_ms, 1), "ratio": round(stats["on"].median_ms / stats["off"].median_ms, 3),
         "n": stats["off"].n},
        {"what": f"guided 10 x 60 words: draw the final tree ({len(tree)} nodes, {len(pages[-1]) // 1024} KB of HTML)",
         "off_ms": None, "on_ms": round(last.median_ms, 1), "ratio": None, "n": last.n},
        {"what": f"guided 10 x 60 words: draw all {len(frames)} growing trees (the server's work while it streams; "
                 f"{sum(map(len, pages)) // 1024} KB in all)", "off_ms": None, "on_ms": round(draws.median_ms, 1),
         "ratio": None, "n": draws.n},
    ]
    return rows, pages


BROWSER_JS = """async (pages) => {
    const box = document.querySelector('#search-tree');
    const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    const times = [];
    for (const html of pages) {
        await frame();
        const t0 = performance.now();
        box.innerHTML = html;
        box.getBoundingClientRect();  // layout now
        await new Promise(r => requestAnimationFrame(r));  // and the frame that paints it
        times.push(performance.now() - t0);
    }
    return times;
}"""


def browser_rows(pages: list[str]) -> list[dict]:
    """Each growing tree set into the box (with the app's style), timed to the painted frame, at 1280 and 390 px."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return []
    if not os.path.exists(CHROMIUM):
        return []
    css = (ROOT / "captioner" / "static" / "tree.css").read_text()
    doc = f"<html><head><style>{css}</style></head><body><div id='search-tree'></div></body></html>"
    rows = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        for width in (1280, 390):
            page = b.new_page(viewport={"width": width, "height": 900})
            page.set_content(doc)
            page.evaluate(BROWSER_JS, pages[:5])  # warm-up
            times = page.evaluate(BROWSER_JS, pages)
            rows.append({"what": f"page update at {width} px, guided 10 x 60 (each step's tree, until painted)",
                         "off_ms": None, "on_ms": round(statistics.median(times), 1), "ratio": None, "n": len(times),
                         "max_ms": round(max(times), 1), "last_ms": round(times[-1], 1)})
            page.close()
        b.close()
    return rows


APP_JS = """() => {
    window.__tree = {draws: [], tasks: []};
    new MutationObserver(() => window.__tree.draws.push(performance.now()))
        .observe(document.querySelector('#search-tree'), {childList: true, subtree: true});
    new PerformanceObserver(list => list.getEntries().forEach(e => window.__tree.tasks.push(e.duration)))
        .observe({type: 'longtask', buffered: false});
}"""


def app_rows(model) -> list[dict]:
    """The served app's largest search (guided beam 10 x 60, <EOS> masked), as a user starts it, at 1280 px."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return []
    if not os.path.exists(CHROMIUM):
        return []
    import socket

    from captioner.app import build_demo, launch_options

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo(model, "benchmark")
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options())
    rows = []
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(180_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#photo input[type=file]", state="attached")
            page.click("#settings")  # the accordion: beam size and max length are its first two number boxes
            for i, value in ((0, "10"), (1, "60")):
                box = page.locator("#settings input[type=number]").nth(i)
                box.fill(value)
                box.press("Enter")
            page.evaluate(APP_JS)
            t0 = page.evaluate("performance.now()")
            page.set_input_files("#photo input[type=file]", str(ROOT / PHOTOS[0]))
            page.wait_for_selector("#search-tree g.s-chosen", state="attached")
            t1 = page.evaluate("performance.now()")
            got = page.evaluate("window.__tree")
            nodes = page.locator("#search-tree g[data-node]").count()
            steps = page.locator("#search-tree text.step").count()
            draws = got["draws"]
            rows.append({"what": f"app: guided beam 10 x {steps} words ({nodes} nodes), photo dropped to final tree drawn "
                                 f"(the caption paced 40 ms a word); the tree redrawn {len({round(d) for d in draws})} times",
                         "off_ms": None, "on_ms": round(t1 - t0, 1), "ratio": None, "n": 1,
                         "max_ms": round(max(got["tasks"], default=0.0), 1)})
            b.close()
    finally:
        demo.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tree", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--quick", action="store_true", help="a few repeats: checks that it runs")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--no-browser", action="store_true", help="skip the page's update time")
    p.add_argument("--before", default=None, metavar="REV", help="also time captioner/decode.py of this git revision")
    args = p.parse_args(argv)
    s = Settings.make(args.quick)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # the app's setting (ui.configure_torch)
    model, label = common.load_bench_model(args.model)
    facts = machine_facts()
    log("1. beam 3 / guided 3 with and without the tree")
    rows = decoding_rows(model, s, decode_before(args.before) if args.before else None)
    log("2. guided 10 x 60")
    more, pages = largest(model, s)
    rows += more
    if not args.no_browser:
        log("3. the page's update time")
        rows += browser_rows(pages)
        log("4. the served app's largest search")
        rows += app_rows(model)  # (largest() left its <EOS> masked: every search runs to max_len)
    print(f"# The search tree: what recording and drawing it cost\n\nmodel: {label} · torch threads "
          f"{torch.get_num_threads()} · load average (1 min) at start {facts.get('load_average_1m')} on "
          f"{facts.get('cores_available')} cores · {facts.get('cpu')}\n")
    print(md_table(["what", "tree off ms", "tree on ms", "on / off", "n", "max ms"],
                   [[r["what"], r["off_ms"], r["on_ms"], r["ratio"], r["n"], r.get("max_ms")] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": label, "machine": facts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
