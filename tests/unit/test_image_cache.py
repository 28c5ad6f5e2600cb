"""The image cache (SAM embeddings, segmenter logits): bounded in bytes, LRU, TTL."""

from __future__ import annotations

import numpy as np

from service.inference.cache import ImageCache
from service.core.geometry import Frame

FRAME = Frame(10, 10, 256)


def _emb(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes // 4, dtype=np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_never_holds_more_bytes_than_its_bound_and_evicts_least_recently_used():
    cache = ImageCache(max_bytes=1000, ttl_s=60)
    for i in range(3):
        cache.put(("m", "1", str(i)), _emb(400), FRAME)
        assert cache.bytes <= 1000
    assert cache.get(("m", "1", "0")) is None  # oldest went first
    assert cache.get(("m", "1", "1")) is not None and cache.get(("m", "1", "2")) is not None
    cache.get(("m", "1", "1"))  # 1 is now most recent
    cache.put(("m", "1", "3"), _emb(400), FRAME)
    assert cache.get(("m", "1", "2")) is None and cache.get(("m", "1", "1")) is not None
    assert cache.evictions == 2 and len(cache) == 2 and cache.bytes == 800


def test_entries_expire_after_their_ttl():
    clock = Clock()
    cache = ImageCache(max_bytes=10_000, ttl_s=5, clock=clock)
    cache.put(("m", "1", "a"), _emb(40), FRAME)
    clock.now = 4.9
    assert cache.get(("m", "1", "a")) is not None
    clock.now = 5.0
    assert cache.get(("m", "1", "a")) is None and cache.bytes == 0


def test_an_embedding_larger_than_the_whole_cache_is_not_kept():
    cache = ImageCache(max_bytes=100, ttl_s=5)
    item = cache.put(("m", "1", "big"), _emb(400), FRAME)
    assert item.nbytes == 400 and len(cache) == 0 and cache.bytes == 0


def test_model_version_is_part_of_the_key_and_replacing_a_key_does_not_leak_bytes():
    cache = ImageCache(max_bytes=10_000, ttl_s=5)
    cache.put(("m", "1", "a"), _emb(40), FRAME)
    assert cache.get(("m", "2", "a")) is None
    cache.put(("m", "1", "a"), _emb(80), FRAME)
    assert cache.bytes == 80 and len(cache) == 1


def test_drop_where_removes_the_matching_entries_and_their_bytes():
    changes = []
    cache = ImageCache(max_bytes=10_000, ttl_s=5, on_change=lambda c: changes.append(c.bytes))
    for k in range(3):
        cache.put(("o", "m", "1", f"vol-a:{k}"), _emb(40), FRAME)
    cache.put(("o", "m", "1", "vol-b:0"), _emb(80), FRAME)
    assert cache.drop_where(lambda key: key[-1].startswith("vol-a:")) == 3
    assert len(cache) == 1 and cache.bytes == 80 and changes[-1] == 80
    assert cache.get(("o", "m", "1", "vol-b:0")) is not None
    assert cache.drop_where(lambda key: False) == 0 and cache.bytes == 80


def test_a_deleted_or_expired_volume_takes_its_slice_embeddings_with_it():
    """VolumeService forgets a volume's slice embeddings when the volume is deleted or expires
    (SegmentStudy deletes its volume after every call: dead embeddings would fill the LRU)."""
    from types import SimpleNamespace

    from service.core.volume import VolumeSource, load_volume
    from service.inference.observer import NullObserver
    from service.inference.volumes import VolumeService
    from service.settings import Settings

    settings = Settings()
    service = VolumeService(lambda model: None, SimpleNamespace(), NullObserver(), settings)
    raw = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    volume = load_volume(VolumeSource("raw", data=raw.tobytes(), dtype="int16", shape=(2, 8, 8),
                                      spacing_mm=(1.0, 1.0, 1.0)))
    kept, gone = service.store.put(volume, "me"), service.store.put(volume, "me")
    for stored in (kept, gone):
        for k in range(2):
            service._embeddings.put(("me", "m", "1", f"{stored.volume_id}:{k}"), _emb(40), FRAME)
    assert service.delete(gone.volume_id, "me") and len(service._embeddings) == 2
    assert not service.delete(gone.volume_id, "me")
    service._expired(kept)
    assert len(service._embeddings) == 0 and service._embeddings.bytes == 0
