"""The API edge: protobuf messages <-> domain dataclasses. Proto types stop here."""

from __future__ import annotations

import numpy as np

from medseg_client._generated import segmentation_pb2 as pb
from service.core import errors
from service.core.domain import (Box, EmbedResult, ImageInput, MaskEncoding, ModelInfo, Point, Prompt, PromptKind,
                            RawPixels, SegmentRequest, SegmentResult, Window)
from service.core.mask_codec import encode_mask

_DTYPES = {pb.DTYPE_UINT8: "uint8", pb.DTYPE_INT8: "int8", pb.DTYPE_UINT16: "uint16", pb.DTYPE_INT16: "int16",
           pb.DTYPE_UINT32: "uint32", pb.DTYPE_INT32: "int32", pb.DTYPE_FLOAT32: "float32",
           pb.DTYPE_FLOAT64: "float64"}
_ENCODINGS = {pb.MASK_ENCODING_UNSPECIFIED: MaskEncoding.BITS, pb.MASK_ENCODING_BITS: MaskEncoding.BITS,
              pb.MASK_ENCODING_PNG: MaskEncoding.PNG, pb.MASK_ENCODING_COCO_RLE: MaskEncoding.COCO_RLE}
_ENCODING_TO_PB = {MaskEncoding.BITS: pb.MASK_ENCODING_BITS, MaskEncoding.PNG: pb.MASK_ENCODING_PNG,
                   MaskEncoding.COCO_RLE: pb.MASK_ENCODING_COCO_RLE}
_KIND_TO_PB = {PromptKind.BOX: pb.PROMPT_KIND_BOX, PromptKind.POINT: pb.PROMPT_KIND_POINT,
               PromptKind.MASK: pb.PROMPT_KIND_MASK}
MAX_SHAPE_RANK = 3


def image_from_proto(msg: pb.Image) -> ImageInput:
    window = None
    if msg.HasField("window"):
        window = Window(msg.window.center, msg.window.width)
    slice_index = msg.slice_index if msg.HasField("slice_index") else None
    source = msg.WhichOneof("source")
    if source == "encoded":
        return ImageInput(encoded=msg.encoded, window=window, slice_index=slice_index)
    if source == "raw":
        raw = msg.raw
        if raw.dtype not in _DTYPES:
            raise errors.InvalidImage(f"raw.dtype must be one of {sorted(pb.DType.Name(d) for d in _DTYPES)}")
        if len(raw.shape) > MAX_SHAPE_RANK:
            raise errors.InvalidImage(f"raw.shape {list(raw.shape)} must be (height, width) or (height, width, 3)")
        return ImageInput(raw=RawPixels(_DTYPES[raw.dtype], tuple(raw.shape), raw.data), window=window,
                          slice_index=slice_index)
    raise errors.InvalidImage("image has neither encoded bytes nor a raw array")


def _logits_from_proto(msg: pb.LowResLogits, index: int) -> np.ndarray:
    n = int(msg.height) * int(msg.width)
    if n == 0 or len(msg.data) != 4 * n:
        raise errors.InvalidPrompt(f"prompt {index}: mask_input is {msg.height}x{msg.width} but carries "
                                   f"{len(msg.data)} bytes; expected {4 * n} (float32 little-endian)")
    return np.frombuffer(msg.data, dtype="<f4").reshape(msg.height, msg.width).astype(np.float32)


def prompt_from_proto(msg: pb.Prompt, index: int) -> Prompt:
    box = Box(msg.box.x0, msg.box.y0, msg.box.x1, msg.box.y1) if msg.HasField("box") else None
    points = tuple(Point(p.x, p.y, p.positive) for p in msg.points)
    mask = _logits_from_proto(msg.mask_input, index) if msg.HasField("mask_input") else None
    return Prompt(box=box, points=points, mask_input=mask)


def segment_request_from_proto(msg: pb.SegmentRequest, default_model: str) -> SegmentRequest:
    if msg.encoding not in _ENCODINGS:
        raise errors.InvalidArgument(f"unknown mask encoding {msg.encoding}")
    which = msg.WhichOneof("input")
    if which is None:
        raise errors.InvalidArgument("send an image or an image_id")
    return SegmentRequest(
        model=msg.model or default_model,
        prompts=tuple(prompt_from_proto(p, i) for i, p in enumerate(msg.prompts)),
        image=image_from_proto(msg.image) if which == "image" else None,
        image_id=msg.image_id if which == "image_id" else None,
        encoding=_ENCODINGS[msg.encoding],
        return_low_res_logits=msg.return_low_res_logits,
    )


def model_ref(info: ModelInfo) -> pb.ModelRef:
    return pb.ModelRef(name=info.name, version=info.version)


def segment_response_to_proto(result: SegmentResult, encoding: MaskEncoding) -> pb.SegmentResponse:
    masks = []
    for m in result.masks:
        msg = pb.Mask(height=result.height, width=result.width, encoding=_ENCODING_TO_PB[encoding],
                      data=encode_mask(m.mask, encoding), predicted_iou=m.predicted_iou, area=int(m.mask.sum()))
        if m.low_res_logits is not None:
            lr = m.low_res_logits
            msg.low_res_logits.CopyFrom(pb.LowResLogits(height=lr.shape[0], width=lr.shape[1],
                                                        data=lr.astype("<f4").tobytes()))
        masks.append(msg)
    return pb.SegmentResponse(masks=masks, model=model_ref(result.model), image_id=result.image_id,
                              height=result.height, width=result.width)


def embed_response_to_proto(result: EmbedResult) -> pb.EmbedImageResponse:
    return pb.EmbedImageResponse(image_id=result.image_id, model=model_ref(result.model), height=result.height,
                                 width=result.width, cached=result.cached)


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, version=info.version, input_size=info.input_size,
        prompt_kinds=sorted(_KIND_TO_PB[k] for k in info.prompt_kinds),
        required_prompt_kinds=sorted(_KIND_TO_PB[k] for k in info.required_prompt_kinds),
        description=info.description, is_default=info.is_default)
