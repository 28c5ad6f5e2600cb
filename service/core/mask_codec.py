"""Encode binary masks for the wire (no protobuf, no gRPC).

The server encodes ``SegmentResponse.masks`` here; the client decodes them with
:func:`medseg_client.masks.decode_mask` (all decoding lives in the client package). A mask
is a bool numpy array of shape ``(H, W)`` at the input image's size, row ``y``, column
``x``. The three encodings are those of ``medseg.v1.MaskEncoding``:

* :attr:`MaskEncoding.BITS`: ``np.packbits`` of the row-major flattened mask, most
  significant bit first, last byte zero-padded; ``ceil(H * W / 8)`` bytes.
* :attr:`MaskEncoding.PNG`: an 8-bit greyscale PNG, 0 = background, 255 = structure.
* :attr:`MaskEncoding.COCO_RLE`: the compressed ASCII ``counts`` string of
  ``pycocotools.mask.encode`` (column-major runs, starting with a background run).

The server only encodes masks it computed itself: a mask that is not 2-D or is empty
raises :class:`ValueError`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from service.core.domain import MaskEncoding

__all__ = ["encode_mask"]

_PNG_COMPRESS_LEVEL = 1  # fast; masks compress well at any level


def encode_mask(mask: np.ndarray, encoding: MaskEncoding) -> bytes:
    """Encode a ``(H, W)`` mask as bytes in ``encoding``.

    ``mask``: bool ``(H, W)`` with ``H, W >= 1``; a non-bool array is read as ``mask != 0``.
    Returns the payload for ``Mask.data``; the height and width travel separately.
    """
    mask = _as_bool_mask(mask)
    if encoding is MaskEncoding.BITS:
        return np.packbits(mask.ravel()).tobytes()
    if encoding is MaskEncoding.PNG:
        buffer = io.BytesIO()
        grey = mask.astype(np.uint8) * np.uint8(255)
        Image.fromarray(grey, mode="L").save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    if encoding is MaskEncoding.COCO_RLE:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return bytes(rle["counts"])
    raise ValueError(f"unsupported mask encoding {encoding!r}")


# --------------------------------------------------------------------------- helpers
def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.shape[0] < 1 or mask.shape[1] < 1:
        raise ValueError(f"mask size must be at least 1 x 1, got {mask.shape[0]} x {mask.shape[1]}")
    return mask if mask.dtype == np.bool_ else mask != 0
