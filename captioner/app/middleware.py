"""What the served app accepts: the bounds every request is held to, whoever sends it (the page, an API client).

Settings (`settings_from`): the app's ranges of GenerationConfig.LIMITS, whole numbers where whole numbers are meant,
finite numbers only, each refusal a message naming the value. Photos (`read_upload`): an upload's bytes or a data:
URL held to the upload's byte limit before decoding. Requests: what the middleware below refuses before a handler
runs, request bodies over a size and uploads with too many files.

Gradio checks each uploaded file's size (`max_file_size`) but not a request's total, counts files only up to 1,000, and
reads an API call's JSON body (which may carry a base64 data: URL) whatever its size. `RequestLimits` is an ASGI
middleware on the app (launch(app_kwargs={"middleware": ...}), see ui.launch_options): a body whose Content-Length is
over the limit is refused with 413 before any of it is read; one that does not say (chunked) is counted as it arrives,
so the refusal comes while it streams, not after it is stored. Uploads it serves itself with Gradio's own multipart
parser, which counts the files, and leaves nothing of a refused, cut-off or stalled upload on disk.

Clients (`ClientLimits`): each session's and each address's share of the queue. Sessions (`SessionStates`): state
expires from its session's last request, and only served sessions count against the capacity.

CPU (`FairShare`): every request's model work (opening the photo, the encoder, each decoded word) runs in turns, a
few at a time, and a free turn goes to the request that has had the least CPU so far. Errors (`ServedBlocks`): every
failure reaches the client as a message, never as Gradio's `{"error": null}`.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import heapq
import itertools
import json
import math
import numbers
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from gradio.exceptions import InvalidPathError
from gradio.state_holder import StateHolder
from PIL import Image

from .generation import LIMITS, STRATEGIES, GenerationConfig

MAX_FILE_BYTES = 20 * 2**20  # one uploaded file (Gradio's "20mb" is MiB): also the limit of an API client's data: URL
MAX_UPLOAD_BYTES = 128 * 2**20  # one upload request in all (the browser sends a tab's files in one), refused as it streams
MAX_REQUEST_BYTES = 32 * 2**20  # any other request's body: an API call with a 20 MB photo as a base64 data: URL fits
REQUEST_PIXELS = 400_000_000  # pixels decoded for one request in all (each photo: preprocess.MAX_PIXELS at most)


class PhotoError(gr.Error):
    """A photo that cannot be captioned (not an image, damaged, too large): the page empties the photo box."""

    def __init__(self, message: str):
        super().__init__(message, title="Cannot caption this image", print_exception=False)


def read_upload(image) -> tuple[bytes | Image.Image, str]:
    """What the image input hands a handler -> (the file's bytes, or a PIL image; the name messages call it).

    The decoding events run with preprocess=False: Gradio passes the upload undecoded, as its FileData dict (plain
    gr.Image would open it with PIL first, and a text file named .jpg would fail there with an unhelpful error), or an
    API client's base64 data: URL; paths and PIL images (direct calls, tests) work too. The file is read once, here:
    its bytes are both hashed (the cache key) and decoded."""
    name = None
    if isinstance(image, dict):
        url = image.get("url") or ""
        if url.startswith("data:"):
            size = (len(url) - url.find(",") - 1) * 3 // 4  # what the base64 decodes to (within 2 bytes), before decoding it
            if size > MAX_FILE_BYTES:
                raise PhotoError(f"the image data sent is {size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB "
                                 "(as for an uploaded file)")
            try:
                return base64.b64decode(url.split(",", 1)[1]), "image"
            except (IndexError, ValueError):
                raise gr.Error("the image data sent could not be decoded; send a JPEG, PNG, WebP or GIF file", print_exception=False) from None
        name, image = image.get("orig_name"), image.get("path")
        if not image:
            raise PhotoError("the image sent has no uploaded file's path and no data: URL (other URLs are not fetched); send "
                             "an uploaded file's "
                             '{"path": ...} (POST /gradio_api/upload first) or {"url": "data:image/jpeg;base64,..."}')
    if isinstance(image, (str, os.PathLike)):
        name = os.path.basename(name or image)  # the file the user chose, not Gradio's temporary path
        try:
            return Path(image).read_bytes(), name
        except OSError as e:
            raise PhotoError(f"{name}: cannot read the uploaded file ({e.strerror}); upload it again") from None
    if not isinstance(image, (bytes, Image.Image)):
        raise PhotoError(f"the image sent is {shown(image)}; send an uploaded file's {{\"path\": ...}} or a data: URL")
    return image, "image"


def shown(value: Any, width: int = 24) -> str:
    """A value as an error message quotes it: short (a 5,000-digit number is named by its length, not printed)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (Python's 4,300-digit limit)
        text = "a number"
    if len(text) > width:
        return f"{text[:width - 8]}… ({len(text):,} characters)"
    return text


def whole_number(name: str, value: Any, expected: str) -> int:
    """An API or control value that must be a whole number: an int, a float with nothing after the point (sliders
    send 3.0) or such a string. 1.5, NaN, infinities, booleans and 5,000-digit numbers are a ValueError that names the
    value and says what is `expected`; nothing is rounded."""
    bad = ValueError(f"{name}={shown(value)}: expected {expected}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 30:
            raise bad
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            raise bad from None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise bad


def real_number(name: str, value: Any, expected: str) -> float:
    """An API or control value that must be a finite number (NaN and infinities are a ValueError, as bad values are)."""
    bad = ValueError(f"{name}={shown(value)}: expected {expected}")
    if isinstance(value, bool):
        raise bad
    try:
        number = float(value.strip() if isinstance(value, str) and len(value) <= 40 else value if not isinstance(value, str) else "x")
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(number):
        raise bad
    return number


def header_pixels(path) -> int:
    """A file's pixel count, read from its header without decoding it (0 when it is not an image: open_image says why)."""
    try:
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - anything unreadable is open_image's to name
        return 0


def settings_from(values: dict[str, Any], defaults: GenerationConfig) -> GenerationConfig:
    """The app's control values (any of them None or missing from an API client) -> `defaults` with them, within the
    app's limits (GenerationConfig.check_served: API events run with preprocess=False, so the sliders' ranges are
    never enforced by Gradio; this is where every request's settings are). Integer settings take whole numbers only
    (sliders send 3.0; 1.5 is an error, not rounded); a negative or empty seed means a new one each run."""
    out: dict[str, Any] = {}
    try:
        for name, value in values.items():
            if value is None or value == "":
                continue
            if name not in GenerationConfig.names():
                raise ValueError(f"unknown decoding setting {name!r}")
            kind = GenerationConfig.kind(name)
            expected = LIMITS[name].describe(kind is int, served=True) if name in LIMITS else "one of " + ", ".join(STRATEGIES)
            if kind is bool:
                out[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif kind is int:
                number = whole_number(name, value, expected)
                out[name] = None if name == "seed" and number < 0 else number
                if not (name == "max_len" and number == defaults.max_len):  # the model's own length is always allowed
                    GenerationConfig.check(name, out[name], served=True)  # the app's range named, before the library's
            elif kind is float:
                number = real_number(name, value, expected)
                out[name] = None if name == "guide_threshold" and number == 0 else number  # the slider's 0: calibrated
                if name in LIMITS:
                    GenerationConfig.check(name, out[name], served=True)
            else:
                out[name] = kind(value)
        return GenerationConfig.make(defaults, **out)
    except (TypeError, ValueError, OverflowError) as e:
        raise gr.Error(f"bad decoding setting: {e}", title="Bad decoding setting", print_exception=False) from None


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


def queue_full(scope) -> str | None:
    """Gradio's own "queue is full" answer, when it applies, given before the request's body is read (Gradio gives it
    after reading and parsing the body, which a flood makes slow): None while there is room."""
    app = scope.get("app")
    queue = getattr(app.get_blocks(), "_queue", None) if hasattr(app, "get_blocks") else None
    waiting = len(queue) if queue is not None else 0
    if queue is None or queue.max_size is None or waiting < queue.max_size:
        return None
    return f"Queue is full. Max size is {queue.max_size} and size is {waiting}."


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


# ----------------------------------------------------------------------------------------------------
# Memory


@functools.cache
def libc():
    """The C library, looked up once (ctypes.util.find_library runs `ldconfig -p` in a subprocess: 1.8 ms a call
    here), or None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory(collect: bool = False) -> bool:
    """Hand freed heap pages back to the system (glibc keeps them for reuse otherwise), after a `collect`ion when
    asked. Measured: after loading the bundled model at auto precision RSS fell from 933 to 895 MB; the app also calls
    it whenever its last request in progress ends (FairShare.request), as decodes of every size leave freed pages
    behind. False where the C library is not glibc."""
    import gc

    if collect:
        gc.collect()
    try:
        return bool(libc().malloc_trim(0))
    except AttributeError:  # no C library, or not glibc: no malloc_trim
        return False


# ----------------------------------------------------------------------------------------------------
# CPU turns


class Job:
    """One request's share of the CPU so far: the seconds its turns took."""

    __slots__ = ("used",)

    def __init__(self):
        self.used = 0.0


class FairShare:
    """At most `slots` requests run model code at once; a freed turn goes to the waiting request that has used the
    least CPU so far (least attained service). A turn is one unit of work: opening and encoding a photo, or one
    decoded word. So a normal caption that arrives behind long ones (beam 10, 60 words, sampling at any temperature)
    runs its few turns between theirs instead of waiting for them to end, and the long ones still finish. Requests
    pace their streamed words (the app's word delay) outside their turns, so a sleeping stream holds no CPU turn.

    Gradio's own concurrency limit (ui.CONCURRENCY) bounds how many requests are in progress; this bounds how many
    compute, which is what the cores can serve."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots={slots!r}: expected at least 1")
        self.slots = slots
        self._free = slots
        self._waiting: list[tuple[float, int]] = []  # heap of (CPU used, arrival): the first gets the next turn
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._requests = 0  # requests in progress (`request`)

    @contextlib.contextmanager
    def request(self) -> Iterator[Job]:
        """One request in progress -> its Job (its CPU account). When the last request in progress ends, the server
        is quiet and freed heap pages go back to the system (release_freed_memory: 1.3 ms after a guided caption with
        the bundled model). Only then: with a trim after every request (each also looking libc up in a subprocess,
        since cached), a normal caption beside 6 hostile ones took 1.86-1.97x its time alone in benchmarks.serving,
        1.70-1.71x with no trimming."""
        with self._cond:
            self._requests += 1
        try:
            yield Job()
        finally:
            with self._cond:
                self._requests -= 1
                quiet = not self._requests
            if quiet:
                release_freed_memory()

    @contextlib.contextmanager
    def turn(self, job: Job) -> Iterator[None]:
        me = (job.used, next(self._order))
        with self._cond:
            heapq.heappush(self._waiting, me)
            while not (self._free and self._waiting[0] == me):
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._free -= 1
            if self._free and self._waiting:  # another slot is free too: the next in line may take it
                self._cond.notify_all()
        start = time.perf_counter()
        try:
            yield
        finally:
            job.used += time.perf_counter() - start
            with self._cond:
                self._free += 1
                self._cond.notify_all()

    def steps(self, job: Job, iterator) -> Iterator:
        """The items of `iterator`, each computed in a turn of `job` (and the wait between them outside any turn)."""
        iterator = iter(iterator)
        while True:
            with self.turn(job):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item


_END = object()


# ----------------------------------------------------------------------------------------------------
# Errors


def remote_path(value: Any, depth: int = 0) -> str | None:
    """The first file of an API call's inputs (FileData dicts, in lists for several files) whose "path" is a URL
    (http://, https://, ...), or None. A data: URL is not one: read_upload decodes it within its limit."""
    if depth > 4:
        return None
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", path):
            return path
        return None
    if isinstance(value, (list, tuple)):
        return next((url for v in value if (url := remote_path(v, depth + 1))), None)
    return None


# ----------------------------------------------------------------------------------------------------
# Session state


class SessionStates(StateHolder):
    """Gradio's per-session store (launch(state_session_capacity=...) and gr.State(time_to_live=...)), kept so that
    state lives while it is used:
    - a session's states expire `time_to_live` after the session's last request, not after they were last written
      (a user stepping through the inspector reads them without writing them);
    - only sessions that hold state (were served) count against the capacity; when there are more, the least recently
      used goes. Sessions that hold none (a refused request creates one, and so does a new session's first request
      while it runs) are kept apart, up to UNSERVED times as many (more than the queue holds at once: a first request
      in progress keeps its session), the oldest dropped first, so a burst of refused requests from new session ids
      evicts no one's caption."""

    UNSERVED = 4  # sessions holding no state kept, per session of the capacity (a few kB of component settings each)

    def __getitem__(self, session_id: str):
        session = super().__getitem__(session_id)
        now = datetime.datetime.now()
        for key, (ttl, _) in list(session._state_ttl.items()):
            session._state_ttl[key] = (ttl, now)
        return session

    @staticmethod
    def holds_state(session) -> bool:
        return any(session.state_data.get(key) is not None for key in session._state_ttl)

    def update(self, session_id: str):
        with self.lock:
            if session_id in self.session_data:
                self.session_data.move_to_end(session_id)
            if len(self.session_data) <= self.capacity:
                return
            held = {sid for sid, session in self.session_data.items() if self.holds_state(session)}
            served = [sid for sid in self.session_data if sid in held]  # least recently used first
            unserved = [sid for sid in self.session_data if sid not in held]
            for group, keep in ((served, self.capacity), (unserved, self.UNSERVED * self.capacity)):
                for evicted in group[: max(0, len(group) - keep)]:  # the least recently used first
                    self.session_data.pop(evicted, None)
                    self.time_last_used.pop(evicted, None)


# ----------------------------------------------------------------------------------------------------
# Fair between clients


def client_address(request) -> str | None:
    """The address a request came from: behind a proxy, the first X-Forwarded-For address (what the proxy was
    asked by), else the connection's."""
    if request is None:
        return None
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return forwarded or (request.client.host if request.client else None)


class ClientLimits:
    """How many of one client's requests the queue holds at once, in progress and waiting, counted over the events of
    the concurrency `groups` that run the model: `per_session` for one session (a page, a gradio_client Client, the
    session_hash of a /call), `per_address` for all sessions from one address (generous: many people may share one
    behind a proxy or a school's NAT). A request past either is refused at once, before it is queued, so a client
    that sends 80 long requests holds `per_session` places and every other user still finds the queue open."""

    def __init__(self, per_session: int, per_address: int, groups: set[str]):
        if per_session < 1 or per_address < per_session:
            raise ValueError(f"per_session={per_session!r}, per_address={per_address!r}: expected 1 <= per_session <= per_address")
        self.per_session, self.per_address, self.groups = per_session, per_address, set(groups)

    def refusal(self, events, fn, session: str | None, address: str | None) -> str | None:
        """Why a new event of `fn` from this session and address is refused, given the `events` held now (None: it is
        not)."""
        if fn is None or fn.concurrency_id not in self.groups:
            return None
        held = [e for e in events if e.fn.concurrency_id in self.groups]
        if session and sum(e.session_hash == session for e in held) >= self.per_session:
            return (f"Too many requests from this session: {self.per_session} at a time (in progress and waiting); wait "
                    "for one to finish, then send the next")
        if address and sum(client_address(e.request) == address for e in held) >= self.per_address:
            return (f"Too many requests from this address: {self.per_address} at a time (in progress and waiting); wait "
                    "for some to finish")
        return None

    def install(self, queue) -> None:
        """Check every event the `queue` (Gradio's) is asked to take; a refusal is answered 503 with its message,
        as "queue is full" is."""
        push = queue.push

        async def limited_push(body, request, username):
            # The app's own event (not the session's copy, which Gradio would create a session to look up)
            fn = queue.blocks.fns.get(body.fn_index) if isinstance(body.fn_index, int) else None
            if message := self.refusal(list(queue.event_ids_to_events.values()), fn, body.session_hash, client_address(request)):
                return False, message, "queue_full"
            return await push(body=body, request=request, username=username)

        queue.push = limited_push


class ServedBlocks(gr.Blocks):
    """gr.Blocks whose failures all reach an API client as a message. With show_error=False (the app's: no internal
    detail leaks to the page) Gradio sends the text of a gr.Error only, and `{"error": null}` for anything else, such
    as its own check that a call sent every input. Here:
    - settings left out at the end of an API call's `data` take their defaults (as the named /call/v2 route does);
    - a file path that was never uploaded, or any other exception, becomes a gr.Error that says what went wrong (the
      traceback is logged on the server)."""

    client_limits: ClientLimits | None = None  # set before .queue(): each client's share of the queue

    # Gradio's app creates a StateHolder and hands it to the Blocks (StateHolder.set_blocks); both use that one
    # object, so it is made a SessionStates where it is handed over (same fields, other rules), before any request.
    @property
    def state_holder(self):
        try:
            return self.__dict__["_state_holder"]
        except KeyError:
            raise AttributeError("state_holder") from None

    @state_holder.setter
    def state_holder(self, holder):
        if type(holder) is StateHolder:
            holder.__class__ = SessionStates
        self.__dict__["_state_holder"] = holder

    def queue(self, *args, **kwargs):
        out = super().queue(*args, **kwargs)
        if self.client_limits is not None:
            self.client_limits.install(self._queue)
        return out

    async def process_api(self, block_fn, inputs, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        if not kwargs.get("iterator") and inputs is not None and len(inputs) < len(fn.inputs):
            given = iter(inputs)  # what Gradio does for a call that sent every input but the states (skip_api)
            inputs = [None if getattr(block, "skip_api", False) else next(given, None) for block in fn.inputs]
        if inputs is not None and (url := remote_path(inputs)):
            # Gradio would fetch it (no size limit, and from wherever it points) before the handler runs: refused first.
            raise gr.Error(f"the image sent is the URL {shown(url, 40)}, which this app does not fetch; give the photo as a "
                           "file upload (POST /gradio_api/upload, then its {\"path\": ...}) or as a data: URL",
                           title="URL not fetched", print_exception=False)
        try:
            return await super().process_api(fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except InvalidPathError as e:
            raise gr.Error(f"{e} Upload the file first (POST /gradio_api/upload) and pass the path it returns, or send "
                           "the image as a data: URL.", title="File not uploaded", print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the one place that turns the unexpected into a message
            import traceback

            traceback.print_exc()
            name = f"/{fn.api_name}" if getattr(fn, "api_name", None) else "this request"
            if type(e).__name__ in ("ValidationError", "ComponentProcessingError"):  # Gradio's checks of an input's type
                raise gr.Error(f"{name}: a value sent is not of the kind this endpoint takes; the app's API page (\"Use via "
                               "API\" at its foot) gives each parameter's type", title="Bad request", print_exception=False) from None
            raise gr.Error(f"{name} failed on the server ({type(e).__name__}); check the values sent (the API page lists "
                           "them) and try again", title="Server error", print_exception=False) from None
