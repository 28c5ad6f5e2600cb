"""What a model computed for one image, kept between requests: bounded in bytes,
least-recently-used, with a TTL.

For a SAM-family model the cached output is the image embedding (follow-up prompts skip the
encoder); for a prompt-free segmenter it is the logits (another mask encoding costs no model
call). Keys are ``(model name, model version, content hash)``; the content hash covers the
decoded, normalised pixels and their shape, so the same pixels under another window are another
entry and a new model version never reuses an old output. The gateway runs on one event loop,
so the cache needs no lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from service.core.geometry import Frame


@dataclass(frozen=True)
class CachedOutput:
    output: np.ndarray  # float32: an image embedding (1, C, h, w) or a segmenter's logits (1, K, s, s)
    frame: Frame
    expires_at: float

    @property
    def nbytes(self) -> int:
        return int(self.output.nbytes)


class ImageCache:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[["ImageCache"], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[tuple[str, str, str], CachedOutput] = OrderedDict()
        self._bytes = 0
        self._on_change = on_change
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, str, str]) -> CachedOutput | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at <= self._clock():
            self._drop(key)
            self._changed()
            return None
        self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str, str], output: np.ndarray, frame: Frame) -> CachedOutput:
        item = CachedOutput(output, frame, self._clock() + self.ttl_s)
        if key in self._items:
            self._drop(key)
        if item.nbytes <= self.max_bytes:
            self._items[key] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
                self.evictions += 1
        self._changed()
        return item

    def _drop(self, key: tuple[str, str, str]) -> None:
        self._bytes -= self._items.pop(key).nbytes

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
