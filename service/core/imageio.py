"""Image decoder of the gateway: client bytes or a raw array -> one normalised 2-D image.

Formats are recognised from magic bytes, never names: DICOM Part 10 ('DICM' at offset 128,
checked first: a DICOM preamble may hold a TIFF header), PNG, JPEG, TIFF (first page; by
tifffile, or Pillow for codecs tifffile cannot decode without imagecodecs, e.g. LZW, JPEG),
NIfTI-1 single file (.nii, or gzip .nii.gz), or a :class:`RawPixels` array. Sizes are
checked against :class:`ImageLimits` from headers, before pixels are allocated; a .nii.gz is
inflated only up to the size its header declares, which must fit in
``GZIP_EXPANSION * limits.max_encoded_bytes`` (a gzip bomb is rejected, not expanded).

Output pixels: float32, C-contiguous, ``(H, W)`` grey or ``(H, W, 3)`` RGB, in [0, 1].
Alpha is dropped, palette images become RGB, 16-bit grey PNG/TIFF keep full precision
(Pillow reads 16-bit *RGB* PNG as 8-bit). A 2-D input has one slice: ``slice_index`` absent or 0.

Intensity normalisation (the contract of ``segmentation.proto``, message Image):

* request window ``(c, w)`` in native units: ``clip((x - (c - w/2)) / w, 0, 1)``; ``w <= 0``
  or a non-finite value is rejected;
* DICOM grey: Modality LUT first (RescaleSlope/Intercept: HU for CT), then the request
  window, else the file's first WindowCenter/WindowWidth (same linear map), else its VOI
  LUT Sequence (output / (2**bits - 1)), else the modality default (CT: 40/400 HU), else
  the percentile rule; MONOCHROME1 is then inverted (``1 - v``) so it looks as a viewer
  shows it. DICOM RGB/YBR: ``/ (2**BitsStored - 1)``. Multi-frame: frame ``slice_index``
  (default the middle one);
* NIfTI: 2-D or 3-D (trailing singleton axes ignored), scl_slope/scl_inter applied; a volume
  gives slice ``k = slice_index`` (default middle) along the LAST voxel axis. Orientation
  follows voxel axes only (the affine is ignored): ``pixels = flipud(vol[:, :, k].T)``, so
  columns follow the first voxel axis (i increasing to the right) and rows the second (the
  highest j on the top row): for an RAS-stored axial volume, anterior on top and the
  subject's left on the image's left. ``spacing_mm = (zooms[1], zooms[0])``;
* 8-bit RGB (PNG/JPEG/TIFF/raw uint8 ``(H, W, 3)``): ``/ 255`` unless a window is given;
* everything else (NIfTI and non-uint8 RGB included): the percentile rule, clip to the 0.5th
  and 99.5th percentiles (numpy's linear interpolation, all channels jointly) and scale to
  [0, 1]; a constant image (equal percentiles) becomes all zeros. NaN/inf are rejected.

Third-party exceptions become :class:`InvalidImage` in :func:`_translating`; messages
never hold DICOM tag values. Nothing is logged.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydicom
import tifffile
from nibabel.nifti1 import Nifti1Header
from PIL import Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from service.core.domain import DecodedImage, ImageInput, ImageLimits, RawPixels, Window
from service.core.errors import InvalidImage, PayloadTooLarge, ServiceError

__all__ = ["CT_DEFAULT_WINDOW", "GZIP_EXPANSION", "RAW_DTYPES", "decode_image", "dicom_window", "normalise"]

RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
CT_DEFAULT_WINDOW = Window(center=40.0, width=400.0)
GZIP_EXPANSION = 4  # an inflated .nii.gz may be at most this many times max_encoded_bytes
UNRECOGNISED = "unrecognised image format; send PNG, JPEG, TIFF, DICOM Part 10 or NIfTI-1, or a raw array"

_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "dicom": "DICOM", "nifti": "NIfTI"}
_PIL = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
}
_NIFTI_HEADER = 348


def decode_image(inp: ImageInput, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode ``inp`` to float32 ``(H, W)`` / ``(H, W, 3)`` pixels in [0, 1] (rules above).

    Raises :class:`InvalidImage` for undecodable or malformed input, :class:`PayloadTooLarge`
    for input over ``limits``.
    """
    if (inp.encoded is None) == (inp.raw is None):
        raise InvalidImage("set exactly one of image.encoded and image.raw")
    if inp.window is not None:
        _check_window(inp.window)
    if inp.raw is not None:
        _slice_index(1, inp.slice_index)
        return DecodedImage(normalise(_raw_array(inp.raw, limits), inp.window), "raw")
    data = inp.encoded
    if not data:
        raise InvalidImage("image.encoded is empty")
    if len(data) > limits.max_encoded_bytes:
        raise PayloadTooLarge(f"encoded image is {len(data)} bytes; the limit is {limits.max_encoded_bytes} bytes")
    fmt = _sniff(data)
    with _translating(fmt):
        if fmt == "dicom":
            return _decode_dicom(data, inp, limits)
        if fmt == "nifti":
            return _decode_nifti(data, inp, limits)
        array = _decode_tiff(data, limits) if fmt == "tiff" else _decode_pil(data, fmt, limits)
    _slice_index(1, inp.slice_index)
    return DecodedImage(normalise(array, inp.window), fmt)


def normalise(array: np.ndarray, window: Window | None) -> np.ndarray:
    """Map native intensities, grey ``(H, W)`` or RGB ``(H, W, 3)``, to float32 [0, 1].

    ``window`` given: the linear window map; else uint8 RGB: ``/ 255``; else the percentile
    rule. Returns a new C-contiguous float32 array of the same shape; InvalidImage for
    another shape, a non-numeric dtype, NaN/inf values or a bad window.
    """
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or array.dtype.kind not in "biuf":
        raise InvalidImage(f"cannot normalise an array of shape {array.shape} and dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidImage("image contains NaN or infinite values")
    if window is not None:
        _check_window(window)
        return _linear01(array, window.center - window.width / 2, window.center + window.width / 2)
    if array.ndim == 3 and array.dtype == np.uint8:
        return np.ascontiguousarray(array, dtype=np.float32) / np.float32(255)
    return _linear01(array, None, None)


def dicom_window(ds: pydicom.Dataset) -> Window | None:
    """The file's first WindowCenter/WindowWidth pair, or None when absent or unusable."""
    values = []
    for keyword in ("WindowCenter", "WindowWidth"):
        value: Any = ds.get(keyword)
        if value is not None and not isinstance(value, (int, float)):
            value = value[0] if len(value) else None  # multi-valued: the first window
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            return None
    window = Window(center=values[0], width=values[1])
    return window if _window_ok(window) else None


# --------------------------------------------------------------------------- helpers
@contextmanager
def _translating(fmt: str) -> Iterator[None]:
    """Turn any third-party exception raised while decoding ``fmt`` into a domain error."""
    try:
        yield
    except (ServiceError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{_NAMES[fmt]} image is too large to decode") from exc
    except Exception as exc:  # untrusted bytes: any library error means a corrupt file
        raise InvalidImage(f"{_NAMES[fmt]} data is truncated or corrupt") from exc


def _sniff(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[344:348] == b"n+1\x00" or data.startswith(b"\x1f\x8b"):
        return "nifti"
    raise InvalidImage(UNRECOGNISED)


def _window_ok(window: Window) -> bool:
    c, w = window.center, window.width
    return bool(np.isfinite([c, w, c - w / 2, c + w / 2]).all() and w > 0)


def _check_window(window: Window) -> None:
    if not _window_ok(window):
        raise InvalidImage("window width must be > 0 and center and width finite")


def _check_size(height: int, width: int, limits: ImageLimits) -> None:
    if height < 1 or width < 1:
        raise InvalidImage(f"image has an empty side ({width}x{height} pixels)")
    if max(height, width) > limits.max_side or height * width > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} pixels; the limit is {limits.max_side} pixels per side "
            f"and {limits.max_pixels} pixels in all"
        )


def _slice_index(count: int, index: int | None) -> int:
    """The requested one of ``count`` slices (default the middle one), range-checked."""
    if index is None:
        return count // 2
    if not 0 <= index < count:
        raise InvalidImage(f"slice_index {index} is out of range: this image has {count} slice(s)")
    return index


def _linear01(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """``clip((x - lo) / (hi - lo), 0, 1)`` as float32; ``lo``/``hi`` None: 0.5/99.5 percentiles.

    Works on ``x / 2`` in float64 so that no difference overflows, even for extreme float64.
    """
    half = np.asarray(x, dtype=np.float64) * 0.5
    if lo is None or hi is None:
        lo_h, hi_h = (float(v) for v in np.percentile(half, (0.5, 99.5)))
    else:
        lo_h, hi_h = lo * 0.5, hi * 0.5
    if not hi_h > lo_h:
        return np.zeros(half.shape, dtype=np.float32)
    half -= lo_h
    half /= hi_h - lo_h
    return np.clip(half, 0.0, 1.0).astype(np.float32)


def _grey_or_rgb(array: np.ndarray, fmt: str) -> np.ndarray:
    """Drop an alpha channel ((H, W, 2) or (H, W, 4)) and a singleton channel axis."""
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[..., :-1]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3):
        return array
    raise InvalidImage(f"{_NAMES[fmt]} image has shape {array.shape}; expected grey or RGB, with or without alpha")


def _spacing(value: Any) -> tuple[float, float] | None:
    """(row, column) spacing in mm when both are finite and positive, else None."""
    try:
        spacing = (float(value[0]), float(value[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return spacing if all(np.isfinite(s) and s > 0 for s in spacing) else None


# --------------------------------------------------------------------------- formats
def _raw_array(raw: RawPixels, limits: ImageLimits) -> np.ndarray:
    if raw.dtype not in RAW_DTYPES:
        raise InvalidImage(f"raw dtype {raw.dtype!r} is not supported; use one of {', '.join(RAW_DTYPES)}")
    shape = tuple(raw.shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise InvalidImage(f"raw shape {shape} is not (height, width) or (height, width, 3)")
    if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise InvalidImage(f"raw shape {shape} must have sides >= 1")
    _check_size(int(shape[0]), int(shape[1]), limits)
    dtype = np.dtype(raw.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw.data) != expected:
        raise InvalidImage(f"raw data is {len(raw.data)} bytes; shape {shape} of {raw.dtype} needs {expected}")
    return np.frombuffer(raw.data, dtype=dtype).reshape(shape)


def _decode_pil(data: bytes, fmt: str, limits: ImageLimits) -> np.ndarray:
    # The plugin class reads only the header; Image.open would add Pillow's global
    # decompression-bomb bound, which our own limits replace.
    image = _PIL[fmt](io.BytesIO(data))
    _check_size(image.height, image.width, limits)
    image.load()
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode not in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, ...
    return _grey_or_rgb(np.asarray(image), fmt)


def _decode_tiff(data: bytes, limits: ImageLimits) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        _check_size(int(page.imagelength), int(page.imagewidth), limits)
        if page.compression not in tifffile.TIFF.DECOMPRESSORS:  # LZW, JPEG... need imagecodecs
            return _decode_pil(data, "tiff", limits)
        array = page.asarray()
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            array = np.moveaxis(page.colormap[:, array] // 257, 0, -1).astype(np.uint8)
        elif page.axes.startswith("S") and array.ndim == 3:  # planar configuration
            array = np.moveaxis(array, 0, -1)
    return _grey_or_rgb(array, "tiff")


def _decode_dicom(data: bytes, inp: ImageInput, limits: ImageLimits) -> DecodedImage:
    ds = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" not in ds:
        raise InvalidImage("DICOM file has no (integer) Pixel Data element")
    _check_size(int(ds.Rows), int(ds.Columns), limits)
    index = _slice_index(int(ds.get("NumberOfFrames") or 1), inp.slice_index)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decodable = bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # no decoder exists for this transfer syntax
        decodable = False
    if not decodable:
        name = syntax.name if syntax.keyword else "unknown"  # never echo an unknown tag value
        raise InvalidImage(f"DICOM transfer syntax {name} is not supported; send uncompressed DICOM")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise InvalidImage("DICOM PALETTE COLOR images are not supported; send RGB or greyscale")
    frame = pixel_array(ds, index=index)  # decodes this frame only; YBR comes back as RGB
    if frame.ndim == 3:
        pixels = normalise(frame, inp.window) if inp.window is not None else frame / _full_scale(ds.BitsStored)
    else:
        pixels = _dicom_grey(frame, ds, inp.window)
        if photometric == "MONOCHROME1":
            pixels = 1 - pixels
    return DecodedImage(
        np.ascontiguousarray(np.clip(pixels, 0, 1), dtype=np.float32),
        "dicom",
        modality=str(ds.get("Modality") or "").strip() or None,
        spacing_mm=_spacing(ds.get("PixelSpacing")),
    )


def _dicom_grey(frame: np.ndarray, ds: pydicom.Dataset, window: Window | None) -> np.ndarray:
    """Modality LUT, then: request window, file window, VOI LUT, CT default, percentiles."""
    values = apply_modality_lut(frame, ds)
    if window is None:
        window = dicom_window(ds)
    if window is None and "VOILUTSequence" in ds:
        full_scale = _full_scale(ds.VOILUTSequence[0].LUTDescriptor[2])
        return np.clip(apply_voi_lut(values, ds, prefer_lut=True) / full_scale, 0, 1)
    if window is None and str(ds.get("Modality", "")).strip().upper() == "CT":
        window = CT_DEFAULT_WINDOW
    return normalise(values, window)


def _full_scale(bits: Any) -> np.float32:
    """``2**bits - 1`` for a DICOM bit depth of 1..16, else InvalidImage."""
    if not 1 <= int(bits) <= 16:
        raise InvalidImage("DICOM declares an invalid bit depth")
    return np.float32(2 ** int(bits) - 1)


def _decode_nifti(data: bytes, inp: ImageInput, limits: ImageLimits) -> DecodedImage:
    inflater = zlib.decompressobj(wbits=31) if data.startswith(b"\x1f\x8b") else None
    head = data[:_NIFTI_HEADER] if inflater is None else inflater.decompress(data, _NIFTI_HEADER)
    if len(head) < _NIFTI_HEADER or head[344:348] != b"n+1\x00":
        raise InvalidImage(UNRECOGNISED if inflater is None else "gzip data is not a NIfTI-1 (.nii.gz) image")
    header = Nifti1Header.from_fileobj(io.BytesIO(head), check=False)
    shape = tuple(int(s) for s in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise InvalidImage(f"NIfTI image has {len(shape)} dimensions; send a 2-D image or a 3-D volume")
    _check_size(shape[1], shape[0], limits)  # rows follow the second voxel axis
    depth = shape[2] if len(shape) == 3 else 1
    if depth < 1:
        raise InvalidImage(f"NIfTI volume has an empty axis (shape {shape})")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields:
        raise InvalidImage(f"NIfTI data type {dtype} is not supported; send integer or real voxels")
    offset = int(header.get_data_offset())
    if offset < _NIFTI_HEADER:  # also keeps the inflate bound below > 0 (0 means unbounded)
        raise InvalidImage("NIfTI vox_offset is invalid for a single-file (.nii) image")
    total = offset + math.prod(shape) * dtype.itemsize
    if inflater is not None:
        bound = GZIP_EXPANSION * limits.max_encoded_bytes
        if total > bound:
            raise PayloadTooLarge(f"NIfTI volume inflates to {total} bytes; the limit is {bound} bytes")
        data = head + inflater.decompress(inflater.unconsumed_tail, total - len(head))
    if len(data) < total:
        raise InvalidImage("NIfTI data is truncated or corrupt")
    volume = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    plane = volume.reshape((shape[0], shape[1], depth), order="F")[:, :, _slice_index(depth, inp.slice_index)]
    slope, inter = header.get_slope_inter()
    values = plane.T[::-1] if slope is None else plane.T[::-1] * float(slope) + float(inter or 0.0)
    zooms = header.get_zooms()
    return DecodedImage(normalise(values, inp.window), "nifti", spacing_mm=_spacing((zooms[1], zooms[0])))
