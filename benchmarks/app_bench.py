"""Section 4: the Gradio app as a user meets it: `python app.py` cold start to the first served page, server
memory, and click-to-first-word / click-to-full-caption through gradio_client on the /caption endpoint.

Only loopback traffic: the server listens on 127.0.0.1 on a free port; every loop is bounded.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .common import ROOT, Settings, log

START_TIMEOUT_S = 180
CAPTION_TIMEOUT_S = 120


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _rss_mb(pid: int) -> tuple[float, float, float | None]:
    """(server RSS, RSS of the server and its children, USS: memory only the server holds) in MB.

    RSS counts the pages of shared libraries the server has touched: with PyPI's Linux torch (a CUDA build)
    that is hundreds of MB of libtorch_cuda & co. that a CPU-only torch (macOS, Windows, the CPU index) lacks.
    """
    import psutil

    p = psutil.Process(pid)
    own = p.memory_info().rss
    total = own + sum(c.memory_info().rss for c in p.children(recursive=True) if c.is_running())
    try:
        uss = round(p.memory_full_info().uss / 2**20, 1)
    except (psutil.AccessDenied, AttributeError):
        uss = None
    return round(own / 2**20, 1), round(total / 2**20, 1), uss


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (started with start_new_session)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=15)


def run(s: Settings, model_dir: str | None, images: list[str], *, threads: int | None = None, app: Path = ROOT / "app.py",
        precision: str | None = None) -> dict:
    if not app.exists():
        return {"skipped": f"{app.relative_to(ROOT)} does not exist yet"}
    try:
        import psutil  # noqa: F401
        from gradio_client import Client, handle_file
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (pip install -r benchmarks/requirements.txt)"}

    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if model_dir:
        env["CAPTIONER_MODEL"] = str(model_dir)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"captioner-bench-app-{port}.log"
    out = open(log_path, "w")
    cmd = [sys.executable, str(app)] + (["--threads", str(threads)] if threads else []) + (["--precision", precision] if precision else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    result: dict = {"command": " ".join(["python", "app.py", *cmd[2:]]), "url": url, "log": str(log_path)}
    try:
        status = None
        while time.perf_counter() - t0 < START_TIMEOUT_S and proc.poll() is None:
            status = _get(url)
            if status == 200:
                break
            time.sleep(0.05)
        if status != 200:
            tail = log_path.read_text()[-1500:]
            why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"no HTTP 200 on / within {START_TIMEOUT_S} s"
            return {**result, "skipped": f"app.py {why}; log tail: {tail}"}
        result["cold_start_s"] = round(time.perf_counter() - t0, 2)
        result["rss_after_load_mb"], result["rss_after_load_with_children_mb"], result["uss_after_load_mb"] = _rss_mb(proc.pid)

        client = Client(url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict") or {}
        endpoints = set(api.get("named_endpoints", {}))
        if "/caption" not in endpoints:
            return {**result, "skipped": f"app.py serves no /caption endpoint yet (has: {sorted(endpoints) or 'none'})"}

        def click(path: str) -> tuple[float, float, int, str]:
            """(seconds to the first streamed output, seconds to the last, outputs streamed, final caption)."""
            c0 = time.perf_counter()
            job = client.submit(handle_file(path), api_name="/caption")
            first = None
            n = 0
            last = None
            for out_ in job:
                if first is None:
                    first = time.perf_counter() - c0
                n += 1
                last = out_
                if time.perf_counter() - c0 > CAPTION_TIMEOUT_S:
                    job.cancel()
                    break
            total = time.perf_counter() - c0
            text = last[0] if isinstance(last, (list, tuple)) and last else last
            return (first if first is not None else total), total, n, str(text)[:80]

        # consecutive clicks use different images: the app caches the last image's encoder output per session
        cycle = images if len(images) > 1 else images * 2
        click(cycle[-1])  # warm-up (first request: queue start-up, first torch calls)
        firsts, totals, streamed, texts = [], [], [], []
        for i in range(s.app_clicks):
            f, t, n, text = click(cycle[i % len(cycle)])
            firsts.append(f)
            totals.append(t)
            streamed.append(n)
            texts.append(text)
        result["click_to_first_word_ms"] = round(statistics.median(firsts) * 1e3, 1)
        result["click_to_full_caption_ms"] = round(statistics.median(totals) * 1e3, 1)
        result["streamed_outputs_per_caption"] = statistics.median(streamed)
        result["example_caption"] = texts[0]
        result["clicks"] = s.app_clicks
        result["rss_after_warmup_mb"], _, result["uss_after_warmup_mb"] = _rss_mb(proc.pid)

        # memory over many captions, a few at a time (the app decodes up to 4 requests at once)
        done = 0
        t_many = time.perf_counter()
        half = s.app_captions // 2
        while done < s.app_captions:
            if done >= half and "rss_midway_mb" not in result:  # growth after this point is what a leak looks like
                result["rss_midway_mb"], _, result["uss_midway_mb"] = _rss_mb(proc.pid)
                result["captions_midway"] = done
            jobs = [client.submit(handle_file(cycle[(done + k) % len(cycle)]), api_name="/caption") for k in range(min(4, s.app_captions - done))]
            for j in jobs:
                j.result(timeout=CAPTION_TIMEOUT_S)
            done += len(jobs)
        result["captions_for_memory"] = done
        result["captions_per_s_4_at_once"] = round(done / (time.perf_counter() - t_many), 2)
        result["rss_after_many_mb"], result["rss_after_many_with_children_mb"], result["uss_after_many_mb"] = _rss_mb(proc.pid)
        result["rss_growth_mb"] = round(result["rss_after_many_mb"] - result["rss_after_warmup_mb"], 1)
        result["rss_growth_second_half_mb"] = round(result["rss_after_many_mb"] - result.get("rss_midway_mb", result["rss_after_warmup_mb"]), 1)
        log(f"  app: {done} captions done")
        return result
    except Exception as e:  # the app is being written: report, never crash the whole benchmark
        return {**result, "skipped": f"app benchmark failed: {type(e).__name__}: {e}"[:500]}
    finally:
        _stop(proc)
        out.close()
