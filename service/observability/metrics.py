"""Prometheus metrics of the gateway, on their own registry (no module-level globals).

:class:`Metrics` implements :class:`service.inference.observer.Observer`, the interface through
which the inference layer reports stage times, cache use and backend readiness.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


PACS_OPERATIONS = ("search", "retrieve", "store")
PACS_OUTCOMES = ("ok", "unavailable", "not_found", "refused", "too_large", "error")


class Metrics:
    def __init__(self, backend: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.backend = backend
        r = self.registry
        self.requests = Counter("medseg_requests", "RPCs handled, by method and gRPC status code",
                                ["method", "code", "backend"], registry=r)
        self.request_latency = Histogram("medseg_request_duration_seconds", "Whole-RPC latency",
                                         ["method", "backend"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_latency = Histogram("medseg_stage_duration_seconds",
                                       "Latency of one pipeline stage (decode_image, preprocess, encoder, "
                                       "mask_decoder, postprocess)", ["stage", "model", "backend"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("medseg_inflight_requests", "RPCs being handled now", ["backend"], registry=r)
        self.cache_hits = Counter("medseg_embedding_cache_hits", "Embedding cache hits", ["model"], registry=r)
        self.cache_misses = Counter("medseg_embedding_cache_misses", "Embedding cache misses", ["model"], registry=r)
        self.cache_bytes = Gauge("medseg_embedding_cache_bytes", "Bytes of embeddings held", registry=r)
        self.cache_entries = Gauge("medseg_embedding_cache_entries", "Embeddings held", registry=r)
        self.cache_evictions = Gauge("medseg_embedding_cache_evictions", "Embeddings evicted for space so far",
                                     registry=r)
        self.volume_events = Counter("medseg_volume_events", "Volume work: slice_segmented, slice_embedded, "
                                     "embedding_reused, stream_stopped (client gone or deadline), upload, expired",
                                     ["event", "model"], registry=r)
        self.volumes_stored = Gauge("medseg_volumes_stored", "Uploaded volumes held", registry=r)
        self.volumes_bytes = Gauge("medseg_volumes_stored_bytes", "Bytes of uploaded volumes held", registry=r)
        self.pacs_requests = Counter("medseg_pacs_requests", "DICOMweb requests to the PACS, by operation (search, "
                                     "retrieve, store) and outcome (ok, unavailable, not_found, refused, too_large, "
                                     "error)", ["operation", "outcome"], registry=r)
        self.pacs_latency = Histogram("medseg_pacs_request_duration_seconds", "DICOMweb request latency to the PACS",
                                      ["operation"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                      registry=r)
        for operation in PACS_OPERATIONS:   # every series exists from the start: alerts see a first increase
            for outcome in PACS_OUTCOMES:
                self.pacs_requests.labels(operation, outcome)
        self.backend_ready_gauge = Gauge("medseg_backend_ready", "1 when the backend serves every model", ["backend"],
                                   registry=r)

    def stage(self, stage: str, model: str):
        """Context manager timing one pipeline stage."""
        return self.stage_latency.labels(stage, model, self.backend).time()

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        self.stage_latency.labels(stage, model, self.backend).observe(seconds)

    def cache_hit(self, model: str) -> None:
        self.cache_hits.labels(model).inc()

    def cache_miss(self, model: str) -> None:
        self.cache_misses.labels(model).inc()

    def backend_ready(self, ready: bool) -> None:
        self.backend_ready_gauge.labels(self.backend).set(1 if ready else 0)

    def cache_changed(self, cache) -> None:
        self.cache_bytes.set(cache.bytes)
        self.cache_entries.set(len(cache))
        self.cache_evictions.set(cache.evictions)

    def volume_event(self, event: str, model: str = "", n: int = 1) -> None:
        self.volume_events.labels(event, model).inc(n)

    def volumes_changed(self, volumes: int, stored_bytes: int) -> None:
        self.volumes_stored.set(volumes)
        self.volumes_bytes.set(stored_bytes)

    def pacs_request(self, operation: str, outcome: str, seconds: float) -> None:
        self.pacs_requests.labels(operation, outcome).inc()
        self.pacs_latency.labels(operation).observe(seconds)

    def serve_http(self, host: str, port: int):
        """Start the /metrics HTTP server; returns (server, thread). Port 0 picks a free port."""
        return start_http_server(port, addr=host, registry=self.registry)
