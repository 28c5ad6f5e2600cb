"""The SAM-family request path as small named steps:
decode image -> preprocess -> encode (cached) -> validate prompts -> decode masks -> postprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import numpy as np

from service.core import errors
from service.core import prompts as prompt_rules
from service.backends.base import Backend
from service.core.domain import (Box, DecodedImage, ImageInput, ImageLimits, MaskResult, ModelInfo, Prompt,
                            SegmentRequest, SegmentResult)
from service.inference.cache import CachedEmbedding, EmbeddingCache
from service.core.imageio import decode_image
from service.inference.observer import Observer
from service.backends.repository import SamModel
from service.core.geometry import Frame, model_input, upsample_logits

DECODER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")


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

    def __init__(self, info: ModelInfo, backend: Backend, cache: EmbeddingCache, metrics: Observer,
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

    def check_request(self, request: SegmentRequest, frame: Frame) -> None:
        """Reject a request's prompts for an image of ``frame``'s size; called before any model runs."""

    async def embed(self, image: ImageInput, request: SegmentRequest | None = None) -> tuple[str, CachedEmbedding, bool]:
        """Decode and encode ``image`` unless cached; returns (image_id, entry, was_cached).

        With ``request``, its prompts are checked against the decoded image's size before the
        (expensive) encoder runs, so a bad prompt never costs an encoder pass.
        """
        decoded, image_hash, seconds = await asyncio.to_thread(self._decode, image)
        if request is not None:
            self.check_request(request, Frame(decoded.height, decoded.width, self.info.input_size))
        self._metrics.observe_stage("decode_image", self.info.name, seconds)
        key = (self.info.name, self.info.version, image_hash)
        cached = self._cache.get(key)
        if cached is not None:
            self._metrics.cache_hit(self.info.name)
            return image_hash, cached, True
        pending = self._pending.get(key)
        if pending is not None:  # the same image is being encoded for another request
            self._metrics.cache_hit(self.info.name)
            return image_hash, await asyncio.shield(pending), True
        self._metrics.cache_miss(self.info.name)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            embedding, frame = await self._encode(decoded)
            entry = self._cache.put(key, embedding, frame)
            future.set_result(entry)
            return image_hash, entry, False
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._pending[key]

    async def resolve(self, request: SegmentRequest) -> tuple[str, CachedEmbedding]:
        """The request's cached entry: by ``image_id``, or by decoding (and encoding) its image."""
        if request.image_id:
            entry = self.lookup(request.image_id)
            self.check_request(request, entry.frame)
            return request.image_id, entry
        if request.image is not None:
            image_id, entry, _ = await self.embed(request.image, request)
            return image_id, entry
        raise errors.InvalidArgument("send an image or an image_id")

    def lookup(self, image_id: str) -> CachedEmbedding:
        entry = self._cache.get((self.info.name, self.info.version, image_id))
        if entry is None:
            raise errors.ImageNotFound(f"image_id {image_id!r} is unknown to model {self.info.name!r} or has "
                                       "expired from the cache; send the image again (EmbedImage or Segment)")
        self._metrics.cache_hit(self.info.name)
        return entry



class SamPipeline(CachedPipeline):
    """Serves one promptable model (image encoder + prompt decoder) through a backend."""

    def __init__(self, model: SamModel, backend: Backend, cache: EmbeddingCache, metrics: Observer,
                 limits: ImageLimits, max_prompts: int, timeout_s: float) -> None:
        super().__init__(model.info, backend, cache, metrics, limits, max_prompts, timeout_s)
        self.model = model
        self.repository_models = (model.encoder.name, model.decoder.name)
        missing = set(DECODER_PROMPT_INPUTS) - set(model.decoder.input_names)
        if missing:
            raise ValueError(f"{model.decoder.name}/config.pbtxt lacks decoder inputs {sorted(missing)}")
        self._image_input = model.encoder.inputs[0].name
        self._embedding_output = model.encoder.outputs[0].name
        self._embedding_input = model.decoder.inputs[0].name
        self._mask_output, self._iou_output = model.decoder.output_names[:2]
        self._low_res = tuple(model.decoder.outputs[0].dims[-2:])

    async def _encode(self, decoded: DecodedImage) -> tuple[np.ndarray, Frame]:
        name = self.info.name
        with self._metrics.stage("preprocess", name):
            tensor, frame = await asyncio.to_thread(model_input, decoded.pixels, self.info.input_size)
        with self._metrics.stage("encoder", name):
            out = await self._backend.infer(self.model.encoder.name, {self._image_input: tensor},
                                            [self._embedding_output], self._timeout)
        return out[self._embedding_output], frame

    def check_request(self, request: SegmentRequest, frame: Frame) -> None:
        prompt_rules.validate(request.prompts, frame, self.info, self._max_prompts, self._low_res)

    async def decode_masks(self, entry: CachedEmbedding, request: SegmentRequest) -> list[MaskResult]:
        frame = entry.frame
        checked = prompt_rules.validate(request.prompts, frame, self.info, self._max_prompts, self._low_res)
        n = len(checked)
        logits = np.empty((n, *self._low_res), dtype=np.float32)
        ious = np.empty(n, dtype=np.float32)
        with self._metrics.stage("mask_decoder", self.info.name):
            for indices, feeds in prompt_rules.decoder_batches(checked, frame, self._low_res):
                feeds[self._embedding_input] = entry.embedding
                out = await self._backend.infer(self.model.decoder.name, feeds,
                                                [self._mask_output, self._iou_output], self._timeout)
                logits[indices] = out[self._mask_output][:, 0]
                ious[indices] = out[self._iou_output][:, 0]
        with self._metrics.stage("postprocess", self.info.name):
            full = await asyncio.to_thread(upsample_logits, logits, frame)
        keep = request.return_low_res_logits
        return [MaskResult(full[i] > 0.0, float(np.clip(ious[i], 0.0, 1.0)), logits[i].copy() if keep else None)
                for i in range(n)]

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        image_id, entry = await self.resolve(request)
        masks = await self.decode_masks(entry, request)
        return SegmentResult(self.info, image_id, entry.frame.height, entry.frame.width, tuple(masks))

    async def warmup(self) -> None:
        """One encoder and one decoder run on a synthetic image, outside the cache."""
        size = self.info.input_size
        ramp = np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
        decoded = DecodedImage(ramp, "raw")
        embedding, frame = await self._encode(decoded)
        request = SegmentRequest(model=self.info.name, prompts=(Prompt(box=Box(size / 4, size / 4, size / 2, size / 2)),))
        await self.decode_masks(CachedEmbedding(embedding, frame, float("inf")), request)
