"""The calling RPC's deadline, carried to the backend without threading it through every call.

The servicer sets the deadline once per call (:func:`bounded`, from
``context.time_remaining()``); :class:`DeadlineBoundBackend` wraps the real backend and gives
every ``infer`` the smaller of its configured timeout and the time the client has left, so a
client's 5 s deadline becomes a 5 s (or shorter) Triton ``client_timeout`` / ONNX Runtime
wait, not the 30 s default. Work started outside any call (warm-up, readiness checks) keeps
the configured timeout. A ``contextvars.ContextVar`` follows the call's task through
``await``, ``asyncio.to_thread`` and tasks created from it, and never leaks between calls.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import Iterator

import numpy as np

from service.core import errors
from service.backends.base import Backend
from service.inference import work

_DEADLINE: ContextVar[float | None] = ContextVar("medseg_call_deadline", default=None)


@contextlib.contextmanager
def bounded(seconds: float | None) -> Iterator[None]:
    """Run the body under a deadline ``seconds`` from now (``None``: no deadline)."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left before the current call's deadline, ``None`` outside a call or without one."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def backend_timeout(configured: float | None) -> float | None:
    """The timeout for one backend call: ``min(configured, remaining())``.

    Raises :class:`errors.DeadlineExceeded` when the call's deadline has already passed (no
    point in starting backend work nobody will wait for).
    """
    left = remaining()
    if left is None:
        return configured
    if left <= 0:
        raise errors.DeadlineExceeded("the call's deadline passed before the model ran")
    return left if configured is None else min(configured, left)


class DeadlineBoundBackend:
    """A :class:`Backend` proxy whose ``infer`` honours the calling RPC's deadline, and starts
    no model run for a call nobody waits for any more (:mod:`service.inference.work`)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # name, retry_start, start, ready, close

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        call = work.current()
        if call is not None:
            call.check(f"running model {model}")
        return await self.inner.infer(model, inputs, outputs, backend_timeout(timeout))
