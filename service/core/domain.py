"""Plain request/response types of the gateway (no protobuf, no gRPC).

The servicer converts protobuf messages to these at the edge (:mod:`service.edge.convert`); the
pipeline, cache and backends only ever see these dataclasses and numpy arrays.

Coordinate convention everywhere: input-image pixels, x = column, y = row, origin at the
top-left corner of the top-left pixel (a box over a whole W x H image is (0, 0, W, H)).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class Window:
    """Intensity window in native units (HU for CT): [center - width/2, center + width/2] -> [0, 1]."""

    center: float
    width: float


@dataclass(frozen=True)
class RawPixels:
    """An uncompressed pixel array as sent by a client.

    ``dtype``: numpy dtype name (``"uint8"``, ``"int16"``, ``"float32"``, ...), little-endian.
    ``shape``: ``(H, W)`` or ``(H, W, 3)``. ``data``: C-order bytes, ``prod(shape) * itemsize`` long.
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ImageInput:
    """Exactly one of ``encoded`` (PNG/JPEG/TIFF/DICOM/NIfTI bytes) or ``raw`` is set."""

    encoded: bytes | None = None
    raw: RawPixels | None = None
    window: Window | None = None
    slice_index: int | None = None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, intensity-normalised 2-D image.

    ``pixels``: float32, C-contiguous, ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB), values in [0, 1].
    ``spacing_mm``: (row, column) pixel spacing when the file states it, else ``None``.
    """

    pixels: np.ndarray
    source_format: str
    modality: str | None = None
    spacing_mm: tuple[float, float] | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked before any pixel buffer is allocated."""

    max_side: int = 8192
    max_pixels: int = 40_000_000
    max_encoded_bytes: int = 64 * 1024 * 1024


# --------------------------------------------------------------------------- prompts
class PromptKind(enum.Enum):
    BOX = "box"
    POINT = "point"
    MASK = "mask"


@dataclass(frozen=True)
class Box:
    """XYXY in input-image pixels."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Point:
    """(x, y) in input-image pixels; ``positive`` True for foreground, False for background."""

    x: float
    y: float
    positive: bool


@dataclass(frozen=True)
class Prompt:
    """One object to segment.

    ``mask_input``: float32 ``(h, w)`` low-resolution logits from a previous answer, in the
    model's low-resolution frame, or ``None``.
    """

    box: Box | None = None
    points: tuple[Point, ...] = ()
    mask_input: np.ndarray | None = None

    def kinds(self) -> set[PromptKind]:
        kinds: set[PromptKind] = set()
        if self.box is not None:
            kinds.add(PromptKind.BOX)
        if self.points:
            kinds.add(PromptKind.POINT)
        if self.mask_input is not None:
            kinds.add(PromptKind.MASK)
        return kinds


# --------------------------------------------------------------------------- masks
class MaskEncoding(enum.Enum):
    BITS = "bits"
    PNG = "png"
    COCO_RLE = "coco_rle"
    # one DICOM SEG for the whole answer (service/core/dicom_seg.py); the masks carry no data
    DICOM_SEG = "dicom_seg"


# the encodings of one mask's own payload (Mask.data): what service.core.mask_codec encodes
PAYLOAD_ENCODINGS = (MaskEncoding.BITS, MaskEncoding.PNG, MaskEncoding.COCO_RLE)


@dataclass(frozen=True)
class MaskResult:
    """One answer. ``mask``: bool ``(H, W)`` at input size; ``low_res_logits``: float32 or None.

    A pipeline that already encoded the mask for the wire (one mask at a time, so a request's
    memory stays O(H*W) whatever its prompt count) sets ``encoded`` (the payload in the
    request's encoding) and ``area`` (foreground pixels) and leaves ``mask`` ``None``."""

    mask: np.ndarray | None
    predicted_iou: float
    low_res_logits: np.ndarray | None = None
    encoded: bytes | None = None
    area: int | None = None
    prompt_index: int = 0  # the request's prompt this mask answers
    candidate: int = 0  # which of the decoder's candidates (0 for a single-mask answer)


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    input_size: int
    prompt_kinds: frozenset[PromptKind]
    required_prompt_kinds: frozenset[PromptKind]
    description: str = ""
    is_default: bool = False
    # candidate masks the prompt decoder gives per prompt (SAM: 3, of which one is returned
    # unless the request asks for all; LiteMedSAM: 1)
    mask_candidates: int = 1
    # neighbouring slices on each side a 2.5-D segmenter reads (0: 2-D; > 0: volumes only)
    context_slices: int = 0


@dataclass(frozen=True)
class SegmentRequest:
    model: str
    prompts: tuple[Prompt, ...]
    image: ImageInput | None = None
    image_id: str | None = None
    encoding: MaskEncoding = MaskEncoding.BITS
    return_low_res_logits: bool = False
    # every candidate mask of each prompt (a model with ModelInfo.mask_candidates > 1)
    multimask_output: bool = False
    # with encoding DICOM_SEG: a service.core.dicom_seg.SegOptions (None: the defaults)
    dicom_seg: object | None = None


@dataclass(frozen=True)
class SegmentResult:
    model: ModelInfo
    image_id: str
    height: int
    width: int
    masks: tuple[MaskResult, ...] = field(default_factory=tuple)
    dicom_seg: bytes | None = None   # encoding DICOM_SEG: the SEG instance (Part 10 bytes)


@dataclass(frozen=True)
class EmbedResult:
    model: ModelInfo
    image_id: str
    height: int
    width: int
    cached: bool
