"""Prompt-free segmenters (the U-Nets trained by ``training/``): decode -> preprocess ->
segmenter (cached per image) -> one mask for the whole image.

The cached "embedding" of a segmenter is its output logits, so a follow-up ``Segment`` on the
same ``image_id`` (another mask encoding, say) costs no model call.

A 2.5-D segmenter (``medseg.context_slices`` > 0: neighbouring slices as input channels) has
no 2-D image to work on: ``Segment`` and ``EmbedImage`` refuse it (INVALID_ARGUMENT, pointing at
the volume API);
``SegmentVolume`` feeds it (:mod:`service.inference.volumes`).
"""

from __future__ import annotations

import numpy as np

from service.core import errors
from service.backends.base import Backend
from service.core.domain import DecodedImage, ImageLimits, MaskEncoding, MaskResult, SegmentRequest, SegmentResult
from service.core.mask_codec import encode_mask
from service.core.request_memory import MASK_BYTES_PER_PIXEL, MASK_OVERHEAD, AnswerTooLarge
from service.inference import work
from service.inference.cache import ImageCache
from service.inference.observer import Observer
from service.backends.repository import SegmenterModel
from service.inference.pipeline import CachedPipeline
from service.core.geometry import Frame
from service.core.segmenter_io import input_channels, postprocess, preprocess, preprocess_context


class SegmenterPipeline(CachedPipeline):
    def __init__(self, model: SegmenterModel, backend: Backend, cache: ImageCache, metrics: Observer,
                 limits: ImageLimits, max_prompts: int, timeout_s: float) -> None:
        super().__init__(model.info, backend, cache, metrics, limits, max_prompts, timeout_s)
        self.model = model
        self.repository_models = (model.entry.name,)
        self._input = model.entry.inputs[0].name
        self._output = model.entry.outputs[0].name

    def _refuse_2d(self) -> None:
        if self.model.context:
            raise errors.InvalidArgument(
                f"model {self.info.name!r} is a 2.5-D segmenter: it reads each slice with its "
                f"{self.model.context} neighbouring slice(s) on each side, which one 2-D image does not have; "
                "upload the series or volume (UploadVolume) and call SegmentVolume with this model")

    async def embed(self, image, request: SegmentRequest | None = None):
        self._refuse_2d()     # before the image is decoded
        return await super().embed(image, request)

    async def _encode(self, decoded: DecodedImage) -> tuple[np.ndarray, Frame]:
        name = self.info.name
        with self._metrics.stage("preprocess", name):
            tensor, frame = await work.run_in_thread(preprocess, decoded.pixels, self.info.input_size)
        current = work.current()
        if current is not None:
            current.check("the segmenter")
        with self._metrics.stage("segmenter", name):
            out = await self._backend.infer(self.model.entry.name, {self._input: tensor}, [self._output],
                                            self._timeout)
        return out[self._output], frame

    def check_request(self, request: SegmentRequest, frame: Frame) -> None:
        if request.prompts or request.multimask_output:
            raise errors.UnsupportedPrompt(
                f"model {self.info.name!r} is a prompt-free segmenter: send no prompts; it segments "
                f"{self.model.structure} in the whole image (see ListModels)")

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        self._refuse_2d()
        image_id, entry, _ = await self.resolve(request)
        # upsampling works on every class channel at input size (argmax over more than two)
        channels = int(entry.output.shape[1]) if entry.output.ndim == 4 else 1
        await self._reserve_masks(request, entry.frame, 1, mask_factor=MASK_BYTES_PER_PIXEL * max(1, channels - 1))
        current = work.current()
        limit = current.answer_limit if current is not None else None
        with self._metrics.stage("postprocess", self.info.name):
            result = await work.run_in_thread(self._mask, entry, request.encoding, limit)
        return SegmentResult(self.info, image_id, entry.frame.height, entry.frame.width, (result,))

    @staticmethod
    def _mask(entry, encoding: MaskEncoding, limit: int | None) -> MaskResult:
        mask = postprocess(entry.output, entry.frame)
        # A segmenter has no IoU head: predicted_iou is 0 (documented in the proto).
        data, area = encode_mask(mask, encoding), int(np.count_nonzero(mask))
        if limit is not None and len(data) + MASK_OVERHEAD > limit:
            raise AnswerTooLarge(f"the answer would be over {limit} bytes ({encoding.value} mask of "
                                 f"{entry.frame.width}x{entry.frame.height}); the gateway sends at most that "
                                 "(--max-request-bytes)")
        return MaskResult(None, 0.0, None, encoded=data, area=area)

    async def warmup(self) -> None:
        size = self.info.input_size
        ramp = np.linspace(0.0, 1.0, size * size, dtype=np.float32).reshape(size, size)
        if not self.model.context:
            logits, frame = await self._encode(DecodedImage(ramp, "raw"))
        else:
            tensor, frame = preprocess_context([ramp] * input_channels(self.model.context), size)
            logits = (await self._backend.infer(self.model.entry.name, {self._input: tensor}, [self._output],
                                                self._timeout))[self._output]
        postprocess(logits, frame)
