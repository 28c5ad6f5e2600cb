"""The SAM-family request path as small named steps:
decode image -> preprocess -> encode (cached) -> validate prompts -> decode masks -> postprocess.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from typing import Awaitable

import numpy as np

from service.core import errors
from service.backends.base import Backend
from service.core.domain import (Box, DecodedImage, ImageInput, ImageLimits, MaskEncoding, MaskResult, ModelInfo,
                            Prompt, SegmentRequest, SegmentResult)
from service.inference import work
from service.inference.cache import CachedOutput, ImageCache
from service.core.imageio import decode_image
from service.inference.observer import Observer
from service.backends.repository import SamModel
from service.core.geometry import Frame
from service.core.mask_codec import encode_mask
from service.core.request_memory import (LOW_RES_DEFAULT, MASK_BYTES_PER_PIXEL, MASK_OVERHEAD, AnswerTooLarge,
                                         segment_estimate)
from service.inference.predictor import DECODER_PROMPT_INPUTS, Embedding, SamPredictor  # noqa: F401


def content_hash(pixels: np.ndarray) -> str:
    """Hex digest of the decoded pixels and their shape (the image part of the cache key)."""
    digest = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()[:32]


# Prompts per mask-decoder run. ONNX Runtime's CPU arena grows by ~32 MiB per prompt in one
# run and keeps it (measured: one run of 32 prompts, +1 GiB RSS for good; 4 prompts, ~+0.1 GiB),
# so a request's decoder memory is bounded by this, not by its prompt count.
DECODER_BATCH = 4


class SharedEncode:
    """The single-flight encode of one image, which several calls may wait for: it belongs to
    none of them.

    It runs as a task of its own, in a context of its own (no caller's deadline, cache scope
    or :class:`work.CallWork`; it has its own, so its threads stop when it is stopped), bounded
    by the backend's configured timeout. Every waiter, the first included, awaits it shielded,
    under its own deadline: a waiter that is cancelled or whose deadline passes leaves alone,
    and the others keep waiting. When the last waiter has left, the work is stopped (nobody
    would use it) and removed, so the next call for that image starts afresh.
    """

    def __init__(self, key: tuple, coro: Awaitable[CachedOutput], pending: dict) -> None:
        self.key, self._pending = key, pending
        self.work = work.CallWork()
        self.waiters = 0
        self.task = asyncio.get_running_loop().create_task(self._run(coro), context=contextvars.Context())
        self.task.add_done_callback(self._done)

    async def _run(self, coro: Awaitable[CachedOutput]) -> CachedOutput:
        with work.bound(self.work):
            return await coro

    def _done(self, task: asyncio.Task) -> None:
        if self._pending.get(self.key) is self:
            del self._pending[self.key]
        if not task.cancelled():
            task.exception()  # retrieved: each waiter re-raises it, nobody else must log it

    def stop(self) -> None:
        self.work.abandon()
        self.task.cancel()
        if self._pending.get(self.key) is self:
            del self._pending[self.key]

    async def wait(self) -> CachedOutput:
        self.waiters += 1
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.task.cancelled() and not (me is not None and me.cancelling()):
                # stopped while this waiter still waited (shutdown): a status, never silence
                raise errors.Unavailable("the encoding of this image was stopped; retry") from None
            raise
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.task.done():
                self.stop()


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
        self._pending: dict[tuple, SharedEncode] = {}

    async def _encode(self, decoded: DecodedImage) -> tuple[np.ndarray, Frame]:
        raise NotImplementedError

    def _decode(self, image: ImageInput) -> tuple[DecodedImage, str, float]:
        start = time.perf_counter()
        decoded = decode_image(image, self._limits)
        call = work.current()
        if call is not None:
            call.check("hashing the image")
        key = content_hash(decoded.pixels)
        return decoded, key, time.perf_counter() - start

    def frame_for(self, height: int, width: int) -> Frame:
        """How an image of this size sits in the model input."""
        return Frame(height, width, self.info.input_size)

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
        decoded, image_hash, seconds = await work.run_in_thread(self._decode, image)
        checked = None
        if request is not None:
            checked = self.check_request(request, self.frame_for(decoded.height, decoded.width))
        self._metrics.observe_stage("decode_image", self.info.name, seconds)
        # the id this caller's scope sees (HMAC, see service.inference.cache), and its entry's key
        image_hash = self._cache.image_id(self.info.name, self.info.version, image_hash)
        key = self._cache.key(self.info.name, self.info.version, image_hash)
        cached = self._cache.get(key)
        if cached is not None:
            self._metrics.cache_hit(self.info.name)
            return image_hash, cached, True, checked
        call = work.current()
        if call is not None:
            call.check("encoding the image")
        shared = self._pending.get(key)
        joined = shared is not None
        if joined:  # the same image is being encoded for another request
            self._metrics.cache_hit(self.info.name)
        else:
            self._metrics.cache_miss(self.info.name)
            shared = self._pending[key] = SharedEncode(key, self._encode_into(key, decoded), self._pending)
        del decoded  # the shared work holds it as long as it needs it
        entry = await shared.wait()
        return image_hash, entry, joined, checked

    async def _encode_into(self, key: tuple, decoded: DecodedImage) -> CachedOutput:
        """Encode ``decoded`` and cache the result under ``key`` (run as a :class:`SharedEncode`)."""
        embedding, frame = await self._encode(decoded)
        return self._cache.put(key, embedding, frame)

    async def _reserve_masks(self, request: SegmentRequest, frame: Frame, masks: int,
                             low_res: tuple[int, int] = LOW_RES_DEFAULT, mask_factor: int = MASK_BYTES_PER_PIXEL) -> None:
        """Before any mask is computed: refuse an answer that cannot fit the call's send limit,
        and charge the call what its masks and answer need (now that the image size is known:
        a call on an ``image_id`` learns it only here)."""
        call = work.current()
        if call is None:
            return
        call.check("decoding masks")
        estimate = segment_estimate(request, self._limits, call.answer_limit, frame.height, frame.width, masks,
                                    low_res, mask_factor, decode=False)
        await call.reserve(estimate.total)

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
        entry = self._cache.get(self._cache.key(self.info.name, self.info.version, image_id))
        if entry is None:
            raise errors.ImageNotFound(f"image_id {errors.shorten(image_id)} is unknown to model {self.info.name!r} "
                                       "or has expired from the cache; send the image again (EmbedImage or Segment)")
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
            call, frame = await work.run_in_thread(self.predictor.encoder_call, decoded.pixels)
        current = work.current()
        if current is not None:
            current.check("the image encoder")
        with self._metrics.stage("encoder", name):
            out = await self._backend.infer(call.model, call.inputs, call.outputs, self._timeout)
        return self.predictor.embedding(out, frame).tensor, frame

    def frame_for(self, height: int, width: int) -> Frame:
        return self.predictor.frame(height, width)

    def check_request(self, request: SegmentRequest, frame: Frame) -> list[Prompt]:
        if request.multimask_output and self.info.mask_candidates == 1:
            raise errors.UnsupportedPrompt(f"model {self.info.name!r} answers one mask per prompt; send "
                                           "multimask_output false, or use a model with mask_candidates > 1 "
                                           "(see ListModels)")
        return self.predictor.check_prompts(request.prompts, frame, self._max_prompts)

    def masks_per_prompt(self, request: SegmentRequest) -> int:
        return self.info.mask_candidates if request.multimask_output else 1

    async def decode_masks(self, entry: CachedOutput, checked: list[Prompt], return_low_res_logits: bool = False,
                           encoding: MaskEncoding | None = None, candidates: bool = False) -> list[MaskResult]:
        """Masks for prompts already checked by :meth:`check_request` against ``entry``'s image.

        Upsampled and thresholded one prompt at a time (the float32 logits at input size exist
        for one prompt only); with ``encoding`` each mask is also encoded for the wire at once
        and only its bytes are kept (:attr:`MaskResult.encoded`), so the memory of this step is
        O(H*W), not O(prompts*H*W). The answer is refused as soon as it would exceed the call's
        send limit (:attr:`work.CallWork.answer_limit`), before the remaining masks are computed.
        """
        frame = entry.frame
        embedding = Embedding(entry.output, frame)
        current = work.current()
        with self._metrics.stage("mask_decoder", self.info.name):
            results = []
            for start in range(0, len(checked), DECODER_BATCH):
                if current is not None:
                    current.check(f"the mask decoder (prompt {start})")
                for indices, call in self.predictor.decoder_calls(embedding, checked[start:start + DECODER_BATCH]):
                    out = await self._backend.infer(call.model, call.inputs, call.outputs, self._timeout)
                    results.append(([start + i for i in indices], out))
            logits, ious = self.predictor.logits_from(results, checked, candidates)
        del results
        # one row per answered mask, prompt-major: (prompt index, candidate index)
        which = [(i, c) for i in range(len(checked)) for c in range(logits.shape[1] if candidates else 1)]
        if candidates:
            logits, ious = logits.reshape(-1, *logits.shape[2:]), ious.reshape(-1)
        limit = current.answer_limit if current is not None else None
        with self._metrics.stage("postprocess", self.info.name):
            return await work.run_in_thread(self._masks, logits, ious, frame, return_low_res_logits, encoding, limit,
                                            which)

    def _masks(self, logits: np.ndarray, ious: np.ndarray, frame: Frame, keep_logits: bool,
               encoding: MaskEncoding | None, limit: int | None, which: list[tuple[int, int]]) -> list[MaskResult]:
        call = work.current()
        out: list[MaskResult] = []
        total = 0
        for i in range(len(logits)):
            if call is not None:
                call.check(f"mask {i}")
            mask = self.predictor.upsample(logits[i:i + 1], frame)[0] > 0.0
            low = logits[i].copy() if keep_logits else None
            iou = float(np.clip(ious[i], 0.0, 1.0))
            prompt_index, candidate = which[i]
            if encoding is None:
                out.append(MaskResult(mask, iou, low, prompt_index=prompt_index, candidate=candidate))
                continue
            data, area = encode_mask(mask, encoding), int(np.count_nonzero(mask))
            del mask
            total += len(data) + MASK_OVERHEAD + (0 if low is None else low.nbytes + 32)
            if limit is not None and total > limit:
                raise AnswerTooLarge(f"the answer would be over {limit} bytes after {i + 1} of {len(logits)} "
                                     f"{encoding.value} masks of {frame.width}x{frame.height}; the gateway sends at "
                                     "most that (--max-request-bytes): send fewer prompts or a smaller image")
            out.append(MaskResult(None, iou, low, encoded=data, area=area, prompt_index=prompt_index,
                                  candidate=candidate))
        return out

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        image_id, entry, checked = await self.resolve(request)
        await self._reserve_masks(request, entry.frame, len(checked) * self.masks_per_prompt(request),
                                  self.predictor.low_res)
        masks = await self.decode_masks(entry, checked, request.return_low_res_logits, request.encoding,
                                        request.multimask_output)
        return SegmentResult(self.info, image_id, entry.frame.height, entry.frame.width, tuple(masks))

    async def warmup(self) -> None:
        """One encoder and one decoder run on a synthetic image, outside the cache."""
        size = self.info.input_size
        ramp = np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
        decoded = DecodedImage(ramp, "raw")
        embedding, frame = await self._encode(decoded)
        request = SegmentRequest(model=self.info.name, prompts=(Prompt(box=Box(size / 4, size / 4, size / 2, size / 2)),))
        await self.decode_masks(CachedOutput(embedding, frame, float("inf")), self.check_request(request, frame))
