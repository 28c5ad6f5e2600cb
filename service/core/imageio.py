"""Image decoder of the gateway: client bytes or a raw array -> one normalised 2-D image.

Formats are recognised from magic bytes, never names: DICOM Part 10 ('DICM' at offset 128,
checked first: a DICOM preamble may hold a TIFF header), PNG, JPEG, TIFF (first page; by
tifffile, or Pillow for codecs tifffile cannot decode without imagecodecs, e.g. LZW, JPEG),
NIfTI-1 single file (.nii, or gzip .nii.gz), or a :class:`RawPixels` array. DICOM decodes
every transfer syntax a PACS sends that pydicom has a decoder for: uncompressed (little and
big endian, implicit or explicit VR), deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000 and HTJ2K (decoders: the pinned pylibjpeg plugins, pyjpegls, Pillow).

Memory is bounded by what decoding will actually allocate, checked before it is allocated
(a few bytes of input must not buy gigabytes of output):

* sizes are checked against :class:`ImageLimits` from headers, before pixels are allocated:
  PNG IHDR, JPEG SOF, TIFF tags, DICOM Rows/Columns, NIfTI dims;
* a compressed DICOM frame's own codestream header is read before it is decoded (JPEG and
  JPEG-LS SOF, JPEG-LS LSE oversize dimensions, JPEG 2000 SIZ, the RLE segment count): a frame
  larger than Rows x Columns x SamplesPerPixel at BitsAllocated is refused, and so is a
  JPEG 2000 codestream of more than :data:`MAX_J2K_TILES` tiles; RLE is decoded by
  pylibjpeg-rle, which writes into a buffer of the declared size (pydicom's own RLE decoder
  grows its output without bound);
* a deflated DICOM data set is inflated with a bound: its first ``DEFLATE_HEAD`` bytes, then
  only as far as its pixel attributes say its Pixel Data reaches (plus ``DEFLATE_TRAILER``),
  and never past ``GZIP_EXPANSION * limits.max_encoded_bytes``;
* TIFF: samples per pixel (1-4), bits per sample (1-64), ImageDepth (1) and the tile size are
  checked from the first IFD before tifffile or Pillow allocates; tifffile's deflate, LZMA and
  PackBits decoders are replaced by ones that stop at the strip or tile size tifffile asks for
  (its own fall-backs inflate without bound); tifffile decodes on the calling thread;
* JPEG (a file or a DICOM frame): at most :data:`MAX_JPEG_SCANS` scans (a progressive JPEG of
  thousands of scans costs seconds of CPU each pass) and no DNL-defined height;
* PNG text/ICC chunks are bounded by Pillow (``PngImagePlugin.MAX_TEXT_CHUNK``, 1 MiB each,
  ``MAX_TEXT_MEMORY`` in all); a .nii.gz is inflated only up to the size its header declares,
  which must fit in ``GZIP_EXPANSION * limits.max_encoded_bytes`` (a gzip bomb is rejected,
  not expanded).

:func:`estimate_decode_bytes` returns, from the headers alone, an upper bound of the bytes
:func:`decode_image` allocates at its peak (admission charges it against a memory budget).

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
  shows it. DICOM RGB/YBR: ``/ (2**BitsStored - 1)``. DICOM PALETTE COLOR becomes RGB through its
  Palette Color LUTs (pydicom's ``apply_color_lut``; an Alpha LUT is dropped), then
  ``/ (2**bits - 1)`` with ``bits`` the depth of the LUT entries (8 or 16), or the window
  on those RGB values when the request gives one. Multi-frame: frame ``slice_index``
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

Errors say what is wrong: for DICOM the transfer syntax by name, the bit depth, samples per
pixel, photometric interpretation, a frame larger than declared, missing Pixel Data or a
non-image SOP class (by its registered name), short Pixel Data, and which stage failed
(file meta, data set, frame N); third-party exceptions become :class:`InvalidImage` with such
a message (:func:`_translating`, :func:`_stage`). Messages hold only technical values (sizes,
bit depths, registered UID names), never other DICOM tag values. Nothing is logged.
"""

from __future__ import annotations

import dataclasses
import io
import lzma
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import tifffile
from nibabel.nifti1 import Nifti1Header
from PIL import Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin
from pydicom import uid as dicom_uid
from pydicom.dataset import FileDataset
from pydicom.encaps import get_frame
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from service.core.domain import DecodedImage, ImageInput, ImageLimits, RawPixels, Window
from service.core.codestreams import MAX_J2K_TILES, MAX_JPEG_SCANS, j2k_header, jpeg_header
from service.core.errors import InvalidImage, PayloadTooLarge, ServiceError

__all__ = ["CT_DEFAULT_WINDOW", "DEFLATE_HEAD", "DEFLATE_TRAILER", "GZIP_EXPANSION", "MAX_J2K_TILES",
           "MAX_JPEG_SCANS", "RAW_DTYPES", "DecodeEstimate", "decode_image", "dicom_header", "dicom_window",
           "estimate_decode_bytes", "normalise"]

RAW_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
CT_DEFAULT_WINDOW = Window(center=40.0, width=400.0)
GZIP_EXPANSION = 4  # an inflated .nii.gz or deflated DICOM may be at most this many times max_encoded_bytes
DEFLATE_HEAD = 1 << 20  # a deflated DICOM's attributes before its Pixel Data must fit in this
DEFLATE_TRAILER = 1 << 20  # bytes a deflated DICOM may hold after its Pixel Data
MAX_TIFF_TILE_SIDE = 1024  # a TIFF tile may be larger than its image, up to this side
UNRECOGNISED = "unrecognised image format; send PNG, JPEG, TIFF, DICOM Part 10 or NIfTI-1, or a raw array"

_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "dicom": "DICOM", "nifti": "NIfTI"}
_PIL = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
}
_NIFTI_HEADER = 348
# Bytes per pixel and output channel of the float stages (float64 copies of the modality LUT,
# the window or percentile rule, np.percentile's partition copy, clipping; the float32 result
# and its clipped copy), measured as VmHWM on this module's decoders (tests/unit/test_imageio.py).
_WORK_BYTES = 40
_RGB_WORK_BYTES = 12  # RGB without a request window: one float32 division, then its clipped copy


def decode_image(inp: ImageInput, limits: ImageLimits = ImageLimits()) -> DecodedImage:
    """Decode ``inp`` to float32 ``(H, W)`` / ``(H, W, 3)`` pixels in [0, 1] (rules above).

    Raises :class:`InvalidImage` for undecodable or malformed input, :class:`PayloadTooLarge`
    for input over ``limits``.
    """
    data = _check_input(inp, limits)
    if data is None:
        _slice_index(1, inp.slice_index)
        return DecodedImage(normalise(_raw_array(inp.raw, limits), inp.window), "raw")
    fmt = _sniff(data)
    with _translating(fmt):
        if fmt == "dicom":
            return _decode_dicom(data, inp, limits)
        if fmt == "nifti":
            return _decode_nifti(data, inp, limits)
        array = _decode_tiff(data, limits) if fmt == "tiff" else _decode_pil(data, fmt, limits)
    _slice_index(1, inp.slice_index)
    return DecodedImage(normalise(array, inp.window), fmt)


class DecodeEstimate(int):
    """What :func:`estimate_decode_bytes` returns: an ``int`` (bytes) that also carries the
    image's ``height`` and ``width`` as its header states them."""

    height: int
    width: int

    def __new__(cls, nbytes: int, height: int, width: int) -> "DecodeEstimate":
        self = super().__new__(cls, int(nbytes))
        self.height, self.width = int(height), int(width)
        return self


def estimate_decode_bytes(inp: ImageInput, limits: ImageLimits = ImageLimits()) -> DecodeEstimate:
    """An upper bound of the bytes :func:`decode_image` allocates at its peak for ``inp``,
    read from the headers only (no pixel is decoded: PNG IHDR, JPEG SOF, TIFF first IFD, the
    DICOM data set without its Pixel Data, the first ``DEFLATE_HEAD`` inflated bytes of a
    deflated DICOM, the NIfTI header). Cheap: microseconds to a few milliseconds.

    The figure counts the copy of the container the decoder makes (not ``inp`` itself), the
    inflated data set or volume, codec buffers, the native pixel array and its converted
    copy, and the float stages of normalisation (``_WORK_BYTES`` per pixel and output
    channel); the model-input transform that follows decoding stays below it.

    Raises what :func:`decode_image` would raise for what the headers already show
    (:class:`InvalidImage`: unrecognised or malformed, :class:`PayloadTooLarge`: over
    ``limits``), and nothing else.
    """
    data = _check_input(inp, limits)
    if data is None:
        raw = inp.raw
        _raw_shape(raw, limits)
        shape = tuple(int(s) for s in raw.shape)
        itemsize = np.dtype(raw.dtype).itemsize
        channels = shape[2] if len(shape) == 3 else 1
        return DecodeEstimate(shape[0] * shape[1] * channels * (itemsize + _WORK_BYTES), shape[0], shape[1])
    fmt = _sniff(data)
    with _translating(fmt):
        if fmt == "dicom":
            plan = _dicom_plan(data, limits)
        elif fmt == "nifti":
            plan = _nifti_plan(data, limits)
        elif fmt == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                plan = _tiff_plan(tif.pages.first, limits)
        else:
            plan = _pil_plan(_PIL[fmt](io.BytesIO(data)), data, fmt, limits)
    if inp.window is None and plan.samples >= 3 and (fmt == "dicom" or plan.itemsize == 1):
        plan = dataclasses.replace(plan, work=_RGB_WORK_BYTES)  # 8-bit RGB / 255, DICOM RGB / full scale
    return DecodeEstimate(plan.peak(len(data)), plan.height, plan.width)


@dataclass(frozen=True)
class _Plan:
    """What decoding an image allocates, from its headers: the native pixel array
    (``height x width x samples`` of ``itemsize`` bytes), held ``copies`` times at once
    (conversions, the array a codec returns and the one it is copied to), plus ``extra``
    bytes (inflated data, codec buffers, a frame's codestream)."""

    height: int
    width: int
    samples: int
    itemsize: int
    extra: int = 0
    copies: int = 2
    work: int = _WORK_BYTES  # per pixel and output channel

    def peak(self, container: int) -> int:
        pixels = self.height * self.width
        native = pixels * self.samples * self.itemsize
        channels = 3 if self.samples >= 3 else 1
        return container + self.extra + self.copies * native + pixels * channels * self.work


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


def dicom_header(data: bytes, limits: ImageLimits = ImageLimits()) -> pydicom.Dataset:
    """The data set of one DICOM Part 10 image WITHOUT its Pixel Data: the header a derived
    object (a DICOM SEG, service/core/dicom_seg.py) references and copies its patient/study
    modules from. Read by the same bounded reader as :func:`decode_image` (a deflated data
    set is inflated only up to its Pixel Data) and checked as an image (pixel attributes,
    size, transfer syntax), so it fails exactly where :func:`decode_image` would on the
    header. The result holds no reference to ``data`` (small memory: the attributes only).

    :class:`InvalidImage` (not a DICOM Part 10 image, or what is wrong with its header),
    :class:`PayloadTooLarge` (over ``limits``).
    """
    if not data:
        raise InvalidImage("image.encoded is empty")
    if len(data) > limits.max_encoded_bytes:
        raise PayloadTooLarge(f"encoded image is {len(data)} bytes; the limit is {limits.max_encoded_bytes} bytes")
    if data[128:132] != b"DICM":
        raise InvalidImage("not a DICOM Part 10 file (no 'DICM' marker at byte 128)")
    with _translating("dicom"):
        ds, _ = _read_dicom(data, limits, pixels=False)
        _dicom_pixels(ds, limits, with_pixel_data=False)
    return _detach(ds)


def _detach(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` without the reference pydicom keeps to the buffer it was read from (the whole
    file, Pixel Data included); nothing is read from it later (no deferred elements)."""
    if isinstance(ds, FileDataset):
        ds.buffer = None
        ds.filename = None
    return ds


def _header_bytes(data: bytes, ds: pydicom.Dataset) -> bytes:
    """The Part 10 bytes of ``ds`` (read from ``data`` by :func:`_read_dicom` with
    ``pixels=False``) without Pixel Data: ``data`` cut where pydicom stopped, before the Pixel
    Data element (no copy of the pixels, no re-encoding), else (deflated, or pydicom stopped
    elsewhere) ``ds`` written anew in its own transfer syntax. :func:`_read_dicom` of the
    result gives ``ds`` again."""
    buffer = getattr(ds, "buffer", None)
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    tag = b"\x7f\xe0\x00\x10" if syntax == dicom_uid.ExplicitVRBigEndian else _PIXEL_DATA_HEADER
    if (syntax != dicom_uid.DeflatedExplicitVRLittleEndian and isinstance(buffer, io.BytesIO)
            and "PixelData" not in ds):
        at = buffer.tell()
        if 132 < at <= len(data) - 4 and data[at:at + 4] == tag:
            return bytes(data[:at])
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False)
    return out.getvalue()


# --------------------------------------------------------------------------- helpers
def _check_input(inp: ImageInput, limits: ImageLimits) -> bytes | None:
    """The encoded bytes, or None for a raw array; checks what every input must satisfy."""
    if (inp.encoded is None) == (inp.raw is None):
        raise InvalidImage("set exactly one of image.encoded and image.raw")
    if inp.window is not None:
        _check_window(inp.window)
    if inp.raw is not None:
        return None
    data = inp.encoded
    if not data:
        raise InvalidImage("image.encoded is empty")
    if len(data) > limits.max_encoded_bytes:
        raise PayloadTooLarge(f"encoded image is {len(data)} bytes; the limit is {limits.max_encoded_bytes} bytes")
    return data


def _library_failure(exc: BaseException) -> bool:
    """A third-party error on untrusted bytes: any Exception, and the panics of the Rust
    decoders (pylibjpeg-rle's ``pyo3_runtime.PanicException`` derives from BaseException)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


@contextmanager
def _translating(fmt: str) -> Iterator[None]:
    """Turn any third-party exception raised while decoding ``fmt`` into a domain error."""
    try:
        yield
    except (ServiceError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{_NAMES[fmt]} image is too large to decode") from exc
    except BaseException as exc:  # untrusted bytes: any library error means a corrupt file
        if not _library_failure(exc):
            raise
        raise InvalidImage(f"{_NAMES[fmt]} data is truncated or corrupt") from exc


@contextmanager
def _stage(message: str) -> Iterator[None]:
    """Like :func:`_translating`, with a message that says which part of the file failed."""
    try:
        yield
    except (ServiceError, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - untrusted bytes
        if not _library_failure(exc):
            raise
        raise InvalidImage(message) from exc


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
    return np.clip(half, 0.0, 1.0).astype(np.float32, order="C")  # C order even for a transposed view


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
def _raw_shape(raw: RawPixels, limits: ImageLimits) -> tuple[int, ...]:
    if raw.dtype not in RAW_DTYPES:
        raise InvalidImage(f"raw dtype {raw.dtype!r} is not supported; use one of {', '.join(RAW_DTYPES)}")
    shape = tuple(raw.shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise InvalidImage(f"raw shape {shape} is not (height, width) or (height, width, 3)")
    if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise InvalidImage(f"raw shape {shape} must have sides >= 1")
    _check_size(int(shape[0]), int(shape[1]), limits)
    return shape


def _raw_array(raw: RawPixels, limits: ImageLimits) -> np.ndarray:
    shape = _raw_shape(raw, limits)
    dtype = np.dtype(raw.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw.data) != expected:
        raise InvalidImage(f"raw data is {len(raw.data)} bytes; shape {shape} of {raw.dtype} needs {expected}")
    return np.frombuffer(raw.data, dtype=dtype).reshape(shape)


_PIL_ITEMSIZE = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16S": 2, "I": 4, "F": 4}


def _pil_plan(image: Image.Image, data: bytes, fmt: str, limits: ImageLimits) -> _Plan:
    """Checks on a Pillow image whose header only has been read; what loading it allocates."""
    _check_size(image.height, image.width, limits)
    bands = len(image.getbands())
    extra = 0
    if fmt == "jpeg":
        stream = jpeg_header(data, "JPEG image")
        extra = image.height * image.width * max(stream.components, bands) * 2  # DCT coefficients
    if image.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        bands = 4 + bands  # the converted copy (RGB/RGBA/L) beside the original
    return _Plan(image.height, image.width, bands, _PIL_ITEMSIZE.get(image.mode, 1), extra)


def _decode_pil(data: bytes, fmt: str, limits: ImageLimits) -> np.ndarray:
    # The plugin class reads only the header; Image.open would add Pillow's global
    # decompression-bomb bound, which our own limits replace.
    image = _PIL[fmt](io.BytesIO(data))
    _pil_plan(image, data, fmt, limits)
    image.load()
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode not in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, ...
    return _grey_or_rgb(np.asarray(image), fmt)


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _tiff_plan(page: Any, limits: ImageLimits) -> _Plan:
    """Checks on a TIFF page's tags before anything allocates its pixels; what decoding it allocates."""
    height, width = int(page.imagelength), int(page.imagewidth)
    _check_size(height, width, limits)
    depth = int(page.imagedepth)
    if depth != 1:
        raise InvalidImage(f"TIFF page has an ImageDepth of {depth} (a volume); send a 2-D image")
    samples = int(page.samplesperpixel)
    if not 1 <= samples <= 4:
        raise InvalidImage(f"TIFF image has {samples} samples per pixel; expected 1 to 4 "
                           "(grey or RGB, with or without alpha)")
    bits = page.bitspersample
    bits = max(int(b) for b in bits) if isinstance(bits, tuple) else int(bits)
    if not 1 <= bits <= 64:
        raise InvalidImage(f"TIFF BitsPerSample {bits} is not supported; expected 1 to 64")
    itemsize = page.dtype.itemsize if page.dtype is not None else -(-bits // 8)
    if page.is_tiled:
        tile_w, tile_h, tile_d = int(page.tilewidth), int(page.tilelength), int(page.tiledepth)
        if (tile_d != 1 or tile_w > max(_round16(width), MAX_TIFF_TILE_SIDE)
                or tile_h > max(_round16(height), MAX_TIFF_TILE_SIDE)):
            raise PayloadTooLarge(f"TIFF tiles of {tile_w}x{tile_h}x{tile_d} pixels are larger than a "
                                  f"{width}x{height} image needs; the limit is the image size or "
                                  f"{MAX_TIFF_TILE_SIDE} pixels per side")
        chunk = tile_w * tile_h
    else:
        chunk = min(max(int(page.rowsperstrip or height), 1), height) * width
    return _Plan(height, width, samples, itemsize, extra=2 * chunk * samples * itemsize, copies=3)


def _decode_tiff(data: bytes, limits: ImageLimits) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        _tiff_plan(page, limits)
        if page.compression not in tifffile.TIFF.DECOMPRESSORS:  # LZW, JPEG... need imagecodecs
            return _decode_pil(data, "tiff", limits)
        array = page.asarray(maxworkers=1)
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            array = np.moveaxis(page.colormap[:, array] // 257, 0, -1).astype(np.uint8)
        elif page.axes.startswith("S") and array.ndim == 3:  # planar configuration
            array = np.moveaxis(array, 0, -1)
    return _grey_or_rgb(array, "tiff")


# tifffile without imagecodecs inflates deflate/LZMA strips with zlib.decompress/lzma.decompress
# (no bound) and decodes PackBits into a Python list; it passes the strip/tile size it expects
# as ``out``. These stop there.
def _bounded_zlib(data: bytes, /, *, out: Any = None) -> bytes:
    if not isinstance(out, int):
        raise ValueError("bounded zlib decode needs the expected size")
    return zlib.decompressobj().decompress(data, out) if out > 0 else b""


def _bounded_lzma(data: bytes, /, *, out: Any = None) -> bytes:
    if not isinstance(out, int):
        raise ValueError("bounded LZMA decode needs the expected size")
    return lzma.LZMADecompressor().decompress(data, max_length=out) if out > 0 else b""


def _bounded_packbits(data: bytes, /, *, out: Any = None) -> bytes:
    if not isinstance(out, int):
        raise ValueError("bounded PackBits decode needs the expected size")
    result = bytearray()
    pos, end = 0, len(data)
    while pos < end and len(result) < out:
        header = data[pos]
        pos += 1
        if header < 128:  # a literal run of header + 1 bytes
            result += data[pos:pos + header + 1]
            pos += header + 1
        elif header > 128:  # one byte repeated 257 - header times
            result += data[pos:pos + 1] * (257 - header)
            pos += 1
    del result[out:]
    return bytes(result)


_BOUNDED_TIFF_CODECS = {8: _bounded_zlib, 32946: _bounded_zlib, 34925: _bounded_lzma, 32773: _bounded_packbits}
tifffile.TIFF.DECOMPRESSORS._codecs.update(_BOUNDED_TIFF_CODECS)


# --------------------------------------------------------------------------- DICOM
_JPEG_SYNTAXES = frozenset({dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit, dicom_uid.JPEGLossless,
                            dicom_uid.JPEGLosslessSV1, dicom_uid.JPEGLSLossless, dicom_uid.JPEGLSNearLossless})
_J2K_SYNTAXES = frozenset({dicom_uid.JPEG2000Lossless, dicom_uid.JPEG2000, dicom_uid.HTJ2KLossless,
                           dicom_uid.HTJ2KLosslessRPCL, dicom_uid.HTJ2K})
_PIXEL_DATA = 0x7FE00010
_PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                          "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"})
_BITS_ALLOCATED = (1, 8, 16, 32)
MAX_PALETTE_ENTRIES = 1 << 16  # a Palette Color LUT has at most 2**16 entries (descriptor value 0)
# Bytes per pixel apply_color_lut allocates beside the index frame, at 16-bit entries: the
# clipped index copy (2), the mask of mapped indices (1), the masked indices and their
# difference to the first mapped value (2 + 8), the RGBA output (8) and one channel's gather (2).
_PALETTE_BYTES = 24


@dataclass(frozen=True)
class _DicomPixels:
    """The pixel attributes of a data set, checked."""

    syntax: pydicom.uid.UID
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    frames: int
    photometric: str

    @property
    def frame_bytes(self) -> int:
        return -(-self.rows * self.columns * self.samples * self.bits_allocated // 8)

    @property
    def syntax_name(self) -> str:
        return self.syntax.name if self.syntax.is_transfer_syntax else "unknown"


def _dicom_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise InvalidImage(f"DICOM image has no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidImage(f"DICOM {keyword} is not a single number") from None


def _dicom_pixels(ds: pydicom.Dataset, limits: ImageLimits, *, with_pixel_data: bool = True) -> _DicomPixels:
    """Check the pixel attributes of ``ds``; ``with_pixel_data`` False: ``ds`` was read
    without its Pixel Data (the header only), so its absence is not an error yet."""
    if with_pixel_data and "PixelData" not in ds:
        _no_pixel_data(ds)
    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if not syntax:
        raise InvalidImage("DICOM file meta information has no Transfer Syntax UID")
    syntax = pydicom.uid.UID(str(syntax))
    try:
        decodable = bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # no decoder exists for this transfer syntax
        decodable = False
    if not decodable:
        name = syntax.name if syntax.is_transfer_syntax else "unknown"  # never echo an unknown tag value
        raise InvalidImage(f"DICOM transfer syntax {name} is not supported; send uncompressed DICOM or one of "
                           "RLE, JPEG, JPEG-LS, JPEG 2000")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise InvalidImage("DICOM image has no PhotometricInterpretation")
    if photometric not in _PHOTOMETRIC:
        raise InvalidImage("DICOM PhotometricInterpretation is not supported; expected MONOCHROME1, MONOCHROME2, "
                           "PALETTE COLOR, RGB or YBR")
    rows, columns = _dicom_int(ds, "Rows"), _dicom_int(ds, "Columns")
    _check_size(rows, columns, limits)
    samples = _dicom_int(ds, "SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise InvalidImage(f"DICOM SamplesPerPixel {samples} is not supported; expected 1 (greyscale) or 3 (colour)")
    if (samples == 1) != (photometric.startswith("MONOCHROME") or photometric == "PALETTE COLOR"):
        raise InvalidImage(f"DICOM PhotometricInterpretation {photometric} does not fit SamplesPerPixel {samples}")
    bits_allocated = _dicom_int(ds, "BitsAllocated")
    if bits_allocated not in _BITS_ALLOCATED:
        raise InvalidImage(f"DICOM BitsAllocated {bits_allocated} is not supported; expected 1, 8, 16 or 32")
    bits_stored = _dicom_int(ds, "BitsStored", bits_allocated)
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(f"DICOM BitsStored {bits_stored} is not supported with BitsAllocated {bits_allocated}")
    frames = _dicom_int(ds, "NumberOfFrames", 1) or 1
    if frames < 1:
        raise InvalidImage(f"DICOM NumberOfFrames {frames} is invalid")
    if photometric == "PALETTE COLOR":
        if bits_allocated not in (8, 16):
            raise InvalidImage(f"DICOM PALETTE COLOR with BitsAllocated {bits_allocated} is not supported; "
                               "expected 8 or 16")
        _palette_depth(ds, little_endian=syntax != dicom_uid.ExplicitVRBigEndian)
    return _DicomPixels(syntax, rows, columns, samples, bits_allocated, bits_stored, frames, photometric)


def _no_pixel_data(ds: pydicom.Dataset) -> None:
    """Raise the InvalidImage that says why a data set without Pixel Data has no image."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise InvalidImage("DICOM Float Pixel Data and Double Float Pixel Data (e.g. parametric maps) are not "
                           "supported; send integer Pixel Data")
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")))
    name = sop_class.name if sop_class and sop_class.keyword else ""
    if name and "Image" not in name:
        raise InvalidImage(f"DICOM file holds no image: its SOP class is {name}, which has no Pixel Data")
    raise InvalidImage("DICOM file has no Pixel Data element" + (f" (SOP class {name})" if name else "")
                       + ", or it is truncated before it")


_LUT_COLOURS = ("Red", "Green", "Blue", "Alpha")


def _palette_depth(ds: pydicom.Dataset, *, little_endian: bool) -> int:
    """Check the Palette Color LUT module of a PALETTE COLOR data set, as far as
    ``apply_color_lut`` will read it, and return the nominal bits of its entries (8 or 16).
    A segmented LUT is walked first: pydicom expands it in Python without a bound, so it must
    describe at most :data:`MAX_PALETTE_ENTRIES` entries, and indirect segments (which can
    reference each other) are refused."""
    try:
        entries, _, bits = (int(v) for v in ds.get("RedPaletteColorLookupTableDescriptor"))
    except (TypeError, ValueError):  # absent, or not three numbers
        raise InvalidImage("DICOM PALETTE COLOR image has no valid Red Palette Color Lookup Table Descriptor "
                           "(three numbers)") from None
    if bits not in (8, 16):
        raise InvalidImage(f"DICOM palette colour lookup table entries of {bits} bits are not supported; "
                           "expected 8 or 16")
    if not 0 <= entries < MAX_PALETTE_ENTRIES:
        raise InvalidImage(f"DICOM palette colour lookup table descriptor declares {entries} entries; "
                           f"expected 0 ({MAX_PALETTE_ENTRIES}) to {MAX_PALETTE_ENTRIES - 1}")
    if all(f"{colour}PaletteColorLookupTableData" in ds for colour in _LUT_COLOURS[:3]):
        return bits
    if not all(f"Segmented{colour}PaletteColorLookupTableData" in ds for colour in _LUT_COLOURS[:3]):
        raise InvalidImage("DICOM PALETTE COLOR image has no Red, Green and Blue Palette Color Lookup Table Data "
                           "(plain or segmented)")
    dtype = np.dtype(("<" if little_endian else ">") + ("u1" if bits == 8 else "u2"))
    for colour in _LUT_COLOURS:
        raw = ds.get(f"Segmented{colour}PaletteColorLookupTableData")
        if raw is None:
            continue
        raw = bytes(raw)
        words = np.frombuffer(raw[:len(raw) // dtype.itemsize * dtype.itemsize], dtype=dtype)
        if len(words) > 3 * MAX_PALETTE_ENTRIES + 2:  # a linear segment of one entry takes 3 words
            raise InvalidImage(f"DICOM segmented palette colour lookup table has {len(words)} words, more than "
                               f"{MAX_PALETTE_ENTRIES} entries can need")
        total, at = 0, 0
        while at + 1 < len(words):  # as pydicom's _expand_segmented_lut walks it
            opcode, length = int(words[at]), int(words[at + 1])
            if opcode not in (0, 1):
                raise InvalidImage("DICOM segmented palette colour lookup tables with indirect or unknown segments "
                                   "are not supported; send the LUTs unsegmented, or RGB")
            at += 2 + (length if opcode == 0 else 1)
            total += length
            if total > MAX_PALETTE_ENTRIES:
                raise InvalidImage(f"DICOM segmented palette colour lookup table expands to more than "
                                   f"{MAX_PALETTE_ENTRIES} entries")
    return bits


def _palette_rgb(frame: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, np.float32]:
    """A PALETTE COLOR frame as RGB (alpha dropped) and the full scale of its values: 255 for
    8-bit LUT entries (also 8-bit values held in 16-bit words), else 65535."""
    rgb = apply_color_lut(frame, ds)[..., :3]
    eight = rgb.dtype == np.uint8 or (int(ds.RedPaletteColorLookupTableDescriptor[2]) == 8 and rgb.max() <= 255)
    return rgb, np.float32(255 if eight else 65535)


def _read_dicom(data: bytes, limits: ImageLimits, *, pixels: bool = True) -> tuple[pydicom.Dataset, int]:
    """The data set (without its Pixel Data when ``pixels`` is False) and, for a deflated one,
    the bound its inflation was held to (0 otherwise)."""
    fp = io.BytesIO(data)
    with _stage("DICOM file meta information is truncated or corrupt"):
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != dicom_uid.DeflatedExplicitVRLittleEndian:
        with _stage("DICOM data set is truncated or corrupt"):
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels), 0
    start = fp.tell()
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with _stage("deflated DICOM data set is truncated or corrupt"):
        head = inflater.decompress(memoryview(data)[start:], DEFLATE_HEAD)
    complete = inflater.eof or len(head) < DEFLATE_HEAD  # nothing more will come out
    reader = DicomBytesIO(head)
    try:
        ds = read_dataset(reader, is_implicit_VR=False, is_little_endian=True,
                          stop_when=lambda tag, vr, length: tag == _PIXEL_DATA)
        at = reader.tell()
    except Exception as exc:  # noqa: BLE001 - an element crossing the head's end, or corrupt
        if complete:
            raise InvalidImage("deflated DICOM data set is truncated or corrupt") from exc
        ds, at = None, -1
    found = at >= 0 and head[at:at + 4] == _PIXEL_DATA_HEADER
    if not found and not complete:
        raise PayloadTooLarge(f"deflated DICOM data set has more than {DEFLATE_HEAD} bytes of attributes before "
                              "its Pixel Data; the limit is that")
    bound = len(head)
    if found:
        ds.file_meta = meta
        attrs = _dicom_pixels(ds, limits, with_pixel_data=False)
        declared = attrs.frames * attrs.frame_bytes + 1  # + the pad byte of an odd length
        bound = min(at + 12 + declared + DEFLATE_TRAILER, GZIP_EXPANSION * limits.max_encoded_bytes)
        if not pixels:
            return FileDataset(io.BytesIO(), ds, preamble, meta, False, True), bound
    if not complete and bound + 1 > len(head):
        with _stage("deflated DICOM data set is truncated or corrupt"):
            head += inflater.decompress(inflater.unconsumed_tail, bound + 1 - len(head))
    if len(head) > bound:
        raise PayloadTooLarge(f"deflated DICOM data set inflates to more than {bound} bytes, more than its pixel "
                              "attributes declare")
    with _stage("deflated DICOM data set is truncated or corrupt"):
        body = read_dataset(DicomBytesIO(head), is_implicit_VR=False, is_little_endian=True)
        full = FileDataset(io.BytesIO(), body, preamble, meta, False, True)
        full.set_original_encoding(False, True, body._character_set)
    return full, bound


def _dicom_frame_checks(ds: pydicom.Dataset, attrs: _DicomPixels, index: int) -> None:
    """Before decoding frame ``index``: native Pixel Data long enough for the declared
    frames; a compressed frame's codestream no larger than the pixel attributes declare."""
    syntax = attrs.syntax
    if not syntax.is_encapsulated:
        available = len(ds.PixelData)
        needed = -(-attrs.frames * attrs.rows * attrs.columns * attrs.samples * attrs.bits_allocated // 8)
        if attrs.photometric == "YBR_FULL_422":
            needed = needed * 2 // 3
        if available < needed:
            raise InvalidImage(f"DICOM Pixel Data holds {available} bytes; {attrs.frames} frame(s) of "
                               f"{attrs.columns}x{attrs.rows} pixels, {attrs.samples} sample(s) at "
                               f"{attrs.bits_allocated} bits allocated need {needed} (truncated?)")
        return
    what = f"DICOM frame {index} ({attrs.syntax_name})"
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    with _stage(f"{what} cannot be found in the encapsulated Pixel Data: it is truncated or corrupt"):
        frame = get_frame(ds.PixelData, index, number_of_frames=attrs.frames, extended_offsets=extended)
    if syntax == dicom_uid.RLELossless:
        if len(frame) < 64:
            raise InvalidImage(f"{what}: the RLE header is truncated")
        segments = int.from_bytes(frame[:4], "little")
        expected = attrs.samples * attrs.bits_allocated // 8
        if segments != expected:
            raise InvalidImage(f"{what}: the RLE header declares {segments} segment(s); {attrs.samples} sample(s) "
                               f"at {attrs.bits_allocated} bits allocated need {expected}")
        return
    if syntax in _JPEG_SYNTAXES:
        stream = jpeg_header(frame, what)
    elif syntax in _J2K_SYNTAXES:
        stream = j2k_header(frame, what)
    else:
        return  # encapsulated uncompressed: frames are the pixels themselves
    if (stream.width > attrs.columns or stream.height > attrs.rows or stream.components > attrs.samples
            or stream.precision > max(attrs.bits_allocated, 8)):
        raise InvalidImage(
            f"{what}: its {stream.kind} codestream is {stream.width}x{stream.height} pixels, {stream.components} "
            f"component(s) at {stream.precision} bits, larger than the data set declares ({attrs.columns}x"
            f"{attrs.rows} pixels, {attrs.samples} sample(s) per pixel at {attrs.bits_allocated} bits allocated)")
    if stream.tiles > MAX_J2K_TILES:
        raise PayloadTooLarge(f"{what}: the JPEG 2000 codestream has {stream.tiles} tiles; the limit is {MAX_J2K_TILES}")


def _dicom_plan(data: bytes, limits: ImageLimits) -> _Plan:
    ds, inflated = _read_dicom(data, limits, pixels=False)
    attrs = _dicom_pixels(ds, limits, with_pixel_data=False)
    itemsize = max(1, attrs.bits_allocated // 8)
    extra = 2 * inflated  # the inflated data set and the Pixel Data value read out of it
    if attrs.syntax.is_encapsulated:
        # the frame's codestream (a copy of at most the file) and the codec's own buffers
        # (OpenJPEG holds int32 per sample, libjpeg/CharLS a component buffer)
        extra += len(data) + attrs.rows * attrs.columns * attrs.samples * 4
    copies = 3 if attrs.samples == 3 else 2  # YBR -> RGB conversion
    samples = attrs.samples
    if attrs.photometric == "PALETTE COLOR":
        extra += attrs.rows * attrs.columns * _PALETTE_BYTES  # apply_color_lut
        samples = 3  # RGB out: the native arrays counted at 3 samples, the float stages on 3 channels
    return _Plan(attrs.rows, attrs.columns, samples, itemsize, extra, copies)


def _dicom_frame(data: bytes, limits: ImageLimits, slice_index: int | None) -> tuple[np.ndarray, pydicom.Dataset,
                                                                                   _DicomPixels]:
    """Read one DICOM file and decode frame ``slice_index`` (default the middle one) as stored:
    no Modality LUT, window or inversion (YBR comes back as RGB). The one decoding path of
    :func:`_decode_dicom` and of the series reader (service/core/volume.py)."""
    ds, _ = _read_dicom(data, limits)
    attrs = _dicom_pixels(ds, limits)
    index = _slice_index(attrs.frames, slice_index)
    _dicom_frame_checks(ds, attrs, index)
    # RLE: pylibjpeg-rle decodes into a buffer of the declared size; pydicom's own RLE
    # decoder grows its output with every run (unbounded), so it is never used.
    plugin = "pylibjpeg" if attrs.syntax == dicom_uid.RLELossless else ""
    kind = "compressed" if attrs.syntax.is_encapsulated else "pixel"
    with _stage(f"DICOM frame {index} ({attrs.syntax_name}) could not be decoded: the {kind} data is truncated "
                "or corrupt"):
        frame = pixel_array(ds, index=index, decoding_plugin=plugin)  # this frame only; YBR comes back as RGB
    if frame.shape[:2] != (attrs.rows, attrs.columns):
        raise InvalidImage(f"DICOM frame {index} ({attrs.syntax_name}) decoded to {frame.shape[1]}x{frame.shape[0]} "
                           f"pixels; the data set declares {attrs.columns}x{attrs.rows}")
    return frame, ds, attrs


def _decode_dicom(data: bytes, inp: ImageInput, limits: ImageLimits) -> DecodedImage:
    frame, ds, attrs = _dicom_frame(data, limits, inp.slice_index)
    full_scale = None
    if attrs.photometric == "PALETTE COLOR":
        with _stage("DICOM PALETTE COLOR lookup tables are invalid or do not fit the Pixel Data"):
            frame, full_scale = _palette_rgb(frame, ds)
    with _stage("DICOM pixel attributes (rescale, window, VOI LUT) are invalid"):
        if frame.ndim == 3:
            if full_scale is None and inp.window is None:
                full_scale = _full_scale(attrs.bits_stored, max_bits=32)   # colour samples of up to 32 bits
            pixels = normalise(frame, inp.window) if inp.window is not None else \
                np.divide(frame, full_scale, dtype=np.float32)   # float32 also for 32-bit samples
        else:
            pixels = _dicom_grey(frame, ds, inp.window)
            if attrs.photometric == "MONOCHROME1":
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


def _full_scale(bits: Any, max_bits: int = 16) -> np.float32:
    """``2**bits - 1`` for a DICOM bit depth of 1..``max_bits``, else InvalidImage."""
    if not 1 <= int(bits) <= max_bits:
        raise InvalidImage(f"DICOM bit depth {int(bits)} is not supported here; expected 1 to {max_bits} bits")
    return np.float32(2 ** int(bits) - 1)


# --------------------------------------------------------------------------- NIfTI
def _nifti_head(data: bytes) -> tuple[Nifti1Header, Any, bytes]:
    """(header, inflater, head): the 348-byte NIfTI-1 header of a .nii, or of a .nii.gz
    inflated that far only (``inflater`` then continues the stream; None for a .nii)."""
    inflater = zlib.decompressobj(wbits=31) if data.startswith(b"\x1f\x8b") else None
    head = data[:_NIFTI_HEADER] if inflater is None else inflater.decompress(data, _NIFTI_HEADER)
    if len(head) < _NIFTI_HEADER or head[344:348] != b"n+1\x00":
        raise InvalidImage(UNRECOGNISED if inflater is None else "gzip data is not a NIfTI-1 (.nii.gz) image")
    return Nifti1Header.from_fileobj(io.BytesIO(head), check=False), inflater, head


def _nifti_header(data: bytes, limits: ImageLimits):
    """(header, shape, depth, dtype, offset, total, inflater, head) from a .nii / .nii.gz header."""
    header, inflater, head = _nifti_head(data)
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
    return header, shape, depth, dtype, offset, total, inflater, head


def _nifti_plan(data: bytes, limits: ImageLimits) -> _Plan:
    _, shape, _, dtype, _, total, inflater, _ = _nifti_header(data, limits)
    # the inflated volume, twice while zlib joins its output blocks (none for .nii: viewed in
    # place), the slice and its scaled float64 copy
    return _Plan(shape[1], shape[0], 1, dtype.itemsize + 8, extra=2 * total if inflater is not None else 0)


def _decode_nifti(data: bytes, inp: ImageInput, limits: ImageLimits) -> DecodedImage:
    header, shape, depth, dtype, offset, total, inflater, head = _nifti_header(data, limits)
    buffer, start = data, offset
    if inflater is not None:  # the voxels, inflated after the header (not joined to it: no copy)
        buffer, start = inflater.decompress(inflater.unconsumed_tail, total - len(head)), offset - len(head)
    if len(buffer) < start + math.prod(shape) * dtype.itemsize:
        raise InvalidImage("NIfTI data is truncated or corrupt")
    volume = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=start)
    plane = volume.reshape((shape[0], shape[1], depth), order="F")[:, :, _slice_index(depth, inp.slice_index)]
    slope, inter = header.get_slope_inter()
    values = plane.T[::-1] if slope is None else plane.T[::-1] * float(slope) + float(inter or 0.0)
    zooms = header.get_zooms()
    return DecodedImage(normalise(values, inp.window), "nifti", spacing_mm=_spacing((zooms[1], zooms[0])))
