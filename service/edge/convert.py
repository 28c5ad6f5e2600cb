"""The API edge: protobuf messages <-> domain dataclasses. Proto types stop here: the servicer
reads and builds messages only through these functions (requests, responses, the audit
fields, the request parsers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from pydicom.sr.coding import Code

from medseg_client import wire
from medseg_client._generated import segmentation_pb2 as pb
from service.core import errors
from service.core.dicom_seg import KINDS, SegmentSpec, SegOptions
from service.core.domain import (Box, EmbedResult, ImageInput, MaskEncoding, ModelInfo, Point, Prompt, PromptKind,
                            RawPixels, SegmentRequest, SegmentResult, Window)
from service.core.mask_codec import encode_mask

# The wire enums are mapped to names once, in the client package (medseg_client.wire); here
# the names become the domain's types (numpy dtype names, MaskEncoding by value).
_DTYPES = wire.DTYPES
_ENCODINGS = {code: MaskEncoding(name) for code, name in wire.MASK_ENCODINGS.items()}
_ENCODING_TO_PB = {MaskEncoding(name): code for name, code in wire.MASK_ENCODING_TO_PB.items()}
_KIND_TO_PB = {PromptKind.BOX: pb.PROMPT_KIND_BOX, PromptKind.POINT: pb.PROMPT_KIND_POINT,
               PromptKind.MASK: pb.PROMPT_KIND_MASK}
MAX_SHAPE_RANK = 3


def window_from_proto(msg: pb.Window) -> Window:
    return Window(msg.center, msg.width)


def box_from_proto(msg: pb.Box) -> Box:
    return Box(msg.x0, msg.y0, msg.x1, msg.y1)


def mask_encoding_from_proto(value: int) -> MaskEncoding:
    """``pb.MaskEncoding`` -> the domain's (UNSPECIFIED is BITS); InvalidArgument for an unknown value."""
    if value not in _ENCODINGS:
        raise errors.InvalidArgument(f"unknown mask encoding {value}; use one of "
                                     f"{', '.join(pb.MaskEncoding.Name(v) for v in sorted(_ENCODINGS))}")
    return _ENCODINGS[value]


def mask_to_proto(height: int, width: int, encoding: MaskEncoding, data: bytes, predicted_iou: float,
                  area: int) -> pb.Mask:
    return pb.Mask(height=height, width=width, encoding=_ENCODING_TO_PB[encoding], data=data,
                   predicted_iou=predicted_iou, area=area)


_SEG_KINDS = {pb.SEG_KIND_UNSPECIFIED: "binary", pb.SEG_KIND_BINARY: "binary", pb.SEG_KIND_LABELMAP: "labelmap"}
assert set(_SEG_KINDS.values()) <= set(KINDS)


def _code_from_proto(msg: pb.Code, what: str) -> Code:
    if not (msg.scheme_designator and msg.value and msg.meaning):
        raise errors.InvalidArgument(f"{what} needs scheme_designator, value and meaning (e.g. SCT, 10200004, Liver)")
    try:
        return Code(msg.value, msg.scheme_designator, msg.meaning)
    except (TypeError, ValueError):
        raise errors.InvalidArgument(f"{what} is not a valid code") from None


def seg_options_from_proto(msg: pb.DicomSegOptions) -> SegOptions:
    """``DicomSegOptions`` -> :class:`SegOptions` (codes checked again by the SEG writer)."""
    if msg.kind not in _SEG_KINDS:
        raise errors.InvalidArgument(f"unknown dicom_seg kind {msg.kind}; use SEG_KIND_BINARY or SEG_KIND_LABELMAP")
    specs = []
    for i, seg in enumerate(msg.segments, 1):
        codes = [_code_from_proto(getattr(seg, name), f"segment {i}'s {name}") if seg.HasField(name) else None
                 for name in ("category", "type", "type_modifier")]
        specs.append(SegmentSpec(seg.label, *codes))
    return SegOptions(tuple(specs), _SEG_KINDS[msg.kind], msg.series_description)


def image_from_proto(msg: pb.Image) -> ImageInput:
    window = window_from_proto(msg.window) if msg.HasField("window") else None
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
    box = box_from_proto(msg.box) if msg.HasField("box") else None
    points = tuple(Point(p.x, p.y, p.positive) for p in msg.points)
    mask = _logits_from_proto(msg.mask_input, index) if msg.HasField("mask_input") else None
    return Prompt(box=box, points=points, mask_input=mask)


def segment_request_from_proto(msg: pb.SegmentRequest, model: str) -> SegmentRequest:
    """``model``: the served model's name, resolved from ``msg.model`` by
    :meth:`service.inference.gateway.Gateway.model_name` (the one place the default applies)."""
    encoding = mask_encoding_from_proto(msg.encoding)
    which = msg.WhichOneof("input")
    if which is None:
        raise errors.InvalidArgument("send an image or an image_id")
    return SegmentRequest(
        model=model,
        prompts=tuple(prompt_from_proto(p, i) for i, p in enumerate(msg.prompts)),
        image=image_from_proto(msg.image) if which == "image" else None,
        image_id=msg.image_id if which == "image_id" else None,
        encoding=encoding,
        return_low_res_logits=msg.return_low_res_logits,
        multimask_output=msg.multimask_output,
        dicom_seg=_dicom_seg_of(msg, encoding),
    )


def _dicom_seg_of(msg: pb.SegmentRequest, encoding: MaskEncoding) -> SegOptions | None:
    if encoding is not MaskEncoding.DICOM_SEG:
        if msg.HasField("dicom_seg"):
            raise errors.InvalidArgument("dicom_seg options need encoding MASK_ENCODING_DICOM_SEG")
        return None
    return seg_options_from_proto(msg.dicom_seg)


def model_ref(info: ModelInfo) -> pb.ModelRef:
    return pb.ModelRef(name=info.name, version=info.version)


def segment_response_to_proto(result: SegmentResult, encoding: MaskEncoding) -> pb.SegmentResponse:
    masks = []
    for m in result.masks:
        if encoding is MaskEncoding.DICOM_SEG:
            data = b""   # the masks are in result.dicom_seg
        else:
            data = m.encoded if m.encoded is not None else encode_mask(m.mask, encoding)
        area = m.area if m.area is not None else int(m.mask.sum())
        msg = mask_to_proto(result.height, result.width, encoding, data, m.predicted_iou, area)
        msg.prompt_index, msg.candidate = m.prompt_index, m.candidate
        if m.low_res_logits is not None:
            lr = m.low_res_logits
            msg.low_res_logits.CopyFrom(pb.LowResLogits(height=lr.shape[0], width=lr.shape[1],
                                                        data=lr.astype("<f4").tobytes()))
        masks.append(msg)
    return pb.SegmentResponse(masks=masks, model=model_ref(result.model), image_id=result.image_id,
                              height=result.height, width=result.width, dicom_seg=result.dicom_seg or b"")


def embed_response_to_proto(result: EmbedResult) -> pb.EmbedImageResponse:
    return pb.EmbedImageResponse(image_id=result.image_id, model=model_ref(result.model), height=result.height,
                                 width=result.width, cached=result.cached)


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name, version=info.version, input_size=info.input_size,
        prompt_kinds=sorted(_KIND_TO_PB[k] for k in info.prompt_kinds),
        required_prompt_kinds=sorted(_KIND_TO_PB[k] for k in info.required_prompt_kinds),
        description=info.description, is_default=info.is_default, mask_candidates=info.mask_candidates,
        context_slices=info.context_slices)


def embed_image_from_proto(msg: pb.EmbedImageRequest) -> ImageInput:
    if not msg.HasField("image"):
        raise errors.InvalidImage("EmbedImage needs an image")
    return image_from_proto(msg.image)


def list_models_response(models: Iterable[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_info_to_proto(m) for m in models])


# ----------------------------------------------------------------- what the servicer reads of a call
SERVICE = pb.DESCRIPTOR.services_by_name["Segmentation"]
SERVICE_NAME = SERVICE.full_name


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of its type.

    gRPC would answer a deserializer exception with UNKNOWN; the servicer turns this into
    INVALID_ARGUMENT instead (a client error, not ours).
    """

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def tolerant_parser(message_class) -> Callable[[bytes], object]:
    """A request parser that never raises: bytes that are no ``message_class`` become :class:`Undecodable`."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf DecodeError and friends: a client error
            return Undecodable(message_class.DESCRIPTOR.full_name)

    return parse


def segmentation_codecs() -> dict[str, tuple[Callable[[bytes], object], Callable[[object], bytes]]]:
    """Segmentation method name -> (request parser that never raises, see :class:`Undecodable`;
    response serializer)."""
    codecs = {}
    for method in SERVICE.methods:
        request_class, response_class = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        codecs[method.name] = (tolerant_parser(request_class), response_class.SerializeToString)
    return codecs


@dataclass(frozen=True)
class RequestSummary:
    """What the servicer's guard reads of a request before it runs: the model name it sends
    (``None``: the method names no model; ``""``: the default), and its prompt count and raw
    image size where it carries them. A name and numbers, never other request text (the audit
    line copies these)."""

    model: str | None = None
    prompts: int | None = None
    image_size: tuple[int, int] | None = None


def _raw_size(msg: pb.Image) -> tuple[int, int] | None:
    if msg.WhichOneof("source") == "raw" and len(msg.raw.shape) >= 2:
        return int(msg.raw.shape[0]), int(msg.raw.shape[1])
    return None


def request_summary(msg: object) -> RequestSummary:
    if isinstance(msg, pb.SegmentRequest):
        image = _raw_size(msg.image) if msg.WhichOneof("input") == "image" else None
        return RequestSummary(msg.model, len(msg.prompts), image)
    if isinstance(msg, pb.EmbedImageRequest):
        return RequestSummary(msg.model, None, _raw_size(msg.image) if msg.HasField("image") else None)
    return RequestSummary()


def response_size(msg: object) -> tuple[int, int] | None:
    """(height, width) of the image a response describes, when it describes one."""
    if isinstance(msg, (pb.SegmentResponse, pb.EmbedImageResponse)) and msg.height:
        return int(msg.height), int(msg.width)
    return None
