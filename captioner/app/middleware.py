"""The request and upload middleware: what is refused before a handler runs, and answered as it streams.

Gradio checks each uploaded file's size (`max_file_size`) but not a request's total, counts files only up to 1,000, and
reads an API call's JSON body (which may carry a base64 data: URL) whatever its size. `RequestLimits` is an ASGI
middleware on the app (launch(app_kwargs={"middleware": ...}), see layout.launch_options): a body whose Content-Length
is over the limit is refused with 413 before any of it is read; one that does not say (chunked) is counted as it
arrives, so the refusal comes while it streams, not after it is stored. Uploads it serves itself with Gradio's own
multipart parser, which counts the files, and leaves nothing of a refused, cut-off or stalled upload on disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

from gradio.exceptions import InvalidPathError

from ..setting_values import shown
from .limits import queue_full

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


class Stalled(Exception):
    """A request body that sent nothing for the idle timeout (a half-open upload holding a descriptor and a file)."""


class RequestLimits:
    """The ASGI middleware (see the module's docstring). Uploads (POST .../upload) it serves itself, with Gradio's own
    multipart parser (the one that stores the files, so the file count is the parser's, whatever the boundary's
    spelling), and nothing a refused, cut-off or stalled upload stored is left on disk: the parser's temporary files
    are closed and deleted, and so are any files of the request already moved into place. A body that sends nothing
    for `idle_timeout` seconds is answered 408 and its connection closed."""

    def __init__(self, app, *, max_body: int, max_upload: int, max_files: int, idle_timeout: float = 30.0):
        self.app = app
        self.max_body, self.max_upload, self.max_files = max_body, max_upload, max_files
        self.idle_timeout = idle_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope["path"].rstrip("/")
        if (path.endswith("/queue/join") or "/call/" in path) and (full := queue_full(scope)):
            return await self._refuse(send, json.dumps({"detail": full}), 503, b"application/json")
        upload = path.endswith("/upload")
        limit = self.max_upload if upload else self.max_body
        what = "an upload request" if upload else "a request"
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > limit:
            return await self._refuse(send, f"{what} of {_mb(int(length))} is over this server's maximum allowed size of "
                                            f"{_mb(limit)}; send fewer or smaller files at a time")
        seen, whole = 0, False

        async def counted():
            nonlocal seen, whole
            if whole:  # the body is in: later calls wait for a disconnect, which may rightly take long
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except asyncio.TimeoutError:
                raise Stalled(f"nothing received for {self.idle_timeout:g} s") from None
            if message["type"] == "http.request":
                whole = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(f"{what} over this server's maximum allowed size of {_mb(limit)}; send fewer or "
                                   "smaller files at a time")
            return message

        app = scope.get("app")
        if upload and hasattr(app, "get_blocks") and not getattr(app.get_blocks(), "auth", None):  # with a login: Gradio's route
            return await self._upload(scope, counted, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched_send)
        except TooLarge as e:  # a route that did not handle it: answer it here if nothing was sent yet
            if not started:
                await self._refuse(send, e.message)
        except Stalled as e:
            log_line(f"request to {path} abandoned: {e}")
            if not started:
                await self._refuse(send, f"request timed out: {e}", 408)

    async def _upload(self, scope, receive, send):
        """POST /gradio_api/upload, as Gradio's route does it (the same parser, file names and places), except that
        the parser counts files to `max_files` and whatever goes wrong, nothing the request stored stays."""
        from gradio import routes, utils
        from gradio.route_utils import GradioMultiPartParser, MultiPartException
        from gradio.utils import DeveloperPath, UserProvidedPath
        from gradio_client import utils as client_utils
        from starlette.requests import ClientDisconnect, Request

        app = scope["app"]
        blocks = app.get_blocks()
        request = Request(scope, receive)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return await self._refuse(send, "an upload is a multipart/form-data request of files", 400)
        upload_id = request.query_params.get("upload_id") or None
        progress = routes.file_upload_statuses if upload_id else None
        if progress is not None:
            progress.track(upload_id)
        Path(app.uploaded_file_dir).mkdir(parents=True, exist_ok=True)
        parser = GradioMultiPartParser(request.headers, request.stream(), max_files=self.max_files, max_fields=self.max_files,
                                       upload_dir=app.uploaded_file_dir, upload_id=upload_id, upload_progress=progress,
                                       max_file_size=blocks.max_file_size if blocks.max_file_size is not None else math.inf)
        dests: list[str] = []  # where each file went, in the order sent (Gradio's answer)
        stored: list[str] = []  # those this request put there
        try:
            form = await parser.parse()
            for temp in form.getlist("files"):
                if not hasattr(temp, "sha"):
                    raise MultiPartException('each file is sent as a "files" part with a file name')
                name = client_utils.strip_invalid_filename_characters(Path(temp.filename).name) if temp.filename else \
                    f"tmp{os.urandom(5).hex()}"
                folder = Path(app.uploaded_file_dir) / temp.sha.hexdigest()
                try:
                    dest = utils.safe_join(DeveloperPath(str(folder)), UserProvidedPath(name))
                except InvalidPathError:
                    raise MultiPartException(f"Invalid file name: {shown(name, 40)}; rename the file and upload it again") from None
                folder.mkdir(exist_ok=True, parents=True)
                temp.file.close()
                if not os.path.exists(dest):  # an identical file already there (same bytes, same name) is not this request's
                    stored.append(dest)
                shutil.move(temp.file.name, dest)
                dests.append(str(dest))
            self._discard(parser, [])  # a file sent under another field name than "files": not kept
        except MultiPartException as e:
            self._discard(parser, stored)
            message = e.message
            if message.startswith("Too many files"):
                message = f"Too many files in one upload: at most {self.max_files} at a time"
            return await self._refuse(send, message, 413 if "maximum allowed size" in message else 400)
        except (ClientDisconnect, Stalled) as e:
            count = self._discard(parser, stored)
            log_line(f"upload abandoned ({'the client disconnected' if isinstance(e, ClientDisconnect) else e}); "
                     f"{count} partial file(s) deleted")
            if isinstance(e, Stalled):
                await self._refuse(send, f"upload timed out: {e}", 408)
            return None
        except BaseException:
            self._discard(parser, stored)
            raise
        finally:
            if progress is not None:
                progress.set_done(upload_id)
        blocks.upload_file_set.update(dests)
        body = json.dumps(dests).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _discard(parser, stored: list) -> int:
        """Close and delete the parser's temporary files and the files already put in place -> how many there were."""
        count = 0
        for file in getattr(parser, "_files_to_close_on_error", []):  # every temporary file the parser opened
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                os.unlink(file.name)
                count += 1
        for path in stored:
            with contextlib.suppress(OSError):
                os.unlink(path)
                count += 1
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))  # its folder, when nothing else is in it
        return count

    @staticmethod
    async def _refuse(send, message: str, status: int = 413, kind: bytes = b"text/plain; charset=utf-8"):
        body = message.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def log_line(message: str) -> None:
    """One line in the server's log (stderr), for what the server did about a client: never a traceback."""
    print(f"captioner: {message}", file=sys.stderr, flush=True)
