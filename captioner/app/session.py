"""What a browser session holds, and for how long.

Everything per user lives in two gr.State values of that user's session: an ImageCache (the last photo's encoder
output, so re-decoding with other settings or branching never re-runs the CNN) and the finished Decoding (decode's own
Step records) that the inspector reads. `SessionStates` is the server's store of those states: a session's state
expires limits.STATE_TTL after its last request, and only sessions that were served count against limits.SESSIONS.
"""
from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field

from gradio.state_holder import StateHolder
from PIL import Image

from ..confidence import Assessment
from ..decode import Step
from ..generation import GenerationConfig
from ..imagenet import Constraint, constraint_for
from ..model import ImageFeatures

PHOTO_MAX_SIDE = 512  # the photo a session keeps for the inspector's heatmap is at most this many pixels a side



@dataclass(frozen=True)
class Photo:
    """The photo a session keeps for its heatmaps, stored as a JPEG (quality 90): about a tenth of its pixels' size,
    and the server keeps up to limits.SESSIONS of them. Decoded (a few ms) when a heatmap is drawn."""

    data: bytes
    size: tuple[int, int]

    @classmethod
    def of(cls, img: Image.Image) -> "Photo":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        return cls(buf.getvalue(), img.size)

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.data)) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class ImageCache:
    """A session's encoded photo (its gr.State "cache"): the last photo's encoder output and what is worked out from
    it once, so re-decoding with other settings or branching never re-runs the CNN."""

    key: str  # sha256 of the image's bytes (or pixels)
    features: ImageFeatures  # batch of 1
    # "The CNN sees": the ImageNet head's top classes (name, probability), likeliest first; None without that head.
    cnn_sees: tuple[tuple[str, float], ...] | None = None
    # The photo as the encoder saw it, at most PHOTO_MAX_SIDE a side: the heatmaps' base (None: nothing attends).
    photo: Photo | None = None
    constraints: dict = field(default_factory=dict, compare=False)  # guide_threshold -> guided decoding's Constraint
    rule: str | None = None  # familiarity.degenerate's reason for an image with nothing to caption ("only 1×1 pixels")

    def constraint(self, vocab, threshold: float | None, expected: dict[str, float] | None = None) -> Constraint:
        """Guided decoding's requirement for this image (`expected`: the model's word probe on it, the same for every
        call): it depends on nothing else, so it is worked out once."""
        if threshold not in self.constraints:
            self.constraints[threshold] = constraint_for(self.features, vocab, threshold, expected)
        return self.constraints[threshold]


@dataclass(frozen=True)
class Decoding:
    """A finished decode: the final caption's records, and how it was made."""

    steps: tuple[Step, ...]  # one record per word of the final caption
    stop: str  # "eos", "unk" or "max_len" (Step.stop)
    settings: GenerationConfig
    prefix: tuple[int, ...]  # forced first words (a branch), else ()
    focus: int  # the selected step after the decode (0-based): the first, or where a branch was made
    image_key: str  # ImageCache.key of the image it describes
    photo: Photo | None = None  # ImageCache.photo of that image: the heatmaps' base (same object, not a copy)
    tree: tuple | None = None  # the recorded search (decode.Node, the last Step's tree): the page's tree view
    assessment: Assessment | None = None  # familiar? how sure? (captioner.confidence)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.steps[-1].tokens

    @property
    def text(self) -> str:
        return self.steps[-1].text


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

