"""What the inference layer reports while it works, as a narrow interface.

The inference layer sits below observability (see the layer contracts in pyproject.toml): it
must not import Prometheus or :mod:`service.observability`. It reports through an
:class:`Observer`; the gateway process hands it :class:`service.observability.metrics.Metrics`,
which implements these methods, and tools that run the predictor alone use :class:`NullObserver`.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol


class Observer(Protocol):
    backend: str

    def stage(self, stage: str, model: str) -> ContextManager[object]:
        """Time one pipeline stage (decode_image, preprocess, encoder, mask_decoder, ...)."""

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        """Record a stage measured elsewhere (e.g. in a worker thread)."""

    def cache_hit(self, model: str) -> None: ...

    def cache_miss(self, model: str) -> None: ...

    def cache_changed(self, cache) -> None:
        """The cache's bytes / entries / evictions changed (``cache`` has those attributes)."""

    def backend_ready(self, ready: bool) -> None: ...

    def volume_event(self, event: str, model: str = "", n: int = 1) -> None:
        """Count a volume event (slice_segmented, slice_embedded, embedding_reused,
        stream_stopped, upload, expired, ...)."""

    def volumes_changed(self, volumes: int, stored_bytes: int) -> None:
        """The volume store now holds ``volumes`` volumes of ``stored_bytes`` bytes."""

    def pacs_request(self, operation: str, outcome: str, seconds: float) -> None:
        """One DICOMweb request to the PACS: ``operation`` search/retrieve/store, ``outcome``
        ok/unavailable/not_found/refused/too_large/error."""


class NullObserver:
    """Reports nothing (tools, benchmarks and tests that run the inference layer alone)."""

    backend = "none"

    def stage(self, stage: str, model: str) -> ContextManager[object]:
        return contextlib.nullcontext()

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        pass

    def cache_hit(self, model: str) -> None:
        pass

    def cache_miss(self, model: str) -> None:
        pass

    def cache_changed(self, cache) -> None:
        pass

    def backend_ready(self, ready: bool) -> None:
        pass

    def volume_event(self, event: str, model: str = "", n: int = 1) -> None:
        pass

    def volumes_changed(self, volumes: int, stored_bytes: int) -> None:
        pass

    def pacs_request(self, operation: str, outcome: str, seconds: float) -> None:
        pass
