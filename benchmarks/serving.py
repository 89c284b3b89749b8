"""The served app under hostile and heavy traffic (issue 24's targets), against `python app.py` on 127.0.0.1:

1. a normal caption's latency alone, and with 6 hostile requests in flight (the app's largest settings: beam 10 and
   60 words, sampling 60 words at temperature 5), medians of the same number of calls, and their ratio;
2. a flood of 100 clients at once: how long a refused request (queue full, 503) waits for its answer;
3. server RSS over 1,000 requests from 500 sessions (two captions each, each session with its own photo);
4. (issue 30) one client hogging the queue: a normal caption alone, then while one session sends 80 of the longest
   requests allowed (sampling at temperature 5: 60 words each) at once, and 80 more every 3 s: how many of the
   hog's were taken, how many of the normal user's were refused, and the normal caption's latency;
5. (issue 30) image modes the pixel limit did not see: one /caption of a flat 40 MP image of each mode (16-bit PNG,
   float TIFF, palette PNG with transparency, ...), and all of them in one /caption_files: the server's peak RSS
   growth for each (sampled every 20 ms).

    python -m benchmarks.serving [--model SRC] [--normal N] [--sessions N] [--skip hostile,flood,churn,hog,modes]

Only loopback traffic; every loop is bounded. Prints one markdown table; --json writes the figures.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .app_bench import _rss_mb, _stop, free_port
from .common import ROOT, log

HOSTILE = [dict(strategy="beam", beam_size=10, max_len=60), dict(strategy="sample", temperature=5.0, max_len=60, top_k=0, top_p=1.0),
           dict(strategy="guided", beam_size=10, max_len=60)]
CONTROLS = ["strategy", "beam_size", "max_len", "num_alternatives", "temperature", "top_k", "top_p", "seed", "guide_threshold"]


def photo(seed: int, size=(480, 360)) -> dict:
    """A JPEG as an API client sends one: a base64 data: URL (a photo of Flickr8k where the data is here)."""
    import numpy as np
    from PIL import Image

    flickr = ROOT.parent / "shared" / "data" / "flickr8k" / "Images"
    files = sorted(flickr.glob("*.jpg"))[:600] if flickr.is_dir() else []
    img = Image.open(files[seed % len(files)]).convert("RGB") if files else \
        Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return {"url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), "meta": {"_type": "gradio.FileData"}}


def call(http, url: str, data: list, session: str | None = None) -> tuple[str, float]:
    """One /caption call to the end of its stream -> ("complete" | "error" | "refused NNN", seconds)."""
    t = time.perf_counter()
    r = http.post(f"{url}gradio_api/call/caption", json={"data": data, **({"session_hash": session} if session else {})})
    if r.status_code != 200:
        return f"refused {r.status_code}", time.perf_counter() - t
    kind, _ = call_stream(http, url, r.json()["event_id"])
    return kind, time.perf_counter() - t


def settings(**values) -> list:
    return [values.get(n) for n in CONTROLS]


def start(model: str | None, threads: int) -> tuple:
    import subprocess

    from gradio_client import Client

    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("GRADIO_", "CAPTIONER_"))}
    argv = [sys.executable, "app.py", "--port", str(port), "--threads", str(threads), *(["--model", model] if model else [])]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("app.py did not start")
        try:
            Client(url, verbose=False)
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)


def hostile_latency(url: str, n: int) -> dict:
    import httpx

    normal = [photo(100 + i) for i in range(n)]
    with httpx.Client(timeout=600) as http:
        call(http, url, [normal[0], *settings()])  # warm
        alone = [call(http, url, [p, *settings()])[1] for p in normal]
        stop = threading.Event()
        hostile_done: list[float] = []

        def attacker(i: int):
            with httpx.Client(timeout=600) as h:
                j = 0
                while not stop.is_set():
                    kind, s = call(h, url, [photo(200 + i), *settings(**HOSTILE[(i + j) % len(HOSTILE)])])
                    hostile_done.append(s)
                    j += 1

        threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(3)  # all six in flight
        loaded = [call(http, url, [p, *settings()])[1] for p in normal]
        stop.set()
        for t in threads:
            t.join(timeout=600)
    a, b = statistics.median(alone), statistics.median(loaded)
    return {"alone_ms": round(a * 1000), "hostile_ms": round(b * 1000), "ratio": round(b / a, 2),
            "hostile_max_ms": round(max(loaded) * 1000), "hostile_requests_done": len(hostile_done),
            "hostile_median_s": round(statistics.median(hostile_done), 1) if hostile_done else None, "n": n}


def flood(url: str, clients: int = 100) -> dict:
    import httpx

    p = photo(300)
    barrier = threading.Barrier(clients)

    def one(i):
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            t = time.perf_counter()
            r = http.post(f"{url}gradio_api/call/caption", json={"data": [p, *settings()]})
            answered = time.perf_counter() - t
            if r.status_code != 200:
                return r.status_code, answered, None
            kind, total = call_stream(http, url, r.json()["event_id"])
            return 200, answered, total + answered

    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(clients)))
    refused = [a for code, a, _ in out if code != 200]
    served = [t for code, _, t in out if code == 200]
    accepted = [a for code, a, _ in out if code == 200]
    return {"clients": clients, "refused": len(refused), "accepted_median_ms": round(statistics.median(accepted) * 1000),
            "accepted_max_ms": round(max(accepted) * 1000), "refusal_median_ms": round(statistics.median(refused) * 1000) if refused else None,
            "refusal_max_ms": round(max(refused) * 1000) if refused else None, "served": len(served),
            "served_max_s": round(max(served), 1) if served else None}


def call_stream(http, url, event_id) -> tuple[str, float]:
    """Read an accepted call's event stream to its end -> ("complete" | "error" | ..., seconds)."""
    t = time.perf_counter()
    kind = "?"
    with http.stream("GET", f"{url}gradio_api/call/caption/{event_id}") as s:
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                if kind in ("complete", "error"):
                    break
    return kind, time.perf_counter() - t


HOG = dict(strategy="sample", temperature=5.0, max_len=60, top_k=0, top_p=1.0)  # 60 words every time: the longest request


def hog(url: str, n: int) -> dict:
    """A normal caption alone (median of n), then with one session sending 80 longest-allowed requests at once and
    keeping them coming: the normal user's requests (each its own session) timed, refusals counted."""
    import httpx

    normal = [photo(400 + i) for i in range(n)]
    with httpx.Client(timeout=600) as http:
        call(http, url, [normal[0], *settings()])  # warm
        alone = [call(http, url, [p, *settings()])[1] for p in normal]
        stop = threading.Event()
        taken, refused_hog = [0], [0]
        hog_body = {"data": [photo(500), *settings(**HOG)], "session_hash": "hog"}  # made once: the client's CPU goes to sending

        def send_hog():
            # 80 at once, and 80 more every 3 s; their streams are never read (a stream read to its end makes Gradio
            # drop the session's other events, so a hog that reads them would cancel itself)
            with httpx.Client(timeout=600) as h:
                while not stop.is_set():
                    for _ in range(80):
                        try:
                            ok = h.post(f"{url}gradio_api/call/caption", json=hog_body).status_code == 200
                        except httpx.HTTPError:  # the server stopped under it, after the measurement
                            return
                        taken[0] += ok
                        refused_hog[0] += not ok
                    stop.wait(3)

        threading.Thread(target=send_hog, daemon=True).start()
        time.sleep(3)  # the hog's requests in flight
        loaded, refused = [], 0
        for i, p in enumerate(normal):
            kind, s = call(http, url, [p, *settings()], session=f"normal{i}")
            if kind == "complete":
                loaded.append(s)
            else:
                refused += 1
        stop.set()
    a = statistics.median(alone)
    b = statistics.median(loaded) if loaded else None
    return {"alone_ms": round(a * 1000), "hog_ms": round(b * 1000) if b else None, "ratio": round(b / a, 2) if b else None,
            "normal_refused": refused, "normal_served": len(loaded), "hog_taken": taken[0], "hog_refused": refused_hog[0], "n": n}


# 40 MP (6,324 x 6,324) flat images: a few hundred kB each, 40 to 160 MB decoded, more once converted
MODE_FILES = ["16-bit PNG", "32-bit TIFF", "float TIFF", "palette PNG with transparency", "CMYK TIFF", "animated GIF",
              "RGBA PNG"]


def mode_file(kind: str, path: Path, size: tuple[int, int] = (6324, 6324)) -> Path:
    """A flat image of `kind` (16-bit PNG, float TIFF, CMYK JPEG, multi-page TIFF, ...): a few hundred kB on disk at
    40 MP, however much it takes decoded. tests/test_attack_served.py makes its files with it too."""
    from PIL import Image

    if kind == "16-bit PNG":
        Image.new("I;16", size, 40000).save(path, "PNG")
    elif kind == "32-bit TIFF":
        Image.new("I", size, 30000).save(path, "TIFF", compression="tiff_deflate")
    elif kind == "float TIFF":
        Image.new("F", size, 200.0).save(path, "TIFF", compression="tiff_deflate")
    elif kind == "palette PNG with transparency":
        img = Image.new("P", size, 3)
        img.putpalette([0, 0, 0] * 3 + [200, 0, 0] + [0, 0, 0] * 252)
        img.save(path, "PNG", transparency=3)
    elif kind in ("CMYK TIFF", "CMYK JPEG"):
        img = Image.new("CMYK", size, (0, 255, 255, 0))
        img.save(path, *(("TIFF",) if "TIFF" in kind else ("JPEG",)), **({"compression": "tiff_deflate"} if "TIFF" in kind else {}))
    elif kind in ("animated GIF", "multi-page TIFF"):
        frames = [Image.new("RGB", size, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
        extra = {"compression": "tiff_deflate"} if "TIFF" in kind else {}
        frames[0].save(path, "GIF" if "GIF" in kind else "TIFF", save_all=True, append_images=frames[1:], **extra)
    elif kind == "RGBA PNG":
        Image.new("RGBA", size, (0, 0, 255, 255)).save(path, "PNG")
    elif kind == "LA PNG":
        Image.new("LA", size, (100, 255)).save(path, "PNG")
    else:
        raise ValueError(f"kind={kind!r}")
    return path


def image_modes(url: str, pid: int) -> dict:
    """Peak RSS growth of the server (MB) during one /caption of each MODE_FILES image, and all in one /caption_files."""
    import tempfile

    from gradio_client import Client, handle_file

    def peak(fn) -> tuple[float, str]:
        before = _rss_mb(pid)[0]
        top = before
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(fn)
            while not job.done():
                top = max(top, _rss_mb(pid)[0])
                time.sleep(0.02)
            try:
                job.result()
                outcome = "captioned"
            except Exception as e:  # noqa: BLE001 - a refusal is an outcome to report
                outcome = f"error: {str(e)[:60]}"
        return round(top - before), outcome

    client = Client(url, verbose=False)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [mode_file(k, Path(tmp) / f"m{i}.{'png' if 'PNG' in k else 'tif' if 'TIFF' in k else 'gif'}")
                 for i, k in enumerate(MODE_FILES)]
        client.predict(handle_file(str(paths[-1])), api_name="/caption")  # warm: what one huge photo allocates anyway
        for kind, path in zip(MODE_FILES, paths):
            out[kind] = peak(lambda: client.predict(handle_file(str(path)), api_name="/caption"))
        out["all of them in one /caption_files"] = peak(lambda: client.predict([handle_file(str(p)) for p in paths],
                                                                                api_name="/caption_files"))
    return out


def churn(url: str, pid: int, sessions: int) -> dict:
    import httpx

    photos = [photo(i) for i in range(20)]
    marks = {}
    with httpx.Client(timeout=600) as http:
        for i in range(sessions):
            for _ in range(2):  # a caption, then the same photo again (the session's cached features)
                kind, _ = call(http, url, [photos[i % len(photos)], *settings()], session=f"bench{i}")
                assert kind == "complete", kind
            if i + 1 in (25, 50, sessions // 2, sessions):
                marks[2 * (i + 1)] = _rss_mb(pid)[0]
    return {"sessions": sessions, "requests": 2 * sessions, "rss_mb_after": marks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or Hub repo id (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=1, help="the app's torch threads (default 1: half this 2-core machine)")
    ap.add_argument("--normal", type=int, default=10, help="normal captions timed alone and under attack (default 10)")
    ap.add_argument("--sessions", type=int, default=500, help="sessions of the memory run (default 500: 1,000 requests)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: hostile, flood, churn, hog, modes")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict = {}
    proc, url = start(args.model, args.threads)
    try:
        results["rss_mb_start"] = _rss_mb(proc.pid)[0]
        if "hostile" not in skip:
            log("hostile: normal captions alone, then with 6 hostile requests in flight")
            results["hostile"] = hostile_latency(url, args.normal)
        if "flood" not in skip:
            log("flood: 100 clients at once")
            results["flood"] = flood(url)
        if "hog" not in skip:
            log("hog: normal captions alone, then while one session sends 80 longest-allowed requests")
            results["hog"] = hog(url, args.normal)
        if "modes" not in skip:
            log("modes: one /caption of a 40 MP image of each mode")
            results["modes"] = image_modes(url, proc.pid)
        if "churn" not in skip:
            log(f"churn: {2 * args.sessions} requests from {args.sessions} sessions")
            results["churn"] = churn(url, proc.pid, args.sessions)
    finally:
        _stop(proc)
    rows = []
    if h := results.get("hostile"):
        rows += [["normal caption alone (median ms)", h["alone_ms"], ""],
                 ["normal caption, 6 hostile requests in flight (median ms)", h["hostile_ms"], f"max {h['hostile_max_ms']} ms"],
                 ["ratio (target ≤ 2)", h["ratio"], f"{h['hostile_requests_done']} hostile requests done meanwhile, median {h['hostile_median_s']} s"]]
    if f := results.get("flood"):
        rows += [[f"flood of {f['clients']}: refused, median / max answer (ms) (target ≤ 1000)",
                  f"{f['refusal_median_ms']} / {f['refusal_max_ms']}", f"{f['refused']} refused, {f['served']} served (last after {f['served_max_s']} s); "
                  "accepted: answered in "
                  f"{f['accepted_median_ms']} / {f['accepted_max_ms']} ms"]]
    if g := results.get("hog"):
        rows += [["one-client hog: normal caption alone (median ms)", g["alone_ms"], ""],
                 ["one-client hog: normal caption while one session sends 80 longest-allowed requests (median ms)",
                  g["hog_ms"], f"ratio {g['ratio']} (target ≤ 2); normal user refused {g['normal_refused']} of {g['n']}; "
                               f"the hog's requests taken {g['hog_taken']}, refused {g['hog_refused']}"]]
    if m := results.get("modes"):
        rows += [[f"40 MP {kind}: peak server RSS growth (MB)", mb, outcome + (" (target ≤ 300)" if kind == MODE_FILES[0] else "")]
                 for kind, (mb, outcome) in m.items()]
    if c := results.get("churn"):
        rows += [[f"server RSS after {n} requests (MB)", mb, "target ≤ 800 after 1,000" if n == c["requests"] else ""]
                 for n, mb in c["rss_mb_after"].items()]
    print("| measure | value | note |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(f"\nserver RSS at start: {results['rss_mb_start']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
