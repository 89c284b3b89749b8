"""CPU turns and memory: how the served app shares the cores between requests and gives freed memory back.

Every request's model work (opening the photo, the encoder, each decoded word) runs in turns of `FairShare`, a few at
a time, and a free turn goes to the request that has had the least CPU so far. When the last request in progress ends,
freed heap pages go back to the system (`release_freed_memory`).
"""
from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import threading
import time
from typing import Iterator

import torch


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
    asked (app.py does, after loading the model); the app also calls it whenever its last request in progress ends
    (FairShare.request), as decodes of every size leave freed pages behind (docs/performance.md, "Memory given
    back"). False where the C library is not glibc."""
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

    Gradio's own concurrency limit (limits.CONCURRENCY) bounds how many requests are in progress; this bounds how many
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
        is quiet and freed heap pages go back to the system (release_freed_memory). Only then: a trim after every
        request slowed a normal caption among long ones (docs/performance.md, "Memory given back")."""
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


def cpu_slots() -> int:
    """Requests computing at once (FairShare): as many as the cores hold at this process's torch threads each."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


def configure_torch(threads: int | None = None) -> int:
    """Intra-op threads for inference: by default half the cores (at least 1), since up to limits.CONCURRENCY
    requests run side by side and an oversubscribed CPU serves everyone more slowly (measured: the comment above app.py's THREADS_HELP)."""
    n = threads or max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(n)
    return n

