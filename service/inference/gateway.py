"""The gateway's state independent of gRPC: models, backend, cache, readiness."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Awaitable, Callable

import numpy as np

from service.core import errors
from service.core.errors import StartupError
from service.backends.base import Backend
from service.core.domain import EmbedResult, ImageInput, MaskEncoding, ModelInfo, SegmentRequest, SegmentResult
from service.inference.cache import ImageCache, scope_for, scoped
from service.inference import memory_fit, model_choice, seg_output, work
from service.inference.observer import Observer
from service.backends.repository import SamModel, SegmenterModel, discover, read_entry
from service.inference.pipeline import SamPipeline
from service.inference.segmenter_pipeline import SegmenterPipeline
from service.inference.studies import StudyService
from service.inference.volumes import VolumeService
from service.settings import Settings

log = logging.getLogger(__name__)
_PIPELINES = {SamModel: SamPipeline, SegmenterModel: SegmenterPipeline}
START_RETRY_S = 1.0


class Gateway:
    def __init__(self, settings: Settings, backend: Backend, metrics: Observer) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        models = discover(settings.model_repository, settings.default_model)
        if not models:
            raise StartupError(f"no servable models in {settings.model_repository!s}; "
                               "run `python -m export medsam_lite` (or `make models`) first")
        if settings.default_model != model_choice.AUTO and settings.default_model not in models:
            raise StartupError(f"default model {settings.default_model!r} is not in the repository "
                               f"(found: {', '.join(sorted(models))})")
        self.cpu_flags = model_choice.cpu_flags()
        try:  # provisional (unmeasured) until start() has timed the candidates
            self.default_choice = model_choice.choose(settings.default_model, list(models), self.cpu_flags,
                                                      unmeasured_because="not measured yet")
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self.cache = ImageCache(settings.cache_bytes, settings.cache_ttl_s, on_change=metrics.cache_changed)
        self.pipelines = {
            name: _PIPELINES[type(model)](model, backend, self.cache, metrics, settings.image_limits,
                                          settings.max_prompts, settings.backend_timeout_s)
            for name, model in models.items()
        }
        self.seg_defaults = seg_output.SegDefaults.from_settings(settings)
        self.volumes = VolumeService(self.pipeline, backend, metrics, settings, seg_defaults=self.seg_defaults)
        self.pacs = _pacs(settings, metrics)
        self.studies = StudyService(self.volumes, self.pacs)
        self.ready = False
        self._on_ready_change: list[Callable[[bool], Awaitable[None]]] = []

    def on_ready_change(self, callback: Callable[[bool], Awaitable[None]]) -> None:
        self._on_ready_change.append(callback)

    async def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("gateway %s", "ready: SERVING" if ready else "not ready: NOT_SERVING")
        self.ready = ready
        self.metrics.backend_ready(ready)
        for callback in self._on_ready_change:
            await callback(ready)

    async def start(self) -> None:
        """Load every model and warm it up; raises StartupError with a clear message."""
        if self.settings.startup_delay_s > 0:
            await asyncio.sleep(self.settings.startup_delay_s)
        names = list(dict.fromkeys(m for p in self.pipelines.values() for m in p.repository_models))  # shared decoders
        if self.backend.name == "embedded":  # Triton holds its models in its own process
            try:
                log.info("memory: %s", memory_fit.check(
                    [read_entry(self.settings.model_repository / n) for n in names], self.settings.memory_limit_bytes))
            except ValueError as exc:
                raise StartupError(str(exc)) from exc
        while True:
            try:
                await self.backend.start(names)
                for pipeline in self.pipelines.values():
                    await pipeline.warmup()
                break
            except errors.Unavailable as exc:
                if not getattr(self.backend, "retry_start", False):
                    raise StartupError(exc.message) from exc
                log.warning("backend not ready yet (%s); retrying in %.0f s", exc.message, START_RETRY_S)
                await asyncio.sleep(START_RETRY_S)
            except errors.ServiceError as exc:
                raise StartupError(exc.message) from exc
        await self._choose_default()
        await self._set_ready(True)

    @property
    def default_model(self) -> str:
        """The model a call naming none gets: ``--default-model``, or with ``auto`` the choice
        of :mod:`service.inference.model_choice` (measured in :meth:`start`)."""
        return self.default_choice.model

    async def _choose_default(self) -> None:
        """With ``--default-model auto``: time the candidates' encoders through the backend and
        keep the fastest (see :mod:`service.inference.model_choice`); mark it in ListModels."""
        requested = self.settings.default_model
        pool = model_choice.candidates(self.pipelines, self.cpu_flags)
        seconds, because = None, ""
        if requested == model_choice.AUTO and len(pool) > 1:
            if self.settings.default_model_runs < 1:
                because = "measuring off: --default-model-runs 0"
            else:
                try:
                    seconds = await self._time_encoders(pool, self.settings.default_model_runs)
                except errors.ServiceError as exc:
                    because = f"measuring through the {self.backend.name} backend failed: {exc.message}"
        self.default_choice = choice = model_choice.choose(requested, list(self.pipelines), self.cpu_flags,
                                                           seconds, because)
        how = (f", best of {self.settings.default_model_runs} encoder runs each through the {self.backend.name} "
               "backend's infer" if choice.measured else "")
        log.info("default model: %s (%s%s)", choice.model, choice.reason, how)
        for name, pipeline in self.pipelines.items():
            info = replace(pipeline.info, is_default=name == choice.model)
            if name == choice.model:
                info = replace(info, description=f"{info.description}; default model on this machine: {choice.reason}")
            pipeline.info = info

    async def _time_encoders(self, models: list[str], runs: int) -> dict[str, float]:
        """Best seconds of ``runs`` encoder calls of each of ``models`` (interleaved, so drift
        in the machine's load hits all alike), on the warm-up image, through ``backend.infer``."""
        best = {m: float("inf") for m in models}
        calls = {}
        for name in models:
            predictor = self.pipelines[name].predictor
            size = predictor.input_size
            ramp = np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
            calls[name] = predictor.encoder_call(ramp)[0]
        for _ in range(runs):
            for name in models:
                call = calls[name]
                start = time.perf_counter()
                await self.backend.infer(call.model, call.inputs, call.outputs, self.settings.backend_timeout_s)
                best[name] = min(best[name], time.perf_counter() - start)
        return best

    async def watch_backend(self, interval_s: float = 1.0) -> None:
        """Follow the backend's readiness (health goes NOT_SERVING and back without a restart)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                ready = await self.backend.ready()
            except Exception:  # a readiness probe must not kill the watcher
                ready = False
            await self._set_ready(ready)

    def model_name(self, requested: str) -> str:
        """The model a call means: the name it sends, or the default model (:attr:`default_model`:
        ``--default-model``, or the one chosen at start-up for ``auto``) when it sends none.

        The one place the default applies: the servicer resolves each call's model here once,
        and authorisation, the audit line and the request all use the result."""
        return requested or self.default_model

    def serves(self, model: str) -> bool:
        return model in self.pipelines

    def pipeline(self, model: str) -> SamPipeline:
        pipeline = self.pipelines.get(model)
        if pipeline is None:
            raise errors.ModelNotFound(f"model {errors.shorten(model)} is not served here; ListModels shows "
                                       f"{', '.join(sorted(self.pipelines))}")
        if not self.ready:
            raise errors.Unavailable("models are loading or the backend is not ready; retry when "
                                     "grpc.health.v1 reports SERVING")
        return pipeline

    def list_models(self) -> list[ModelInfo]:
        return [p.info for p in self.pipelines.values()]

    def cache_scope(self, caller: str | None) -> str:
        """The cache scope of ``caller``'s calls (``None``: authentication is off) under
        ``--cache-scope``: its own entries and ids, its tenant's, or one shared scope."""
        return scope_for(caller, self.settings.cache_scope)

    async def segment(self, request: SegmentRequest, scope: str = "") -> SegmentResult:
        """``request`` with the entries and ids of cache ``scope`` (see :meth:`cache_scope`)."""
        with scoped(scope):
            pipeline = self.pipeline(request.model)
            if request.encoding is MaskEncoding.DICOM_SEG:
                return await self._segment_as_seg(pipeline, request)
            return await pipeline.segment(request)

    async def _segment_as_seg(self, pipeline, request: SegmentRequest) -> SegmentResult:
        """A 2-D answer as one DICOM SEG (segment i + 1 = prompt i): the source header is read
        (and a non-DICOM input refused) before any model runs; the masks travel as bits until
        the SEG is written, and the answer's masks keep only their metadata."""
        if request.multimask_output:
            raise errors.InvalidArgument("a DICOM SEG holds one segment per prompt: send multimask_output false "
                                         "with MASK_ENCODING_DICOM_SEG (the best candidate is chosen), or ask "
                                         "for the candidates in another encoding")
        header = await work.run_in_thread(seg_output.source_header, request, self.settings.image_limits)
        result = await pipeline.segment(replace(request, encoding=MaskEncoding.BITS))
        written = await work.run_in_thread(
            seg_output.write_image_seg, header, result.masks, result.height, result.width, result.model,
            isinstance(pipeline, SegmenterPipeline), request.dicom_seg, self.seg_defaults)
        masks = tuple(replace(m, mask=None, encoded=b"",
                              area=m.area if m.area is not None else int(np.count_nonzero(m.mask)))
                      for m in result.masks)
        return replace(result, masks=masks, dicom_seg=written.data)

    async def embed(self, model: str, image: ImageInput, scope: str = "") -> EmbedResult:
        pipeline = self.pipeline(model)
        with scoped(scope):
            image_id, entry, cached = await pipeline.embed(image)
        return EmbedResult(pipeline.info, image_id, entry.frame.height, entry.frame.width, cached)

    async def close(self) -> None:
        if self.pacs is not None:
            self.pacs.close()
        await self.backend.close()


def _pacs(settings: Settings, metrics: Observer):
    """The DICOMweb client of ``--pacs-url`` (None without one: requests and dicomweb-client
    are then not even imported)."""
    if not settings.pacs_url:
        return None
    from service.backends.pacs import DicomWebPacs, PacsConfig

    try:
        config = PacsConfig.from_settings(settings)
    except ValueError as exc:   # the PACS settings contradict each other or name a missing file
        raise StartupError(f"PACS settings: {exc}") from None
    return DicomWebPacs(config, on_request=metrics.pacs_request)
