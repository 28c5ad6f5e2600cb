"""The SAM-family request path as small named steps:
decode image -> preprocess -> encode (cached) -> validate prompts -> decode masks -> postprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np

from service.core import errors
from service.backends.base import Backend
from service.core.domain import (Box, DecodedImage, ImageInput, ImageLimits, MaskResult, ModelInfo, Prompt,
                            SegmentRequest, SegmentResult)
from service.inference.cache import CachedOutput, ImageCache
from service.core.imageio import decode_image
from service.inference.observer import Observer
from service.backends.repository import SamModel
from service.core.geometry import Frame
from service.inference.predictor import DECODER_PROMPT_INPUTS, Embedding, SamPredictor  # noqa: F401


def content_hash(pixels: np.ndarray) -> str:
    """Hex digest of the decoded pixels and their shape (the image part of the cache key)."""
    digest = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()[:32]


class CachedPipeline:
    """Decode -> content hash -> (cached) model output: what every served model shares.

    Subclasses say what "encoding" an image means (:meth:`_encode`) and what is cached: the
    image embedding of a SAM-family model, the logits of a prompt-free segmenter.
    """

    repository_models: tuple[str, ...] = ()

    def __init__(self, info: ModelInfo, backend: Backend, cache: ImageCache, metrics: Observer,
                 limits: ImageLimits, max_prompts: int, timeout_s: float) -> None:
        self.info = info
        self._backend, self._cache, self._metrics = backend, cache, metrics
        self._limits, self._max_prompts, self._timeout = limits, max_prompts, timeout_s
        self._pending: dict[tuple[str, str, str], asyncio.Future] = {}

    async def _encode(self, decoded: DecodedImage) -> tuple[np.ndarray, Frame]:
        raise NotImplementedError

    def _decode(self, image: ImageInput) -> tuple[DecodedImage, str, float]:
        start = time.perf_counter()
        decoded = decode_image(image, self._limits)
        key = content_hash(decoded.pixels)
        return decoded, key, time.perf_counter() - start

    def check_request(self, request: SegmentRequest, frame: Frame) -> list[Prompt]:
        """Reject a request's prompts for an image of ``frame``'s size, or return them checked
        (what the model decodes); called once per request, before any model runs."""
        return []

    async def embed(self, image: ImageInput, request: SegmentRequest | None = None) -> tuple[str, CachedOutput, bool]:
        """Decode and encode ``image`` unless cached; returns (image_id, entry, was_cached).

        With ``request``, its prompts are checked against the decoded image's size before the
        (expensive) encoder runs, so a bad prompt never costs an encoder pass.
        """
        image_id, entry, cached, _ = await self._embed(image, request)
        return image_id, entry, cached

    async def _embed(self, image: ImageInput, request: SegmentRequest | None
                     ) -> tuple[str, CachedOutput, bool, list[Prompt] | None]:
        """:meth:`embed`, plus the request's checked prompts (``None`` without a request)."""
        decoded, image_hash, seconds = await asyncio.to_thread(self._decode, image)
        checked = None
        if request is not None:
            checked = self.check_request(request, Frame(decoded.height, decoded.width, self.info.input_size))
        self._metrics.observe_stage("decode_image", self.info.name, seconds)
        key = (self.info.name, self.info.version, image_hash)
        cached = self._cache.get(key)
        if cached is not None:
            self._metrics.cache_hit(self.info.name)
            return image_hash, cached, True, checked
        pending = self._pending.get(key)
        if pending is not None:  # the same image is being encoded for another request
            self._metrics.cache_hit(self.info.name)
            return image_hash, await asyncio.shield(pending), True, checked
        self._metrics.cache_miss(self.info.name)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            embedding, frame = await self._encode(decoded)
            entry = self._cache.put(key, embedding, frame)
            future.set_result(entry)
            return image_hash, entry, False, checked
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._pending[key]

    async def resolve(self, request: SegmentRequest) -> tuple[str, CachedOutput, list[Prompt]]:
        """The request's cached entry, by ``image_id`` or by decoding (and encoding) its image,
        and its prompts as :meth:`check_request` checked them (the only check of the request)."""
        if request.image_id:
            entry = self.lookup(request.image_id)
            return request.image_id, entry, self.check_request(request, entry.frame)
        if request.image is not None:
            image_id, entry, _, checked = await self._embed(request.image, request)
            return image_id, entry, checked
        raise errors.InvalidArgument("send an image or an image_id")

    def lookup(self, image_id: str) -> CachedOutput:
        entry = self._cache.get((self.info.name, self.info.version, image_id))
        if entry is None:
            raise errors.ImageNotFound(f"image_id {image_id!r} is unknown to model {self.info.name!r} or has "
                                       "expired from the cache; send the image again (EmbedImage or Segment)")
        self._metrics.cache_hit(self.info.name)
        return entry



class SamPipeline(CachedPipeline):
    """Serves one promptable model (image encoder + prompt decoder) through a backend: the
    steps of :class:`service.inference.predictor.SamPredictor`, each model call awaited on
    the backend."""

    def __init__(self, model: SamModel, backend: Backend, cache: ImageCache, metrics: Observer,
                 limits: ImageLimits, max_prompts: int, timeout_s: float) -> None:
        super().__init__(model.info, backend, cache, metrics, limits, max_prompts, timeout_s)
        self.model = model
        self.repository_models = (model.encoder.name, model.decoder.name)
        self.predictor = SamPredictor(model)

    async def _encode(self, decoded: DecodedImage) -> tuple[np.ndarray, Frame]:
        name = self.info.name
        with self._metrics.stage("preprocess", name):
            call, frame = await asyncio.to_thread(self.predictor.encoder_call, decoded.pixels)
        with self._metrics.stage("encoder", name):
            out = await self._backend.infer(call.model, call.inputs, call.outputs, self._timeout)
        return self.predictor.embedding(out, frame).tensor, frame

    def check_request(self, request: SegmentRequest, frame: Frame) -> list[Prompt]:
        return self.predictor.check_prompts(request.prompts, frame, self._max_prompts)

    async def decode_masks(self, entry: CachedOutput, checked: list[Prompt],
                           return_low_res_logits: bool = False) -> list[MaskResult]:
        """Masks for prompts already checked by :meth:`check_request` against ``entry``'s image."""
        frame = entry.frame
        embedding = Embedding(entry.output, frame)
        with self._metrics.stage("mask_decoder", self.info.name):
            results = []
            for indices, call in self.predictor.decoder_calls(embedding, checked):
                results.append((indices, await self._backend.infer(call.model, call.inputs, call.outputs,
                                                                   self._timeout)))
            logits, ious = self.predictor.logits_from(results, len(checked))
        with self._metrics.stage("postprocess", self.info.name):
            masks = await asyncio.to_thread(self.predictor.masks, logits, frame)
        keep = return_low_res_logits
        return [MaskResult(masks[i], float(np.clip(ious[i], 0.0, 1.0)), logits[i].copy() if keep else None)
                for i in range(len(checked))]

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        image_id, entry, checked = await self.resolve(request)
        masks = await self.decode_masks(entry, checked, request.return_low_res_logits)
        return SegmentResult(self.info, image_id, entry.frame.height, entry.frame.width, tuple(masks))

    async def warmup(self) -> None:
        """One encoder and one decoder run on a synthetic image, outside the cache."""
        size = self.info.input_size
        ramp = np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
        decoded = DecodedImage(ramp, "raw")
        embedding, frame = await self._encode(decoded)
        request = SegmentRequest(model=self.info.name, prompts=(Prompt(box=Box(size / 4, size / 4, size / 2, size / 2)),))
        await self.decode_masks(CachedOutput(embedding, frame, float("inf")), self.check_request(request, frame))
