"""Files the app offers for download (a decode's JSON, a batch's CSV and JSON), written when asked for and pruned.

Gradio copies a returned file into its own cache, so these are temporary: each is kept DOWNLOAD_MAX_AGE seconds.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

DOWNLOADS = Path(tempfile.gettempdir()) / "captioner-downloads"  # files offered for download (Gradio copies them)
DOWNLOAD_MAX_AGE = 3600  # seconds a download file is kept here


def write_download(name: str, text: str) -> str:
    """Write `text` to a fresh temporary folder as `name` (the name the browser saves it under); returns the path.
    Gradio copies returned files into its own cache, so these are pruned after DOWNLOAD_MAX_AGE."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    for old in DOWNLOADS.iterdir():
        with contextlib.suppress(OSError):  # another request's pruning may remove it first
            if time.time() - old.stat().st_mtime > DOWNLOAD_MAX_AGE:
                shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=DOWNLOADS)) / name
    path.write_text(text, encoding="utf-8")
    return str(path)
