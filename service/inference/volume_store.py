"""Where uploaded volumes and their segment sessions live between calls.

A small interface (:class:`VolumeStore`) with one implementation in this process
(:class:`InProcessVolumeStore`). The next step puts volumes and sessions in a shared store
so that any gateway replica can serve a session; the volume service only uses the methods
below, so that store replaces this one without touching the service.

Bounds (checked before an upload is kept, and while its stream arrives): bytes of one
volume, bytes of all volumes, bytes of one owner's volumes. A volume unused for ``ttl_s``
expires: its id answers NOT_FOUND ("upload again") and its memory (voxels, sessions) is
dropped. Owners are cache scopes (:func:`service.inference.cache.scope_for`): another
owner's id is NOT_FOUND, exactly as an unknown one.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from service.core import errors
from service.core.errors import VolumeNotFound, VolumesFull, VolumeTooLarge
from service.core.request_memory import mib
from service.core.volume import Volume


@dataclass
class StoredVolume:
    volume_id: str
    owner: str
    volume: Volume
    expires_at: float
    sessions: dict[str, object] = field(default_factory=dict)   # segment_id -> the service's session

    @property
    def nbytes(self) -> int:
        return int(self.volume.nbytes)


class VolumeStore(Protocol):
    ttl_s: float

    def check_room(self, nbytes: int, owner: str) -> None:
        """Raise :class:`VolumeTooLarge` / :class:`VolumesFull` if ``nbytes`` more would not fit."""

    def put(self, volume: Volume, owner: str) -> StoredVolume: ...

    def get(self, volume_id: str, owner: str) -> StoredVolume:
        """The volume (its TTL starts again), or :class:`VolumeNotFound`."""

    def delete(self, volume_id: str, owner: str) -> bool: ...

    def expires_in(self, stored: StoredVolume) -> float: ...


class InProcessVolumeStore:
    def __init__(self, max_volume_bytes: int, max_total_bytes: int, max_owner_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[int, int], None] | None = None,
                 on_expire: Callable[[StoredVolume], None] | None = None) -> None:
        self.max_volume_bytes, self.max_total_bytes, self.max_owner_bytes = max_volume_bytes, max_total_bytes, max_owner_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: dict[str, StoredVolume] = {}
        self._pending: dict[int, tuple[str, int]] = {}   # uploads being received: token -> (owner, bytes)
        self._tokens = 0
        self._lock = threading.Lock()
        self._on_change, self._on_expire = on_change, on_expire

    # --- bounds ---------------------------------------------------------------------------
    def stored_bytes(self, owner: str | None = None) -> int:
        with self._lock:
            self._sweep()
            return sum(v.nbytes for v in self._items.values() if owner is None or v.owner == owner)

    def check_room(self, nbytes: int, owner: str, token: int | None = None) -> None:
        """Raise unless ``nbytes`` more fit, counting the stored volumes and the uploads being
        received (except upload ``token``'s own reservation, which ``nbytes`` replaces)."""
        if nbytes > self.max_volume_bytes:
            raise VolumeTooLarge(f"the volume is {mib(nbytes)} ({nbytes} bytes); one volume may hold at most "
                                 f"{mib(self.max_volume_bytes)} (--max-volume-bytes): send a slice range or a "
                                 "smaller series")
        with self._lock:
            self._sweep()
            pending = [(o, n) for t, (o, n) in self._pending.items() if t != token]
            total = sum(v.nbytes for v in self._items.values()) + sum(n for _, n in pending)
            mine = (sum(v.nbytes for v in self._items.values() if v.owner == owner)
                    + sum(n for o, n in pending if o == owner))
        if mine + nbytes > self.max_owner_bytes:
            raise VolumesFull(f"your stored volumes hold {mib(mine)}; with this one ({mib(nbytes)}) they would be over "
                              f"{mib(self.max_owner_bytes)} per caller (--max-caller-volumes-bytes): DeleteVolume "
                              f"the ones you no longer need, or wait for them to expire ({self.ttl_s:.0f} s unused)")
        if total + nbytes > self.max_total_bytes:
            raise VolumesFull(f"the gateway holds {mib(total)} of volumes; this one ({mib(nbytes)}) would take it over "
                              f"{mib(self.max_total_bytes)} (--max-volumes-bytes): retry later or on another replica")

    def reserve(self, owner: str, nbytes: int, token: int | None = None) -> int:
        """Hold ``nbytes`` for an upload being received (replacing ``token``'s earlier hold);
        raises like :meth:`check_room`. Returns the token to grow or :meth:`release` it."""
        self.check_room(nbytes, owner, token)
        with self._lock:
            if token is None:
                self._tokens += 1
                token = self._tokens
            self._pending[token] = (owner, int(nbytes))
        return token

    def release(self, token: int | None) -> None:
        with self._lock:
            self._pending.pop(token, None)

    # --- items ----------------------------------------------------------------------------
    def put(self, volume: Volume, owner: str) -> StoredVolume:
        self.check_room(int(volume.nbytes), owner)
        stored = StoredVolume(secrets.token_hex(16), owner, volume, self._clock() + self.ttl_s)
        with self._lock:
            self._items[stored.volume_id] = stored
        self._changed()
        return stored

    def get(self, volume_id: str, owner: str) -> StoredVolume:
        with self._lock:
            self._sweep()
            stored = self._items.get(volume_id)
            if stored is None or stored.owner != owner:
                raise VolumeNotFound(f"volume_id {errors.shorten(volume_id)} is unknown or has expired (volumes "
                                     f"unused for {self.ttl_s:.0f} s are dropped): upload the volume again")
            stored.expires_at = self._clock() + self.ttl_s
            return stored

    def delete(self, volume_id: str, owner: str) -> bool:
        with self._lock:
            stored = self._items.get(volume_id)
            if stored is None or stored.owner != owner:
                return False
            del self._items[volume_id]
        stored.sessions.clear()
        self._changed()
        return True

    def expires_in(self, stored: StoredVolume) -> float:
        return max(0.0, stored.expires_at - self._clock())

    def sweep(self) -> int:
        """Drop expired volumes now; returns how many."""
        with self._lock:
            n = self._sweep()
        return n

    def __len__(self) -> int:
        return len(self._items)

    def _sweep(self) -> int:
        now = self._clock()
        gone = [v for v in self._items.values() if v.expires_at <= now]
        for stored in gone:
            del self._items[stored.volume_id]
            stored.sessions.clear()
            if self._on_expire is not None:
                self._on_expire(stored)
        if gone and self._on_change is not None:
            self._on_change(len(self._items), sum(v.nbytes for v in self._items.values()))
        return len(gone)

    def _changed(self) -> None:
        if self._on_change is not None:
            with self._lock:
                count, total = len(self._items), sum(v.nbytes for v in self._items.values())
            self._on_change(count, total)
