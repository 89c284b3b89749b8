"""What the served app holds a request to, whoever sends it (the page, an API client): sizes, counts, shares.

Photos (`read_upload`): an upload's bytes or a data: URL held to the upload's byte limit before decoding; a request's
photos in all to REQUEST_PIXELS (`header_pixels`, read before decoding). Requests: the bodies and uploads that the
middleware (middleware.RequestLimits) refuses before a handler runs, and the queue (`queue_full`). Clients
(`ClientLimits`): each session's and each address's share of the queue. Sessions: how many the server keeps and for
how long (session.SessionStates). Decoding settings are held to GenerationConfig.LIMITS' served bounds by
captioner.setting_values.

The app reads these as attributes of this module when it is built (layout.build_demo, layout.launch_options), so a
test may change one for the app it builds next.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

from PIL import Image

from ..setting_values import shown
from .errors import PhotoError, user_error

MAX_FILE_BYTES = 20 * 2**20  # one uploaded file (Gradio's "20mb" is MiB): also the limit of an API client's data: URL
MAX_UPLOAD_BYTES = 128 * 2**20  # one upload request in all (the browser sends a tab's files in one), refused as it streams
MAX_REQUEST_BYTES = 32 * 2**20  # any other request's body: an API call with a 20 MB photo as a base64 data: URL fits
REQUEST_PIXELS = 400_000_000  # pixels decoded for one request in all (each photo: preprocess.MAX_PIXELS at most)
# Decoding requests in progress at once (one concurrency group for every decoding event). Their model work runs in
# CPU turns (turns.FairShare: cores / torch threads at once, the least served first), and a streamed caption waits
# between words outside its turn, so this can be well above the cores: a normal caption is never queued behind a few
# long ones. Each request in progress holds one photo's features (a few hundred kB) and a worker thread.
CONCURRENCY = 16
MAX_QUEUE = 64  # requests waiting beyond that are refused with "queue is full"
# One client's share of those (ClientLimits), in progress and waiting together: a session (a page, a gradio_client
# Client, a /call's session_hash) holds at most PER_SESSION decoding requests, and one address at most PER_ADDRESS
# (generous: many people can share one address behind a proxy; 64 clients on one machine are all served).
PER_SESSION = 4
PER_ADDRESS = 64
MAX_FILE_SIZE = "20mb"  # uploads above this are refused before they reach a handler
MAX_FILES = 64  # photos per request of the "Several photos" tab
UPLOAD_IDLE_TIMEOUT = 30.0  # seconds a request body may send nothing before it is answered 408 and closed
SESSIONS = 48  # served sessions whose state the server keeps (about 0.5 MB each with the bundled model); the least recently used goes first
STATE_TTL = 1800  # seconds a session's photo and decode are kept after its last request (session.SessionStates)


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
                raise user_error("the image data sent could not be decoded; send a JPEG, PNG, WebP or GIF file") from None
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


def header_pixels(path) -> int:
    """A file's pixel count, read from its header without decoding it (0 when it is not an image: open_image says why)."""
    try:
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - anything unreadable is open_image's to name
        return 0


def queue_full(scope) -> str | None:
    """Gradio's own "queue is full" answer, when it applies, given before the request's body is read (Gradio gives it
    after reading and parsing the body, which a flood makes slow): None while there is room."""
    app = scope.get("app")
    queue = getattr(app.get_blocks(), "_queue", None) if hasattr(app, "get_blocks") else None
    waiting = len(queue) if queue is not None else 0
    if queue is None or queue.max_size is None or waiting < queue.max_size:
        return None
    return f"Queue is full. Max size is {queue.max_size} and size is {waiting}."




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

