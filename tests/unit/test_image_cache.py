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
