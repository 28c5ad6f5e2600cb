"""Backends and the single factory that picks one from the settings."""

from __future__ import annotations

from service.backends.base import Backend
from service.settings import Settings


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "embedded":
        from service.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings.model_repository, settings.ort_threads, settings.backend_workers)
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend  # noqa: PLC0415

        return TritonBackend(settings.triton_url, settings.backend_timeout_s)
    raise ValueError(f"unknown backend {settings.backend!r}")


__all__ = ["Backend", "create_backend"]
