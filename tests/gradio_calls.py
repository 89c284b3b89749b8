"""What the served-app tests send: a photo as JPEG bytes or a data: URL, the /caption settings in order, and one
call through Gradio's queue (POST /gradio_api/call/<api>, then its event stream), as a browser's client makes it."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import psutil
from PIL import Image

# The /caption endpoint's inputs after the image, in order (layout.settings_controls).
CONTROLS = ["strategy", "beam_size", "max_len", "num_alternatives", "temperature", "top_k", "top_p", "seed", "guide_threshold"]


def settings(**values) -> list:
    return [values.get(name) for name in CONTROLS]


def jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def data_url(data: bytes) -> dict:
    return {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode(), "meta": {"_type": "gradio.FileData"}}


def call(url: str, api: str, data: list, session: str | None = None, timeout: float = 120) -> tuple[str, object]:
    """POST /gradio_api/call/<api> (as `session` when given), then read its event stream: ("complete", outputs),
    ("error", message) or ("refused", the HTTP status and text)."""
    with httpx.Client(timeout=timeout) as http:
        r = http.post(f"{url}gradio_api/call/{api}", json={"data": data, **({"session_hash": session} if session else {})})
        if r.status_code != 200:
            return "refused", f"{r.status_code} {r.text}"
        kind, payload = None, None
        with http.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}") as s:
            for line in s.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    payload = json.loads(line[6:])
                    if kind == "error":  # {"error": message, ...}; {"error": null} is what an unhandled exception gives
                        payload = payload.get("error") if isinstance(payload, dict) else payload
                    return kind, payload
    return str(kind), payload


def rss(proc) -> int:
    """A served process's resident memory in bytes."""
    return psutil.Process(proc.pid).memory_info().rss
