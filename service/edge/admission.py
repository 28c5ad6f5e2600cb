"""Overload control: a bound on calls running and on calls waiting, with fast rejection.

At most ``max_inflight`` calls hold a slot; up to ``max_queue`` more wait for one, first in
first out, each no longer than its own deadline. A call arriving when the queue is full gets
:class:`errors.Overloaded` (RESOURCE_EXHAUSTED) at once: there is no unbounded queue, so
memory and the latency of accepted calls stay bounded under any offered load. A waiter
whose deadline passes leaves the queue with :class:`errors.DeadlineExceeded`.

The gateway runs on one event loop; no lock is needed. A slot handed to a waiter that is
being cancelled at the same moment is passed on, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.core import errors


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, registry: CollectorRegistry | None = None) -> None:
        if max_inflight < 1 or max_queue < 0:
            raise ValueError("max_inflight must be >= 1 and max_queue >= 0")
        self.max_inflight, self.max_queue = max_inflight, max_queue
        self._free = max_inflight
        self._waiters: deque[asyncio.Future] = deque()
        r = registry or CollectorRegistry()
        self._running_gauge = Gauge("medseg_admission_running", "Calls holding an admission slot", registry=r)
        self._queued_gauge = Gauge("medseg_admission_queued", "Calls waiting for an admission slot", registry=r)
        self._rejected = Counter("medseg_admission_rejected", "Calls rejected with RESOURCE_EXHAUSTED because "
                                 "the in-flight and queue bounds were full", registry=r)
        self._running_gauge.set_function(lambda: self.running)
        self._queued_gauge.set_function(lambda: self.queued)

    @property
    def running(self) -> int:
        return self.max_inflight - self._free

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None) -> AsyncIterator[None]:
        """Hold a slot for the body; wait at most ``timeout`` seconds (``None``: no limit)."""
        await self._acquire(timeout)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, timeout: float | None) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self.max_queue:
            self._rejected.inc()
            raise errors.Overloaded(f"the gateway is at capacity ({self.max_inflight} calls running, "
                                    f"{self.max_queue} waiting); retry with backoff")
        if timeout is not None and timeout <= 0:
            raise errors.DeadlineExceeded("the call's deadline passed before it could start")
        ticket = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket), timeout)
        except BaseException as exc:
            if ticket.done() and not ticket.cancelled():
                self._release()  # a slot was handed over just as we gave up: pass it on
            else:
                ticket.cancel()
                self._waiters.remove(ticket)
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded("the call's deadline passed while it waited for a free slot "
                                              "(the gateway is busy)") from exc
            raise

    def _release(self) -> None:
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot goes straight to the oldest waiter
                return
        self._free += 1
