"""Build ``medseg.v1.Image`` messages from files and numpy arrays.

Encoded formats (PNG, JPEG, TIFF, DICOM, NIfTI) are sent as the file's bytes, unchanged:
the server decodes them and recognises the format from the bytes. ``.npy`` arrays are sent
as ``RawArray`` (little-endian, C order).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client.wire import DTYPE_TO_PB

__all__ = [
    "ENCODED_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "image_from_array",
    "image_from_file",
    "image_suffix",
    "wire_dtype",
    "select_plane",
    "window_message",
]

ENCODED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
SUPPORTED_SUFFIXES = (*ENCODED_SUFFIXES, ".npy")


def image_suffix(path: str | Path) -> str:
    """The lower-cased suffix that selects how ``path`` is sent (``".nii.gz"`` counts as one).

    Raises :class:`ValueError` for anything not in :data:`SUPPORTED_SUFFIXES`.
    """
    name = Path(path).name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ValueError(
        f"unsupported image file {Path(path).name!r}: expected one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def image_from_file(
    path: str | Path,
    *,
    window: Sequence[float] | None = None,
    slice_index: int | None = None,
) -> pb.Image:
    """Read an image file into a ``pb.Image``.

    ``.png/.jpg/.jpeg/.tif/.tiff/.dcm/.nii/.nii.gz`` are sent as ``encoded`` bytes, unchanged;
    ``.npy`` is loaded with ``allow_pickle=False`` and sent via :func:`image_from_array`.
    ``window``: ``(center, width)`` in the image's native units (HU for CT), width > 0.
    ``slice_index``: for 3-D inputs, the slice (last axis of NIfTI, frame of DICOM; for
    ``.npy`` see :func:`image_from_array`). Raises :class:`ValueError` for an unsupported
    extension and :class:`OSError` when the file cannot be read.
    """
    suffix = image_suffix(path)
    if suffix == ".npy":
        array = np.load(Path(path), allow_pickle=False)
        return image_from_array(array, window=window, slice_index=slice_index)
    image = pb.Image(encoded=Path(path).read_bytes())
    _set_options(image, window, slice_index)
    return image


def image_from_array(
    array: np.ndarray,
    *,
    window: Sequence[float] | None = None,
    slice_index: int | None = None,
) -> pb.Image:
    """Pack a pixel array as ``pb.Image.raw`` (little-endian, C order).

    ``array``: ``(H, W)`` grey, ``(H, W, 3)`` RGB, or a ``(H, W, D)`` volume of which one
    slice is sent (see :func:`select_plane`). dtypes: uint8/int8/uint16/int16/uint32/int32/
    float32/float64; bool is sent as uint8 (0/1), float16 as float32, and int64/uint64 as
    int32 when every value fits (else :class:`ValueError`).
    ``window``: ``(center, width)`` in the array's units, width > 0.
    """
    plane = select_plane(np.asarray(array), slice_index)
    plane = wire_dtype(plane)
    little = plane.astype(plane.dtype.newbyteorder("<"), order="C", copy=False)
    raw = pb.RawArray(
        dtype=DTYPE_TO_PB[plane.dtype.name],
        shape=[int(n) for n in plane.shape],
        data=np.ascontiguousarray(little).tobytes(order="C"),
    )
    image = pb.Image(raw=raw)
    _set_options(image, window, None)
    return image


def select_plane(array: np.ndarray, slice_index: int | None = None) -> np.ndarray:
    """The 2-D (or RGB) plane of ``array`` that is sent or displayed.

    ``(H, W)``: returned as is (``slice_index`` must be None or 0). ``(H, W, 3)`` without
    ``slice_index``: RGB, returned as is. Any other ``(H, W, D)``, or ``(H, W, 3)`` with a
    ``slice_index``: a volume; returns ``array[:, :, slice_index]`` (default: the middle
    slice ``D // 2``, like the server does for NIfTI). Raises :class:`ValueError` otherwise.
    """
    if array.ndim == 2:
        if slice_index not in (None, 0):
            raise ValueError(f"slice_index {slice_index} given for a 2-D array of shape {array.shape}")
        return array
    if array.ndim != 3:
        raise ValueError(f"an image array is (H, W), (H, W, 3) or (H, W, D); got shape {array.shape}")
    if array.shape[2] == 3 and slice_index is None:
        return array
    depth = array.shape[2]
    index = depth // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < depth:
        raise ValueError(f"slice_index {index} is outside 0..{depth - 1} for shape {array.shape}")
    return array[:, :, index]


def wire_dtype(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype the wire carries (see :func:`image_from_array`), or :class:`ValueError`."""
    kind = array.dtype
    if kind == np.bool_:
        return array.astype(np.uint8)
    if kind == np.float16:
        return array.astype(np.float32)
    if kind in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{kind.name} values do not fit in int32; convert the array first")
        return array.astype(np.int32)
    if kind.name not in DTYPE_TO_PB:
        raise ValueError(f"unsupported dtype {kind}: use one of {', '.join(DTYPE_TO_PB)}")
    return array


def window_message(window: Sequence[float]) -> pb.Window:
    """``(center, width)`` in native units (HU for CT) as a ``pb.Window``; :class:`ValueError`
    unless both are finite and width > 0."""
    if len(window) != 2:
        raise ValueError(f"window is (center, width), got {tuple(window)}")
    center, width = float(window[0]), float(window[1])
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        raise ValueError(f"window needs a finite center and a width > 0, got ({center}, {width})")
    return pb.Window(center=center, width=width)


def _set_options(image: pb.Image, window: Sequence[float] | None, slice_index: int | None) -> None:
    if window is not None:
        image.window.CopyFrom(window_message(window))
    if slice_index is not None:
        if int(slice_index) < 0:
            raise ValueError(f"slice_index must be >= 0, got {slice_index}")
        image.slice_index = int(slice_index)
