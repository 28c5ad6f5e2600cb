"""Files the gateway re-reads when they change (TLS certificates, token lists, JWKS).

A change is detected by ``os.stat`` (which follows symlinks, so a Kubernetes Secret update,
an atomic swap of the ``..data`` link, is seen): device, inode, size and mtime in ns. Callers
parse the new bytes and keep the previous good value when the new content is invalid, so a
half-written or broken update never takes the service down.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

# Do not stat more often than this (the TLS fetcher runs on every handshake).
MIN_CHECK_INTERVAL_S = 1.0


def signature(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFiles(Generic[T]):
    """A value parsed from one or more files, re-parsed when any of them changes.

    ``parse(contents)`` gets the files' bytes in the order given and returns the value or
    raises (``ValueError``/``OSError``) for invalid content. The first parse happens in the
    constructor and its errors propagate (a start-up error); later failures are reported to
    ``on_error`` and the previous value stays in force. Thread-safe (gRPC calls the TLS
    fetcher from its own threads).
    """

    def __init__(self, paths: list[Path], parse: Callable[[list[bytes]], T],
                 on_error: Callable[[Exception], None] | None = None,
                 clock: Callable[[], float] | None = None, min_interval_s: float = MIN_CHECK_INTERVAL_S) -> None:
        self.paths = [Path(p) for p in paths]
        self._parse = parse
        self._on_error = on_error
        self._clock = clock or time.monotonic
        self._min_interval = min_interval_s
        self._lock = threading.Lock()
        self._signatures = [signature(p) for p in self.paths]
        self._rejected: list[tuple[int, int, int, int]] | None = None
        self.value: T = parse([p.read_bytes() for p in self.paths])
        self._checked_at = self._clock()
        self.generation = 0

    def refresh(self) -> bool:
        """Re-parse if a file changed since the last good parse; True when the value changed."""
        with self._lock:
            now = self._clock()
            if now - self._checked_at < self._min_interval:
                return False
            self._checked_at = now
            try:
                current = [signature(p) for p in self.paths]
            except OSError as exc:  # a file is gone for a moment (being replaced)
                self._report(exc)
                return False
            if current in (self._signatures, self._rejected):
                return False
            try:
                value = self._parse([p.read_bytes() for p in self.paths])
            except (OSError, ValueError) as exc:
                self._rejected = current  # report a bad version once; retry when a file changes
                self._report(exc)
                return False
            self._signatures, self.value = current, value
            self.generation += 1
            return True

    def _report(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(exc)

    def get(self) -> T:
        """The current value, after a (rate-limited) check for changes."""
        self.refresh()
        return self.value
