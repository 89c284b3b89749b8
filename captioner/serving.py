"""What the served app refuses before a handler runs: request bodies over a size, uploads with too many files.

Gradio checks each uploaded file's size (`max_file_size`) but not a request's total, counts files only up to 1,000, and
reads an API call's JSON body (which may carry a base64 data: URL) whatever its size. `RequestLimits` is an ASGI
middleware on the app (launch(app_kwargs={"middleware": ...}), see ui.launch_options): a body whose Content-Length is
over the limit is refused with 413 before any of it is read; one that does not say (chunked) is counted as it arrives,
and so are an upload's files (its multipart boundaries), so the refusal comes while it streams, not after it is stored.
"""
from __future__ import annotations

import re

try:  # Gradio's upload route turns this into a 413 (400 for too many files) and deletes what it stored so far
    from gradio.route_utils import MultiPartException as _UploadError
except ImportError:  # pragma: no cover - another Gradio: still refused, as a plain error
    _UploadError = Exception


class TooLarge(_UploadError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


class RequestLimits:
    def __init__(self, app, *, max_body: int, max_upload: int, max_files: int):
        self.app = app
        self.max_body, self.max_upload, self.max_files = max_body, max_upload, max_files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        upload = scope["path"].rstrip("/").endswith("/upload")
        limit = self.max_upload if upload else self.max_body
        what = "an upload request" if upload else "a request"
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > limit:
            return await self._refuse(send, f"{what} of {_mb(int(length))} is over this server's maximum allowed size of "
                                            f"{_mb(limit)}; send fewer or smaller files at a time")
        boundary = re.search(rb"boundary=\"?([^\";]+)", headers.get(b"content-type", b"")) if upload else None
        delim = b"--" + boundary.group(1) if boundary else None
        seen = parts = 0
        tail = b""

        async def counted():
            nonlocal seen, parts, tail
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen += len(body)
                if seen > limit:
                    raise TooLarge(f"{what} over this server's maximum allowed size of {_mb(limit)}; send fewer or "
                                   "smaller files at a time")
                if delim:
                    data = tail + body
                    parts += data.count(delim)
                    tail = data[-(len(delim) - 1):]
                    if parts > self.max_files + 1:  # the closing boundary is one more than the files
                        raise TooLarge(f"Too many files in one upload: at most {self.max_files} at a time")
            return message

        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched_send)
        except TooLarge as e:  # a route that did not handle it (not an upload): answer it here if nothing was sent yet
            if not started:
                await self._refuse(send, e.message)

    @staticmethod
    async def _refuse(send, message: str, status: int = 413):
        body = message.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
