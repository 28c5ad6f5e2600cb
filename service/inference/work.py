"""One call's work as the inference layer sees it: does anyone still wait for it, when is its
deadline, how much memory may it use, and which of its threads are still running.

The edge creates a :class:`CallWork` per admitted call and makes it current (:func:`bound`);
the pipelines run every blocking step through :func:`run_in_thread` and call
:meth:`CallWork.check` between stages (decode -> preprocess -> encode -> each mask -> the
answer). So:

* work nobody waits for stops at the next stage boundary: when the awaiting coroutine is
  cancelled (the client went away, its deadline passed) the call is *abandoned* and its
  threads raise :class:`Abandoned` at their next check instead of carrying on;
* the edge knows which threads of a call are still running after it gave up on them
  (:attr:`CallWork.running`, :meth:`CallWork.when_idle`), so its admission slot and memory
  are given back only when they really finish (:mod:`service.edge.admission`);
* a step that learns how much memory it needs only once the image size is known (a
  ``Segment`` on an ``image_id``) asks for it with :meth:`CallWork.reserve` before it
  allocates, and refuses an answer over :attr:`CallWork.answer_limit` before computing it.

Work started outside any call (warm-up, tools) has no current :class:`CallWork`: nothing is
checked or counted. Threads come from one bounded pool; how many run at once is bounded by
admission, not by the pool.

This module imports nothing of the edge: the edge hands in callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Iterator, TypeVar

from service.core import errors

__all__ = ["Abandoned", "CallWork", "bound", "current", "run_in_thread"]

T = TypeVar("T")
# An upper bound only: a thread is created when work is submitted and none is idle, so the
# number alive follows the peak of concurrent steps, which admission bounds.
POOL_THREADS = 64
_CURRENT: contextvars.ContextVar["CallWork | None"] = contextvars.ContextVar("medseg_call_work", default=None)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


class Abandoned(Exception):
    """Raised in a worker thread at a stage boundary when nobody waits for the call any more
    (never seen by a client: the call has already ended)."""


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="medseg-work")
        return _POOL


class CallWork:
    """The state one call shares with its worker threads (see the module doc).

    ``deadline``: ``time.monotonic()`` value after which the call's result is useless
    (``None``: none). ``answer_limit``: the largest answer in bytes the call may send
    (``None``: unbounded). ``reserve``: async callable ``(total bytes) -> None`` that grows the
    call's memory allowance to at least that many bytes, or raises (``None``: not accounted).
    """

    def __init__(self, deadline: float | None = None, answer_limit: int | None = None,
                 reserve: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.deadline = deadline
        self.answer_limit = answer_limit
        self._reserve = reserve
        self._abandoned = threading.Event()
        self._running = 0  # threads submitted and not yet finished (changed on the event loop only)
        self._idle: list[Callable[[], None]] = []

    # --- cancellation -------------------------------------------------------------------
    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def abandon(self) -> None:
        """Nobody waits for this call any more: its threads stop at their next check."""
        self._abandoned.set()

    def check(self, stage: str = "the next stage") -> None:
        """Raise before ``stage`` when the call is abandoned (:class:`Abandoned`) or its
        deadline has passed (:class:`errors.DeadlineExceeded`). Safe in any thread."""
        if self._abandoned.is_set():
            raise Abandoned(stage)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise errors.DeadlineExceeded(f"the call's deadline passed before {stage}")

    # --- memory -------------------------------------------------------------------------
    def use_reserve(self, reserve: Callable[[int], Awaitable[None]] | None) -> None:
        """Set how :meth:`reserve` grows the call's allowance (the edge's admission grant)."""
        self._reserve = reserve

    async def reserve(self, total_bytes: int) -> None:
        """Make sure the call may hold ``total_bytes`` (waits for memory, or raises
        :class:`errors.ResourceExhausted`); a no-op when the call is not accounted."""
        if self._reserve is not None:
            await self._reserve(int(total_bytes))

    # --- threads ------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Threads of this call still running (or queued for a worker)."""
        return self._running

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once no thread of this call runs: now if none does."""
        if self._running == 0:
            callback()
        else:
            self._idle.append(callback)

    def _started(self) -> None:
        self._running += 1

    def _finished(self) -> None:
        self._running -= 1
        if self._running == 0:
            callbacks, self._idle = self._idle, []
            for callback in callbacks:
                callback()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_BLOCK_BYTES = 4 * 1024 * 1024


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more by its own mapping,
    given back to the system when freed (call once at start-up; False where not glibc).

    By default glibc raises that threshold at run time up to 32 MiB, so Pillow's 16 MiB image
    blocks and numpy buffers below 32 MiB come from per-thread heaps that keep freed memory:
    after one 40-megapixel request the process stayed ~1.1 GiB above its baseline. A fixed
    threshold keeps the peak of a request to what it uses and returns RSS to the baseline.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """``malloc_trim(0)``: give the free pages inside glibc's heaps back to the system (False
    where that is not glibc). An upload arrives in parts of about 1 MiB (the client's default),
    below the 4 MiB mmap threshold (:func:`return_large_blocks`), so they
    come from the main heap; once they are freed, any later small allocation at the heap's top
    keeps ``free`` from trimming it, and the process stayed about the upload's size above its
    baseline even after the volume was deleted (+108 MiB after a 150 MiB raw upload,
    bench/volume_bench.py). Called once an upload's parts are freed."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def current() -> CallWork | None:
    """The calling task's (or worker thread's) :class:`CallWork`, ``None`` outside a call."""
    return _CURRENT.get()


def check_current(stage: str = "the next stage") -> None:
    """:meth:`CallWork.check` of the current call, if any."""
    work = _CURRENT.get()
    if work is not None:
        work.check(stage)


@contextlib.contextmanager
def bound(work: CallWork | None) -> Iterator[CallWork | None]:
    """Make ``work`` current for the body (``None``: no call, e.g. work shared by several)."""
    token = _CURRENT.set(work)
    try:
        yield work
    finally:
        _CURRENT.reset(token)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed (shutdown): nothing left to account
        pass


async def run_in_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, in the caller's context (so
    :func:`current` works inside it), checked and counted against the current call.

    Checks the call before submitting (an abandoned or expired call starts no new step). If
    the awaiting coroutine is cancelled, the call is abandoned: a step not yet started never
    starts, a running one stops at its next :meth:`CallWork.check`, and :attr:`CallWork.running`
    counts it until it really ends.
    """
    work = _CURRENT.get()
    if work is not None:
        work.check()
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = _pool().submit(context.run, functools.partial(fn, *args, **kwargs))
    if work is not None:
        work._started()
        future.add_done_callback(lambda _: _on_loop(loop, work._finished))
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if work is not None:
            work.abandon()
        future.cancel()  # not started yet: it never will
        raise
