"""What a model computed for one image, kept between requests: bounded in bytes,
least-recently-used, with a TTL.

For a SAM-family model the cached output is the image embedding (follow-up prompts skip the
encoder); for a prompt-free segmenter it is the logits (another mask encoding costs no model
call). The content hash covers the decoded, normalised pixels and their shape, so the same
pixels under another window are another entry and a new model version never reuses an old
output. The gateway runs on one event loop, so the cache needs no lock.

**Scopes** (tenant isolation): every entry belongs to one scope, and the ``image_id`` a caller
sees is :meth:`ImageCache.image_id`, an HMAC-SHA256 (per-process random key) of (scope, model,
version, content hash): unguessable, different for every scope, the same for one scope's
follow-ups. The key of an entry is ``(scope, model name, model version, image_id)``, so another
scope neither hits it (``cached`` stays false for it) nor finds it by id (NOT_FOUND). Which
scope a call has is :func:`scope_for`: its caller (default), its tenant, or one shared scope
(``--cache-scope``); without authentication every call has the shared scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from service.core.geometry import Frame
from service.settings import CACHE_SCOPES


SHARED_SCOPE = ""
# The tenant of a caller named "tenant/name" (e.g. "radiology/pacs-router"); a name without it
# is its own tenant.
TENANT_SEPARATOR = "/"
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("medseg_cache_scope", default=SHARED_SCOPE)


def scope_for(caller: str | None, mode: str) -> str:
    """The cache scope of a call by ``caller`` (``None``: authentication is off, one shared
    scope) under ``--cache-scope`` ``mode``."""
    if caller is None or mode == "shared":
        return SHARED_SCOPE
    if mode == "tenant":
        return "tenant:" + caller.split(TENANT_SEPARATOR, 1)[0]
    if mode == "caller":
        return "caller:" + caller
    raise ValueError(f"unknown cache scope {mode!r}; use one of {CACHE_SCOPES}")


@contextlib.contextmanager
def scoped(scope: str) -> Iterator[None]:
    """Run the body (and the tasks it starts) with ``scope`` as the cache scope."""
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def current_scope() -> str:
    return _scope.get()


@dataclass(frozen=True)
class CachedOutput:
    output: np.ndarray  # float32: an image embedding (1, C, h, w) or a segmenter's logits (1, K, s, s)
    frame: Frame
    expires_at: float

    @property
    def nbytes(self) -> int:
        return int(self.output.nbytes)


Key = tuple[str, ...]


class ImageCache:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[["ImageCache"], None] | None = None, secret: bytes | None = None) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._secret = secret or secrets.token_bytes(32)  # per process: ids mean nothing elsewhere
        self._items: OrderedDict[Key, CachedOutput] = OrderedDict()
        self._bytes = 0
        self._on_change = on_change
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def image_id(self, model: str, version: str, content_hash: str, scope: str | None = None) -> str:
        """The id callers of ``scope`` (default: the current one) see for this image and model."""
        scope = current_scope() if scope is None else scope
        message = "\x00".join((scope, model, version, content_hash)).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def key(model: str, version: str, image_id: str, scope: str | None = None) -> Key:
        """The entry key of ``image_id`` for callers of ``scope`` (default: the current one)."""
        return (current_scope() if scope is None else scope, model, version, image_id)

    def get(self, key: Key) -> CachedOutput | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at <= self._clock():
            self._drop(key)
            self._changed()
            return None
        self._items.move_to_end(key)
        return item

    def put(self, key: Key, output: np.ndarray, frame: Frame) -> CachedOutput:
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

    def drop_where(self, predicate: Callable[[Key], bool]) -> int:
        """Drop every entry whose key ``predicate`` accepts (e.g. a deleted volume's slices);
        returns how many."""
        keys = [key for key in self._items if predicate(key)]
        for key in keys:
            self._drop(key)
        if keys:
            self._changed()
        return len(keys)

    def _drop(self, key: Key) -> None:
        self._bytes -= self._items.pop(key).nbytes

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
