"""Tenant isolation of the image cache (issue 14, finding 9): ids and entries per scope,
unguessable ids, the caller's own follow-ups still hit. In process, a pipeline whose encoder
is a counter (no model)."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from service.core import errors
from service.core.domain import ImageInput, ImageLimits, ModelInfo, RawPixels
from service.core.geometry import Frame
from service.core.imageio import decode_image
from service.inference.cache import ImageCache, current_scope, scope_for, scoped
from service.inference.observer import NullObserver
from service.inference.pipeline import CachedPipeline, content_hash

INFO = ModelInfo("m", "1", 16, frozenset(), frozenset())
PIXELS = np.arange(64, dtype=np.uint8).reshape(8, 8)
IMAGE = ImageInput(raw=RawPixels("uint8", (8, 8), PIXELS.tobytes()))


class CountingPipeline(CachedPipeline):
    def __init__(self, cache: ImageCache) -> None:
        super().__init__(INFO, None, cache, NullObserver(), ImageLimits(), 4, 5.0)
        self.encoded = 0

    async def _encode(self, decoded):
        self.encoded += 1
        return np.zeros((1, 2, 2, 2), np.float32), Frame(decoded.height, decoded.width, 16)


def test_scopes_per_caller_tenant_or_shared_and_one_shared_scope_without_authentication():
    assert scope_for("radiology/pacs", "caller") != scope_for("radiology/viewer", "caller")
    assert scope_for("radiology/pacs", "tenant") == scope_for("radiology/viewer", "tenant")
    assert scope_for("radiology/pacs", "tenant") != scope_for("oncology/pacs", "tenant")
    assert scope_for("pacs", "tenant") != scope_for("viewer", "tenant")  # no tenant part: its own
    assert scope_for("a", "shared") == scope_for("b", "shared") == scope_for(None, "caller") == ""
    with pytest.raises(ValueError):
        scope_for("a", "everyone")


def test_image_ids_differ_per_scope_and_process_and_do_not_reveal_the_content_hash():
    cache, other_process = ImageCache(1 << 20, 60), ImageCache(1 << 20, 60)
    digest = hashlib.sha256(b"pixels").hexdigest()[:32]
    a = cache.image_id("m", "1", digest, "caller:a")
    assert a == cache.image_id("m", "1", digest, "caller:a") and len(a) == 32  # stable within a scope
    assert a != cache.image_id("m", "1", digest, "caller:b")
    assert a != cache.image_id("m", "2", digest, "caller:a")
    assert a != other_process.image_id("m", "1", digest, "caller:a")  # per-process secret
    assert digest not in {a, cache.image_id("m", "1", digest, "")}
    with scoped("caller:a"):
        assert current_scope() == "caller:a" and cache.image_id("m", "1", digest) == a
    assert current_scope() == ""


def test_another_caller_neither_hits_nor_finds_an_entry_and_the_owner_still_hits():
    async def run():
        pipeline = CountingPipeline(ImageCache(1 << 20, 60))
        with scoped("caller:a"):
            id_a, _, cached_first = await pipeline.embed(IMAGE)
            again, _, cached_again = await pipeline.embed(IMAGE)
        with scoped("caller:b"):
            id_b, _, cached_b = await pipeline.embed(IMAGE)
            with pytest.raises(errors.ImageNotFound):
                pipeline.lookup(id_a)
        with scoped("caller:a"):
            found = pipeline.lookup(id_a)
        return id_a, again, id_b, (cached_first, cached_again, cached_b), found, pipeline.encoded

    id_a, again, id_b, cached, found, encoded = asyncio.run(run())
    assert cached == (False, True, False)  # B learns nothing from A's upload
    assert again == id_a and id_b != id_a and found is not None
    assert encoded == 2  # A's follow-up cost no encoder run; B's call had its own
    assert content_hash(decode_image(IMAGE).pixels) not in (id_a, id_b)  # not the guessable content hash


def test_concurrent_calls_of_two_scopes_do_not_share_one_encode():
    async def run():
        pipeline = CountingPipeline(ImageCache(1 << 20, 60))

        async def call(scope):
            with scoped(scope):
                return await pipeline.embed(IMAGE)

        results = await asyncio.gather(call("caller:a"), call("caller:b"), call("caller:a"))
        return [cached for _, _, cached in results], pipeline.encoded

    cached, encoded = asyncio.run(run())
    assert encoded == 2 and cached.count(False) == 2
