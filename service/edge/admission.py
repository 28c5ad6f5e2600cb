"""Overload control: bounds on calls running, waiting, their memory, abandoned work and each
caller's share, with fast rejection.

At most ``max_inflight`` calls hold a slot; up to ``max_queue`` more wait for one, first in
first out, each no longer than its own deadline. A call arriving when the queue is full gets
:class:`Refused` (RESOURCE_EXHAUSTED) at once: there is no unbounded queue, so memory and the
latency of accepted calls stay bounded under any offered load. A waiter whose deadline passes
leaves the queue with :class:`errors.DeadlineExceeded`.

On top of the slot count:

* **Memory** (``memory_budget``): each call is charged its estimate
  (:mod:`service.core.request_memory`) and the charges of the calls holding a slot never sum
  above the budget; the oldest waiter waits until its charge fits (nothing overtakes it). A
  call whose estimate alone is over the budget or ``max_request_memory`` is refused at once,
  with the figure. A running call that learns it needs more (a ``Segment`` on a cached image,
  once its size is known) grows its charge with :meth:`Grant.grow`, ahead of new calls.
* **Abandoned work**: a call whose client went away or whose deadline passed while one of its
  threads still runs keeps its slot and its memory until that thread really ends (see
  :mod:`service.inference.work`); while ``max_abandoned`` such calls are still running, new
  calls are refused at once rather than queued behind them.
* **Per caller** (the authenticated caller's name; ``anonymous`` without authentication): at
  most ``max_inflight_per_caller`` of its calls running or waiting, and a token bucket of
  ``rate_per_caller`` calls per second with bursts of ``burst_per_caller``.

Every refusal carries a reason (the ``reason`` label of ``medseg_admission_rejected_total``,
and the audit line) and, where waiting helps, a retry hint in seconds (sent as trailing
metadata ``retry-after-ms``).

The gateway runs on one event loop; no lock is needed. A slot handed to a waiter that is
being cancelled at the same moment is passed on, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.core import errors
from service.core.request_memory import mib

ANONYMOUS = "anonymous"
REASONS = ("queue_full", "request_memory", "abandoned", "caller_inflight", "caller_rate", "answer_size")
MAX_BUCKETS = 10_000  # per-caller rate state kept; idle (full) buckets are dropped beyond it
_HOLD_PRIOR_S = 1.0   # the retry hint before any call has finished


Refused = errors.Refused  # RESOURCE_EXHAUSTED from admission: reason (one of REASONS), retry_after_s


@dataclass(eq=False)
class Grant:
    """One admitted call: its caller and the memory charged to it."""

    caller: str
    memory: int
    admission: "Admission"
    abandoned: bool = False
    started: float = field(default_factory=time.monotonic)

    async def grow(self, total: int, timeout: float | None = None) -> None:
        """Charge at least ``total`` bytes to this call (waits for memory, ahead of new calls)."""
        if total > self.memory:
            await self.admission._grow(self, total - self.memory, timeout)


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    memory: int
    grant: Grant | None = None  # growers: the grant that grows


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, registry: CollectorRegistry | None = None, *,
                 memory_budget: int = 0, max_request_memory: int = 0, max_abandoned: int | None = None,
                 max_inflight_per_caller: int = 0, rate_per_caller: float = 0.0, burst_per_caller: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``memory_budget``/``max_request_memory``/``max_inflight_per_caller``/``rate_per_caller``:
        0 = no bound; ``max_abandoned``: ``None`` = ``max_inflight``; ``burst_per_caller`` 0 =
        ``max(1, ceil(rate_per_caller))``."""
        if max_inflight < 1 or max_queue < 0:
            raise ValueError("max_inflight must be >= 1 and max_queue >= 0")
        if min(memory_budget, max_request_memory, max_inflight_per_caller, burst_per_caller) < 0 or rate_per_caller < 0:
            raise ValueError("memory, per-caller and rate bounds must be >= 0 (0: no bound)")
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self.memory_budget, self.max_request_memory = memory_budget, max_request_memory
        self.max_abandoned = max_inflight if max_abandoned is None else max_abandoned
        self.max_inflight_per_caller = max_inflight_per_caller
        self.rate_per_caller = rate_per_caller
        self.burst_per_caller = burst_per_caller or max(1, int(-(-rate_per_caller // 1)))
        self._clock = clock
        self._free = max_inflight
        self._waiters: deque[_Waiter] = deque()
        self._growers: deque[_Waiter] = deque()
        self._memory = 0          # charged to calls holding a slot
        self._grower_memory = 0   # part of it held by calls waiting to grow
        self._abandoned = 0
        self._per_caller: Tally[str] = Tally()  # running, abandoned and waiting calls of each caller
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._hold_s = _HOLD_PRIOR_S
        r = registry or CollectorRegistry()
        self._running_gauge = Gauge("medseg_admission_running", "Calls holding an admission slot", registry=r)
        self._queued_gauge = Gauge("medseg_admission_queued", "Calls waiting for an admission slot", registry=r)
        self._rejected = Counter("medseg_admission_rejected", "Calls rejected with RESOURCE_EXHAUSTED before "
                                 "running, by reason (queue_full, request_memory, abandoned, caller_inflight, "
                                 "caller_rate, answer_size)", ["reason"], registry=r)
        for reason in REASONS:
            self._rejected.labels(reason)
        memory = Gauge("medseg_admission_memory_bytes", "Memory charged to the calls holding a slot "
                       "(their estimates)", registry=r)
        budget = Gauge("medseg_admission_memory_budget_bytes", "The memory budget of admitted calls "
                       "(0: none)", registry=r)
        abandoned = Gauge("medseg_admission_abandoned", "Calls whose client gave up while their work still "
                          "runs (they keep their slot until it ends)", registry=r)
        self._running_gauge.set_function(lambda: self.running)
        self._queued_gauge.set_function(lambda: self.queued)
        memory.set_function(lambda: self._memory)
        budget.set(memory_budget)
        abandoned.set_function(lambda: self._abandoned)

    @classmethod
    def from_settings(cls, settings, registry: CollectorRegistry | None = None) -> "Admission":
        """The bounds of :class:`service.settings.Settings` (overload control section)."""
        return cls(settings.max_inflight, settings.max_queue, registry,
                   memory_budget=settings.memory_budget_bytes, max_request_memory=settings.max_request_memory_bytes,
                   max_abandoned=settings.max_abandoned, max_inflight_per_caller=settings.max_inflight_per_caller,
                   rate_per_caller=settings.rate_per_caller, burst_per_caller=settings.burst_per_caller)

    # --- state --------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return self.max_inflight - self._free

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def memory_used(self) -> int:
        return self._memory

    @property
    def abandoned(self) -> int:
        return self._abandoned

    def caller_calls(self, caller: str) -> int:
        return self._per_caller[caller]

    def count_rejection(self, reason: str) -> None:
        """Count a refusal decided elsewhere before the work (e.g. ``answer_size``)."""
        self._rejected.labels(reason).inc()

    # --- the slot -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None, *, caller: str = ANONYMOUS, memory: int = 0, work=None,
                   exact: bool = True) -> AsyncIterator[Grant]:
        """Hold a slot (and ``memory`` bytes of the budget) for the body; wait at most
        ``timeout`` seconds (``None``: no limit).

        ``work`` (a :class:`service.inference.work.CallWork`): when the body ends while threads
        of the call still run, they are told to stop and the slot is given back only once
        they have. ``exact`` False: ``memory`` is a worst case, charged only up to what one
        call may have rather than refused.
        """
        grant = await self._acquire(timeout, caller, memory, exact)
        try:
            yield grant
        finally:
            if work is not None and work.running:
                work.abandon()
                grant.abandoned = True
                self._abandoned += 1
                work.when_idle(lambda: self._finish(grant))
            else:
                if work is not None:
                    work.abandon()  # nothing runs; nothing may start later either
                self._finish(grant)

    def _cap(self) -> int:
        caps = [c for c in (self.memory_budget, self.max_request_memory) if c > 0]
        return min(caps) if caps else 0

    def _refuse(self, reason: str, message: str, retry_after_s: float | None = None) -> Refused:
        self._rejected.labels(reason).inc()
        return Refused(message, reason, retry_after_s)

    def _take_token(self, caller: str) -> None:
        if self.rate_per_caller <= 0:
            return
        now = self._clock()
        tokens, at = self._buckets.get(caller, (float(self.burst_per_caller), now))
        tokens = min(float(self.burst_per_caller), tokens + (now - at) * self.rate_per_caller)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            wait = (1.0 - tokens) / self.rate_per_caller
            raise self._refuse("caller_rate", f"caller {errors.shorten(caller)} is over its rate of "
                               f"{self.rate_per_caller:g} calls/s (burst {self.burst_per_caller}, "
                               "--rate-per-caller)", wait)
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for name, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate_per_caller >= self.burst_per_caller:
                del self._buckets[name]

    async def _acquire(self, timeout: float | None, caller: str, memory: int, exact: bool) -> Grant:
        cap = self._cap()
        if cap and memory > cap:
            if exact:
                which = ("--max-request-memory-bytes" if self.max_request_memory and cap == self.max_request_memory
                         else "--memory-budget-bytes")
                raise self._refuse("request_memory", f"this request needs {mib(memory)} of memory; the gateway "
                                   f"allows {mib(cap)} per call ({which}): send a smaller image or fewer prompts")
            memory = cap
        if self._abandoned >= self.max_abandoned:
            raise self._refuse("abandoned", f"the gateway is still finishing {self._abandoned} abandoned calls "
                               f"(at most {self.max_abandoned}); retry with backoff", self._hold_s)
        self._take_token(caller)
        if self.max_inflight_per_caller and self._per_caller[caller] >= self.max_inflight_per_caller:
            raise self._refuse("caller_inflight", f"caller {errors.shorten(caller)} already has "
                               f"{self._per_caller[caller]} calls running or waiting (at most "
                               f"{self.max_inflight_per_caller}, --max-inflight-per-caller)", self._hold_s)
        if self._free > 0 and not self._waiters and not self._growers and self._fits(memory):
            return self._grant(caller, memory)
        if len(self._waiters) >= self.max_queue:
            raise self._refuse("queue_full", f"the gateway is at capacity ({self.max_inflight} calls running, "
                               f"{self.max_queue} waiting); retry with backoff",
                               self._hold_s * (1 + len(self._waiters) / self.max_inflight))
        if timeout is not None and timeout <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before it could start")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), memory)
        self._waiters.append(waiter)
        self._per_caller[caller] += 1  # counted while it waits; the grant takes it over
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                granted: Grant = waiter.future.result()
                granted.caller = caller
                self._finish(granted)  # granted just as we gave up: pass it on
            else:
                self._uncount(caller)
                waiter.future.cancel()
                self._waiters.remove(waiter)
                self._dispatch()  # a big head leaving may let smaller ones in
            if isinstance(exc, TimeoutError):
                busy = "memory" if self._free > 0 else "a free slot"
                raise errors.DeadlineExceeded(f"the call's deadline passed while it waited for {busy} "
                                              "(the gateway is busy)") from exc
            raise
        grant: Grant = waiter.future.result()
        grant.caller = caller
        return grant

    def _fits(self, memory: int) -> bool:
        return not self.memory_budget or self._memory + memory <= self.memory_budget

    def _grant(self, caller: str, memory: int) -> Grant:
        self._free -= 1
        self._memory += memory
        if caller:
            self._per_caller[caller] += 1
        return Grant(caller, memory, self)

    def _finish(self, grant: Grant) -> None:
        """The call and all its threads are done: give back its slot, memory and caller share."""
        if grant.abandoned:
            self._abandoned -= 1
        self._memory -= grant.memory
        grant.memory = 0
        self._uncount(grant.caller)
        held = max(0.0, time.monotonic() - grant.started)
        self._hold_s = 0.8 * self._hold_s + 0.2 * held
        self._free += 1
        self._dispatch()

    def _uncount(self, caller: str) -> None:
        self._per_caller[caller] -= 1
        if self._per_caller[caller] <= 0:
            del self._per_caller[caller]

    async def _grow(self, grant: Grant, extra: int, timeout: float | None) -> None:
        cap = self._cap()
        if cap and grant.memory + extra > cap:
            raise self._refuse("request_memory", f"this request needs {mib(grant.memory + extra)} of memory; the "
                               f"gateway allows {mib(cap)} per call: send a smaller image or fewer prompts")
        if not self._growers and self._fits(extra):
            self._memory += extra
            grant.memory += extra
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), extra, grant)
        self._growers.append(waiter)
        self._grower_memory += grant.memory
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException:
            if not (waiter.future.done() and not waiter.future.cancelled()):
                waiter.future.cancel()
                self._growers.remove(waiter)
                self._grower_memory -= grant.memory
                self._dispatch()
            raise

    def _dispatch(self) -> None:
        """Hand memory to the oldest grower, then slots to the oldest waiters, while they fit."""
        while self._growers:
            head = self._growers[0]
            if self.memory_budget and self._grower_memory + head.memory > self.memory_budget:
                # only other growers could free enough, and they wait too: refuse rather than deadlock
                self._growers.popleft()
                self._grower_memory -= head.grant.memory
                head.future.set_exception(self._refuse(
                    "request_memory", f"this request needs {mib(head.grant.memory + head.memory)} of memory, "
                    f"more than the gateway can free for it now ({mib(self.memory_budget)} budget)", self._hold_s))
                continue
            if not self._fits(head.memory):
                return  # running calls will free memory; nothing overtakes a grower
            self._growers.popleft()
            self._grower_memory -= head.grant.memory
            self._memory += head.memory
            head.grant.memory += head.memory
            head.future.set_result(None)
        while self._waiters and self._free > 0:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            if not self._fits(head.memory):
                return  # first in, first out: a big call is not overtaken by smaller ones
            self._waiters.popleft()
            grant = self._grant("", head.memory)  # the caller's share moves over from waiting
            head.future.set_result(grant)
