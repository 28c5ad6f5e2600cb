"""Decode the binary masks of ``SegmentResponse.masks`` (no protobuf, no gRPC).

A mask is a bool numpy array of shape ``(H, W)`` at the input image's size, row ``y``,
column ``x``. The three encodings are those of ``medseg.v1.MaskEncoding``:

* :attr:`MaskEncoding.BITS`: ``np.packbits`` of the row-major flattened mask, most
  significant bit first, last byte zero-padded; ``ceil(H * W / 8)`` bytes.
* :attr:`MaskEncoding.PNG`: an 8-bit greyscale PNG, 0 = background, 255 = structure.
* :attr:`MaskEncoding.COCO_RLE`: the compressed ASCII ``counts`` string of
  ``pycocotools.mask.encode`` (column-major runs, starting with a background run); decoding
  it needs ``pycocotools`` (``pip install 'medseg-client[rle]'``).

Decoding never trusts the bytes: wrong lengths, sizes or malformed RLE raise
:class:`ValueError` with a message that says what was expected. (The server encodes with
``service.core.mask_codec``.)

``MASK_ENCODING_DICOM_SEG`` (``"dicom_seg"``) is not a mask encoding: a ``Segment`` answer in it
carries the masks' metadata with empty data and one DICOM SEG for all of them
(:func:`segment_encoding` accepts it; :func:`wire_encoding`, for the volume calls, refuses it).
"""

from __future__ import annotations

import enum
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg_client._optional import require
from medseg_client.wire import DICOM_SEG_ENCODING, MASK_ENCODING_TO_PB, MASK_ENCODINGS

__all__ = ["MaskEncoding", "decode_mask", "rle_counts", "segment_encoding", "wire_encoding"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MaskEncoding(enum.Enum):
    """How a mask travels; the values are the names of :data:`medseg_client.wire.MASK_ENCODINGS`.

    ``DICOM_SEG`` is for ``segment(...)`` on a DICOM image only: no mask travels in it (the answer's
    ``dicom_seg`` holds one SEG for all masks), so :func:`decode_mask` refuses it."""

    BITS = "bits"
    PNG = "png"
    COCO_RLE = "coco_rle"
    DICOM_SEG = "dicom_seg"


def decode_mask(data: bytes, height: int, width: int, encoding: MaskEncoding | str) -> np.ndarray:
    """Decode ``data`` into a bool ``(height, width)`` mask (C-contiguous).

    ``encoding``: a :class:`MaskEncoding` or its value (``"bits"``, ``"png"``, ``"coco_rle"``).
    Raises :class:`ValueError` when ``data`` does not hold a ``height x width`` mask in
    ``encoding`` (wrong byte count, wrong PNG size, RLE runs not summing to ``H * W``...),
    :class:`ImportError` for COCO RLE without ``pycocotools``.
    """
    try:
        encoding = MaskEncoding(encoding)
    except ValueError:
        raise ValueError(f"unsupported mask encoding {encoding!r}") from None
    if encoding is MaskEncoding.DICOM_SEG:
        raise ValueError("unsupported mask encoding 'dicom_seg': its masks carry no data (the pixels are in the "
                         "answer's DICOM SEG)")
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be at least 1 x 1, got {height} x {width}")
    data = bytes(data)
    if encoding is MaskEncoding.BITS:
        return _decode_bits(data, height, width)
    if encoding is MaskEncoding.PNG:
        return _decode_png(data, height, width)
    return _decode_rle(data, height, width)


def rle_counts(data: bytes) -> list[int]:
    """Parse a compressed COCO RLE ``counts`` string into its run lengths.

    Mirrors ``rleFrString`` of pycocotools: each value is 6-bit groups offset by 48
    (``'0'``), 5 payload bits per group, bit 0x20 = more groups follow, sign-extended from
    bit 0x10 of the last group; from the fourth value on, each is a delta to the value two
    places earlier. Runs alternate background/foreground, starting with background.
    Raises :class:`ValueError` on characters outside ``'0'..'o'``, a truncated value or a
    negative run.
    """
    counts: list[int] = []
    value, shift, more = 0, 0, False
    for position, byte in enumerate(data):
        group = byte - 48
        if not 0 <= group < 64:
            raise ValueError(f"COCO RLE counts: invalid character {chr(byte)!r} at offset {position}")
        value |= (group & 0x1F) << shift
        shift += 5
        more = bool(group & 0x20)
        if more:
            continue
        if group & 0x10:
            value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise ValueError(f"COCO RLE counts: negative run length at offset {position}")
        counts.append(value)
        value, shift = 0, 0
    if more:
        raise ValueError("COCO RLE counts: truncated (last value is incomplete)")
    return counts


# --------------------------------------------------------------------------- helpers
def _decode_bits(data: bytes, height: int, width: int) -> np.ndarray:
    n_pixels = height * width
    expected = (n_pixels + 7) // 8
    if len(data) != expected:
        raise ValueError(
            f"BITS mask of {height} x {width} needs ceil({n_pixels} / 8) = {expected} bytes, "
            f"got {len(data)}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n_pixels)
    return bits.astype(bool).reshape(height, width)


def _decode_png(data: bytes, height: int, width: int) -> np.ndarray:
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("PNG mask: data does not start with the PNG signature")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            # Image.open only reads the header: check the size before decoding pixels.
            if image.size != (width, height):
                raise ValueError(
                    f"PNG mask is {image.size[1]} x {image.size[0]} (H x W), "
                    f"expected {height} x {width}"
                )
            grey = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"PNG mask cannot be decoded: {exc}") from exc
    return np.ascontiguousarray(grey != 0)


def _decode_rle(data: bytes, height: int, width: int) -> np.ndarray:
    counts = rle_counts(data)
    total = sum(counts)
    if total != height * width:
        raise ValueError(
            f"COCO RLE runs sum to {total} pixels, expected {height} x {width} = {height * width}"
        )
    coco_mask = require("pycocotools.mask", "rle", "decoding a COCO RLE mask")
    decoded = coco_mask.decode({"size": [height, width], "counts": data})
    return np.ascontiguousarray(decoded.astype(bool))


def wire_encoding(encoding: "int | str | MaskEncoding") -> int:
    """The ``pb.MaskEncoding`` value of a mask encoding: a :class:`MaskEncoding`, its value
    (``"bits"``, ``"png"``, ``"coco_rle"``) or a wire value. :class:`ValueError` for anything else,
    ``MASK_ENCODING_DICOM_SEG`` included (a SEG is not a mask encoding: see :func:`segment_encoding`)."""
    if _is_dicom_seg(encoding):
        raise ValueError("MASK_ENCODING_DICOM_SEG is only for Segment on a DICOM image (segment(..., "
                         "encoding='dicom_seg')); a volume's SEG comes from get_segment_mask(..., dicom_seg=True)")
    if isinstance(encoding, MaskEncoding):
        return MASK_ENCODING_TO_PB[encoding.value]
    if isinstance(encoding, str):
        try:
            return MASK_ENCODING_TO_PB[MaskEncoding(encoding).value]
        except ValueError:
            raise ValueError(f"unknown mask encoding {encoding!r}") from None
    if int(encoding) not in MASK_ENCODINGS:
        raise ValueError(f"unknown mask encoding {encoding!r}")
    return int(encoding)


def segment_encoding(encoding: "int | str | MaskEncoding") -> int:
    """The ``pb.MaskEncoding`` of a 2-D ``Segment`` request: a mask encoding (see
    :func:`wire_encoding`) or the DICOM SEG (:attr:`MaskEncoding.DICOM_SEG`, ``"dicom_seg"``,
    ``"dicom-seg"`` or ``pb.MASK_ENCODING_DICOM_SEG``)."""
    return DICOM_SEG_ENCODING[0] if _is_dicom_seg(encoding) else wire_encoding(encoding)


def _is_dicom_seg(encoding: object) -> bool:
    if isinstance(encoding, MaskEncoding):
        return encoding is MaskEncoding.DICOM_SEG
    if isinstance(encoding, str):
        return encoding.strip().lower().replace("-", "_") == DICOM_SEG_ENCODING[1]
    return isinstance(encoding, int) and not isinstance(encoding, bool) and encoding == DICOM_SEG_ENCODING[0]
