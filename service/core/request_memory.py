"""What one request will allocate, estimated before any pixel is decoded (no gRPC, no model).

Admission (:mod:`service.edge.admission`) charges every call its estimate against a memory
budget, so the calls it lets run at once fit the pod's memory limit whatever their shape. A
call's peak is the request it holds plus the larger of two phases that never overlap:

* **decode**: the container bytes the decoder copies, the native pixel array, and the
  float stages of normalisation and preprocessing (float64 working copies, the percentile
  copy, clipping, the float32 result, the resize input);
* **masks + answer**: masks are upsampled, thresholded and encoded one prompt at a time
  (:data:`MASK_BYTES_PER_PIXEL`: the float32 logits at input size, Pillow's buffer and its
  bytes, the bool mask, the encoder's copies), so this phase is O(H*W) however many prompts
  there are; the encoded answer is held three times at its peak (the encoded masks, the
  protobuf message, its serialised bytes), and never above the send limit, because an
  answer over the limit is refused (:func:`check_answer`).

The image size and the decode phase come from the decoder's own header-only estimate
(:func:`service.core.imageio.estimate_decode_bytes`: the raw array's shape, PNG IHDR, JPEG
SOF, TIFF first IFD, DICOM Rows/Columns, NIfTI dims); an image the decoder will refuse from
its header alone is charged nothing for it (it is refused at once).

The factors were measured from ``/proc/PID/status`` of a real gateway (``VmHWM``), see
docs/RELIABILITY.md ("Memory per request"); they err on the high side.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core import errors, imageio
from service.core.domain import ImageInput, ImageLimits, MaskEncoding, SegmentRequest

__all__ = ["AnswerTooLarge", "ImageFootprint", "MemoryEstimate", "answer_bounds", "check_answer",
           "embed_estimate", "image_footprint", "mib", "segment_estimate"]

MASK_BYTES_PER_PIXEL = 16    # per pixel of the input image, one mask at a time
ANSWER_COPIES = 3            # encoded masks + protobuf message + serialised bytes
FIXED_BYTES = 16 * 1024 * 1024  # embedding copies, decoder feeds and outputs, Python objects
MASK_OVERHEAD = 64           # protobuf framing of one Mask
LOW_RES_DEFAULT = (256, 256)  # LiteMedSAM's low-res logits, until the model says otherwise


AnswerTooLarge = errors.AnswerTooLarge


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


@dataclass(frozen=True)
class ImageFootprint:
    """An image's size and what decoding it allocates, from its header or shape."""

    height: int
    width: int
    decode_bytes: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one call allocates in each phase (see the module doc); :attr:`total` is charged."""

    request: int = 0
    decode: int = 0
    masks: int = 0
    answer: int = 0
    height: int | None = None
    width: int | None = None

    @property
    def total(self) -> int:
        return FIXED_BYTES + self.request + max(self.decode, self.masks + self.answer)

    def describe(self) -> str:
        size = f"a {self.width}x{self.height} image, " if self.height else ""
        return (f"about {mib(self.total)} ({size}decode {mib(self.decode)}, masks {mib(self.masks)}, "
                f"answer {mib(self.answer)})")


# --------------------------------------------------------------------------- the image
def image_footprint(image: ImageInput | None, limits: ImageLimits = ImageLimits()) -> ImageFootprint | None:
    """The image's size and decode bytes, read from its header or shape without decoding
    (:func:`service.core.imageio.estimate_decode_bytes`); ``None`` when there is no image or
    the decoder will refuse it from its header alone (it says why, at once)."""
    if image is None or (image.raw is None and not image.encoded):
        return None
    try:
        estimate = imageio.estimate_decode_bytes(image, limits)
    except errors.ServiceError:
        return None
    return ImageFootprint(estimate.height, estimate.width, int(estimate))


# --------------------------------------------------------------------------- the answer
SEG_HEADER_BYTES = 256 * 1024   # a DICOM SEG's header and references, beyond its frames
def answer_bounds(height: int, width: int, masks: int, encoding: MaskEncoding, low_res_logits: bool = False,
                  low_res: tuple[int, int] = LOW_RES_DEFAULT) -> tuple[int, int]:
    """(least, most) bytes of the serialised answer: the payloads alone (bit-packed masks
    exactly, low-res logits exactly, PNG and COCO RLE at their smallest), and with every
    mask incompressible plus the protobuf framing. Refusing on ``least`` never refuses an
    answer that would have fit; charging ``most`` never charges too little."""
    pixels = height * width
    logits = 4 * low_res[0] * low_res[1] if low_res_logits else 0
    if encoding is MaskEncoding.BITS:
        least = most = (pixels + 7) // 8
    elif encoding is MaskEncoding.PNG:
        least, most = 60, pixels + height + 6 * (pixels // 16384 + 1) + 128
    elif encoding is MaskEncoding.DICOM_SEG:
        # one SEG: 1 bit per pixel of each non-empty frame, plus per-frame items and the header
        # copied from the source (SEG_HEADER_BYTES covers a large one)
        least, most = 0, (pixels + 7) // 8 + 2048
        return masks * logits, SEG_HEADER_BYTES + masks * (most + logits + MASK_OVERHEAD)
    else:
        least, most = 2, pixels + 64
    return masks * (least + logits), 256 + masks * (most + logits + MASK_OVERHEAD)


def check_answer(least: int, limit: int | None, what: str) -> None:
    """Refuse an answer whose smallest possible size is over ``limit`` (before the work)."""
    if limit is not None and least > limit:
        raise AnswerTooLarge(f"the answer ({what}) would be at least {least} bytes; the gateway sends at most "
                             f"{limit} bytes (--max-request-bytes): send fewer prompts, a smaller image, or ask "
                             "for PNG or COCO RLE masks")


def _masks_estimate(height: int, width: int, masks: int, encoding: MaskEncoding, low_res_logits: bool,
                    answer_limit: int | None, low_res: tuple[int, int], mask_factor: int) -> tuple[int, int]:
    least, most = answer_bounds(height, width, masks, encoding, low_res_logits, low_res)
    what = f"{masks} {encoding.value} mask(s) of {width}x{height}" + (" with low-res logits" if low_res_logits else "")
    check_answer(least, answer_limit, what)
    answer = ANSWER_COPIES * (most if answer_limit is None else min(most, answer_limit))
    return height * width * mask_factor, answer


def segment_estimate(request: SegmentRequest, limits: ImageLimits = ImageLimits(), answer_limit: int | None = None,
                     height: int | None = None, width: int | None = None, masks: int | None = None,
                     low_res: tuple[int, int] = LOW_RES_DEFAULT, mask_factor: int = MASK_BYTES_PER_PIXEL,
                     decode: bool = True) -> MemoryEstimate:
    """The estimate of a Segment call; ``height``/``width`` when known (a cached or decoded
    image), else from the image's header; ``decode`` False: the decode phase is over (only
    the request, masks and answer count). Raises :class:`AnswerTooLarge` when the answer
    cannot fit ``answer_limit``."""
    image = request.image
    request_bytes = 0
    decode_bytes = 0
    if image is not None:
        request_bytes = len(image.encoded or b"") or len(image.raw.data if image.raw is not None else b"")
    if image is not None and decode:
        footprint = image_footprint(image, limits)
        if footprint is not None:
            decode_bytes = footprint.decode_bytes
            if height is None:
                height, width = footprint.height, footprint.width
    request_bytes += sum(4 * p.mask_input.size for p in request.prompts if p.mask_input is not None)
    mask_bytes = answer = 0
    if height is not None and width is not None:
        count = masks if masks is not None else max(1, len(request.prompts)) * (3 if request.multimask_output else 1)
        mask_bytes, answer = _masks_estimate(height, width, count, request.encoding, request.return_low_res_logits,
                                             answer_limit, low_res, mask_factor)
    return MemoryEstimate(request_bytes, decode_bytes, mask_bytes, answer, height, width)


def embed_estimate(image: ImageInput | None, limits: ImageLimits = ImageLimits()) -> MemoryEstimate:
    """The estimate of an EmbedImage call: the request and its decode (the answer is tiny)."""
    if image is None:
        return MemoryEstimate()
    request_bytes = len(image.encoded or b"") or len(image.raw.data if image.raw is not None else b"")
    footprint = image_footprint(image, limits)
    if footprint is None:
        return MemoryEstimate(request_bytes)
    return MemoryEstimate(request_bytes, footprint.decode_bytes, 0, 0, footprint.height, footprint.width)
