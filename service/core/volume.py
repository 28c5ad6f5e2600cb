"""3-D volumes: a DICOM series, a NIfTI file or a raw array -> one :class:`Volume` (no gRPC).

The types and signatures below are the contract that service/inference/volumes.py and the
gRPC edge code against.

Conventions (the documented interface of ``volumes.proto``):

* **Slices.** A volume is a stack of 2-D slices, index ``k`` in ``[0, depth)``. Slice ``k``'s
  *input-convention pixels* (what the client's boxes and the masks it gets back refer to):
  NIfTI: ``np.flipud(vol[:, :, k].T)`` of the stored array (as the 2-D gateway shows a NIfTI
  slice); DICOM series: file ``k`` after sorting along the slice normal by
  ImagePositionPatient, with the file's own rows/columns; raw: ``array[k]`` of a ``(Z, H, W)``
  array.
* **Model orientation.** For DICOM and NIfTI the affine says where each slice's rows and
  columns point; the model sees every slice flipped/transposed (never resampled) to one
  display orientation: columns along the in-plane patient axis of lower index in R, A, S
  (increasing towards +R / +A / +S), rows along the other one, decreasing (for an axial slice:
  anterior at the top, the subject's left on the image's left; coronal and sagittal:
  superior at the top). So the same anatomy gives the model the same pixels however the
  series was stored (the CT's DICOM series and its NIfTI give identical model inputs).
  Raw arrays carry no orientation: identity. Prompts come in and masks go out in the
  input convention (:meth:`Volume.box_to_model`, :meth:`Volume.mask_to_input`).
* **Intensities.** ``voxels`` are kept in their stored dtype (memory: 1x the voxels);
  ``slope``/``intercept`` give native units (HU for CT). One window for the whole volume,
  chosen at load: the request's, else the DICOM file's WindowCenter/Width (first file), else
  the CT default 40/400 HU, else (``window_source`` "slice percentiles") each slice is clipped
  to its own 0.5th-99.5th percentiles, as the 2-D gateway normalises an image without a
  window: the model then sees each slice exactly as a 2-D request of it (measured on colin27:
  per-slice percentiles gave a higher oracle and one-box 3-D Dice than one volume-wide
  window, 0.630 vs 0.619 and 0.371 vs 0.343 mean over its 14 structures).

Reading (memory bounded before anything is allocated, as in :mod:`service.core.imageio`):

* **DICOM series.** Every file's data set is read without its Pixel Data first (imageio's
  bounded reader): one series, single-frame greyscale files of one size, position,
  orientation and pixel spacing present, parallel slices, one rescale, no duplicated
  positions and even gaps along the slice normal (so that no slice is missing). Then one
  ``(Z, rows, cols)`` array is allocated and each file, in slice order, is decoded by
  imageio's frame decoder into it: the peak is the voxels once plus one file. Affine:
  voxel ``(c, r, k)`` -> LPS ``IPP_0 + c * colSpacing * X + r * rowSpacing * Y +
  k * (IPP_last - IPP_0) / (Z - 1)``, then RAS ``= diag(-1, -1, 1) @ LPS``. Slice ``k``
  increases along the normal ``IOP[:3] x IOP[3:]`` (of the first uploaded file); the slice
  spacing is the mean gap along it (a one-file series: SpacingBetweenSlices, else
  SliceThickness, else 1 mm). Also refused: rows turned in the slice plane by more than
  ``angle_tolerance_deg``, and positions off the line from the first to the last slice by
  more than ``spacing_tolerance`` x the median gap. ``extra["file_order"]``: the upload
  index (0-based) of each sorted slice; ``extra["monochrome1"]``: True when the series is
  MONOCHROME1 (:meth:`Volume.slice_pixels` then inverts, as the 2-D decoder does);
  ``extra["dicom_header_bytes"]``: each sorted file's Part 10 bytes without its Pixel Data
  (cut before it, no copy of the pixels), parsed by :meth:`Volume.dicom_headers` for a
  derived object such as a DICOM SEG (service/core/dicom_seg.py).
* **NIfTI.** The header first; a .nii.gz is inflated, in chunks into one preallocated
  buffer, only as far as the header declares (never past ``max_volume_bytes``), a .nii is
  viewed in place. ``voxels`` is a view of the stored (Fortran-order) array; trailing
  singleton axes are dropped (``(x, y, z, 1)`` is a volume, ``input_shape`` ``(x, y, z)``).
  ``spacing_mm`` comes from pixdim, the affine from ``get_best_affine()``.
* **Raw.** ``np.frombuffer`` of the upload, no copy.

Messages say what is wrong with technical values only (sizes, mm, degrees, file numbers in
upload order, 1-based); never a DICOM tag value. Nothing is logged.
"""

from __future__ import annotations

import gzip
import io
import math
import operator
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pydicom
from nibabel.nifti1 import Nifti1Header, Nifti1Image

from service.core.domain import Box, ImageLimits, Window
from service.core.errors import InvalidArgument, InvalidImage, InvalidPrompt, PayloadTooLarge
from service.core.imageio import (
    CT_DEFAULT_WINDOW,
    RAW_DTYPES,
    _check_window,
    _detach,
    _dicom_frame,
    _dicom_pixels,
    _header_bytes,
    _nifti_head,
    _read_dicom,
    _translating,
    _window_ok,
    dicom_window,
    normalise,
)

FORMATS = ("dicom_series", "nifti", "raw")
SLICE_PERCENTILES = "slice percentiles"

PERCENTILE_SAMPLES = 4_000_000  # voxels the percentile window is computed from, at most (a strided subsample)
INFLATE_CHUNK = 16 << 20        # a .nii.gz is inflated this many bytes at a time into the voxel buffer
INFLATE_INPUT = 1 << 20         # ... from this many compressed bytes at a time
SAME_POSITION_MM = 1e-4         # two slices closer than this along the normal are the same slice
PIXEL_SPACING_RTOL = 1e-4       # files' PixelSpacing must agree to this relative tolerance
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class VolumeLimits:
    """Bounds checked before voxels are allocated (from headers / declared sizes)."""

    max_volume_bytes: int = 768 * 1024 * 1024   # voxels as stored, and the encoded upload
    max_files: int = 4096
    max_slices: int = 4096
    max_side: int = 8192
    # slice positions: the largest allowed relative deviation of one gap from the median gap
    spacing_tolerance: float = 0.1
    # slice orientations: the largest allowed angle (degrees) between two slices' normals
    angle_tolerance_deg: float = 1.0


@dataclass(frozen=True)
class VolumeSource:
    """What a client uploaded. ``format``: one of :data:`FORMATS`.

    dicom_series: ``files`` (each one DICOM Part 10 file, any order).
    nifti: ``data`` (.nii or .nii.gz bytes).
    raw: ``data`` (little-endian C-order bytes), ``dtype`` (numpy name as in
    :data:`service.core.imageio.RAW_DTYPES`), ``shape`` ``(Z, H, W)``, ``spacing_mm``
    ``(sx, sy, sz)``: column spacing, row spacing, slice spacing.
    """

    format: str
    files: tuple[bytes, ...] = ()
    data: bytes = b""
    dtype: str = ""
    shape: tuple[int, ...] = ()
    spacing_mm: tuple[float, ...] = ()
    window: Window | None = None


@dataclass(frozen=True)
class InPlane:
    """Input-convention slice pixels -> model orientation: transpose first, then flips."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False


@dataclass(frozen=True, eq=False)
class Volume:
    voxels: np.ndarray            # (Z, h, w) input-convention slices, stored dtype (may be a view)
    slope: float
    intercept: float
    window: Window
    # "request" | "file" | "modality default" | "slice percentiles" (then ``window`` holds the
    # volume's 0.5th-99.5th percentiles, for reference; each slice is clipped to its own)
    window_source: str
    spacing_mm: tuple[float, float, float]   # (row, column, slice) of MODEL-orientation slices
    in_plane: InPlane
    input_shape: tuple[int, ...]  # NIfTI: stored shape; DICOM: (columns, rows, slices); raw: (Z, H, W)
    affine: np.ndarray            # 4x4 RAS+ mm affine of the input grid (input_shape indices)
    source_format: str            # one of FORMATS
    modality: str | None = None
    nbytes: int = 0               # bytes this volume holds (voxels)
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return int(self.voxels.shape[0])

    @property
    def input_slice_shape(self) -> tuple[int, int]:
        """(rows, columns) of one slice in the input convention."""
        return int(self.voxels.shape[1]), int(self.voxels.shape[2])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, columns) of one slice in model orientation."""
        h, w = self.input_slice_shape
        return (w, h) if self.in_plane.transpose else (h, w)

    @property
    def voxel_volume_ml(self) -> float:
        r, c, s = self.spacing_mm
        return r * c * s / 1000.0

    def slice_pixels(self, k: int) -> np.ndarray:
        """float32 ``(H, W)`` in [0, 1], model orientation, windowed."""
        plane = self._to_model(self.voxels[self._slice(k)])
        if self.slope != 1.0 or self.intercept != 0.0:
            plane = plane.astype(np.float64) * self.slope + self.intercept
        # the 2-D gateway's map: same pixels for the same slice (percentiles: of this slice)
        pixels = normalise(plane, None if self.window_source == SLICE_PERCENTILES else self.window)
        if self.extra.get("monochrome1"):
            pixels = np.float32(1) - pixels  # as a viewer shows MONOCHROME1 (and as imageio does)
        return pixels

    def box_to_model(self, box: Box) -> Box:
        """A box in input-convention pixels of a slice -> the same box in model orientation."""
        x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
        if self.in_plane.transpose:
            x0, y0, x1, y1 = y0, x0, y1, x1
        return self._flip_box(x0, y0, x1, y1)

    def box_to_input(self, box: Box) -> Box:
        """A box in model-orientation pixels -> the same box in the input convention."""
        flipped = self._flip_box(box.x0, box.y0, box.x1, box.y1)  # flips are their own inverse
        if self.in_plane.transpose:
            return Box(flipped.y0, flipped.x0, flipped.y1, flipped.x1)
        return flipped

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """bool ``(H, W)`` model orientation -> bool ``(h, w)`` input convention (a view is fine)."""
        mask = self._mask(mask, self.slice_shape, "model-orientation")
        t = self.in_plane
        if t.flip_cols:
            mask = mask[:, ::-1]
        if t.flip_rows:
            mask = mask[::-1]
        return mask.T if t.transpose else mask

    def dicom_headers(self) -> tuple[pydicom.Dataset, ...]:
        """A DICOM series' files' data sets without Pixel Data, in slice order (``[k]`` is the
        file of slice ``k``), parsed afresh from ``extra["dicom_header_bytes"]`` on each call
        (the caller may change them; the volume is shared and keeps only those bytes: about
        the size of each file's attributes, 1.3 KB for a file of the real CT series, where
        kept Datasets would cost about 20 KB each in Python objects). What a DICOM SEG of
        this volume references and copies its patient/study modules from
        (service/core/dicom_seg.py); their values must not be logged."""
        headers = self.extra.get("dicom_header_bytes")
        if self.source_format != "dicom_series" or not headers:
            raise InvalidArgument(f"the volume is a {self.source_format} upload, not a DICOM series: it has no "
                                  "DICOM headers")
        with _translating("dicom"):
            return tuple(_detach(pydicom.dcmread(io.BytesIO(data))) for data in headers)

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """bool ``(h, w)`` input convention -> bool ``(H, W)`` model orientation (a view)."""
        return self._to_model(self._mask(mask, self.input_slice_shape, "input-convention"))

    def mask_array(self, masks: Mapping[int, np.ndarray]) -> np.ndarray:
        """uint8 array of ``input_shape`` (the input's own grid): ``masks`` maps slice index ->
        bool ``(H, W)`` in model orientation; slices not in it are 0."""
        out = np.zeros(self.input_shape, dtype=np.uint8)
        for k, mask in masks.items():
            plane = self.mask_to_input(mask)
            index = self._slice(k)
            if self.source_format == "nifti":
                out[:, :, index] = plane[::-1].T   # inverse of flipud(vol[:, :, k].T)
            elif self.source_format == "dicom_series":
                out[:, :, index] = plane.T         # input grid (columns, rows, slices)
            else:
                out[index] = plane
        return out

    def nifti_bytes(self, masks: Mapping[int, np.ndarray]) -> bytes:
        """:meth:`mask_array` as a gzipped NIfTI-1 with :attr:`affine` (uint8, {0, 1})."""
        image = Nifti1Image(self.mask_array(masks), np.asarray(self.affine, dtype=np.float64))
        image.header.set_data_dtype(np.uint8)
        image.header.set_xyzt_units("mm")
        image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0  # {0, 1} as stored, for any reader
        return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)  # mtime 0: the same masks, the same bytes

    # ---------------------------------------------------------------- helpers
    def _slice(self, k: int) -> int:
        """``k`` as a checked slice index (no negative indexing: a client's -1 is a mistake)."""
        try:
            index = operator.index(k)
        except TypeError:
            raise InvalidArgument("slice index must be an integer") from None
        if not 0 <= index < self.depth:
            raise InvalidArgument(f"slice index {index} is out of range: the volume has {self.depth} slice(s)")
        return index

    def _to_model(self, plane: np.ndarray) -> np.ndarray:
        """Input-convention plane -> model orientation: transpose, then flips (views only)."""
        t = self.in_plane
        if t.transpose:
            plane = plane.T
        if t.flip_rows:
            plane = plane[::-1]
        if t.flip_cols:
            plane = plane[:, ::-1]
        return plane

    def _flip_box(self, x0: float, y0: float, x1: float, y1: float) -> Box:
        """The flips of :attr:`in_plane` on a box in model-orientation pixel coordinates
        (continuous, origin at the top-left corner: a flip maps x -> W - x)."""
        rows, cols = self.slice_shape
        if self.in_plane.flip_cols:
            x0, x1 = cols - x1, cols - x0
        if self.in_plane.flip_rows:
            y0, y1 = rows - y1, rows - y0
        return Box(x0, y0, x1, y1)

    @staticmethod
    def _mask(mask: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
        """``mask`` as bool, checked to be one slice of ``shape`` (rows, columns)."""
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise InvalidPrompt(f"mask has shape {mask.shape}; a {what} slice has shape {shape} (rows, columns)")
        return mask if mask.dtype == np.bool_ else mask != 0


def load_volume(source: VolumeSource, limits: VolumeLimits = VolumeLimits()) -> Volume:
    """Decode and check an upload; :class:`service.core.errors.InvalidImage` (what is wrong)
    or :class:`service.core.errors.PayloadTooLarge` (which bound)."""
    _check_source(source, limits)
    if source.format == "dicom_series":
        return _load_dicom_series(source, limits)
    if source.format == "nifti":
        return _load_nifti(source, limits)
    return _load_raw(source, limits)


def estimate_volume_bytes(source: VolumeSource, limits: VolumeLimits = VolumeLimits()) -> int:
    """Upper bound of the voxel bytes :func:`load_volume` will keep, from headers alone.

    DICOM: the first file's data set without its Pixel Data (Rows x Columns x BitsAllocated,
    times the number of files: :func:`load_volume` refuses files of different sizes); NIfTI:
    the header's dims and data type; raw: shape x itemsize. Raises what :func:`load_volume`
    would raise for what these headers already show, and nothing else.
    """
    _check_source(source, limits)
    if source.format == "dicom_series":
        with _dicom_file(1):
            ds, _ = _read_dicom(source.files[0], _image_limits(limits), pixels=False)
            attrs = _dicom_pixels(ds, _image_limits(limits), with_pixel_data=False)
        nbytes = attrs.rows * attrs.columns * max(1, attrs.bits_allocated // 8) * len(source.files)
        _check_size(len(source.files), attrs.rows, attrs.columns, nbytes, limits)
        return nbytes
    if source.format == "nifti":
        return _nifti_layout(source.data, limits).nbytes
    dtype, shape = _raw_layout(source, limits)
    return math.prod(shape) * dtype.itemsize


# --------------------------------------------------------------------------- shared checks
def _check_source(source: VolumeSource, limits: VolumeLimits) -> None:
    """What every upload must satisfy before any header is read: a known format with its
    own field set, not empty, a valid request window, the upload within the byte bound."""
    if source.format not in FORMATS:
        raise InvalidImage(f"volume format must be one of {', '.join(FORMATS)}")
    if source.window is not None:
        _check_window(source.window)
    if source.format == "dicom_series":
        if source.data:
            raise InvalidImage("a DICOM series is sent as files, not as data")
        if not source.files:
            raise InvalidImage("the DICOM series has no files")
        if len(source.files) > limits.max_files:
            raise PayloadTooLarge(f"the DICOM series has {len(source.files)} files; the limit is "
                                  f"{limits.max_files} files per series")
        for i, data in enumerate(source.files, 1):
            if not data:
                raise InvalidImage(f"DICOM file {i} is empty")
            if data[128:132] != b"DICM":
                raise InvalidImage(f"DICOM file {i} is not a DICOM Part 10 file (no 'DICM' marker at byte 128)")
        uploaded = sum(len(data) for data in source.files)
    else:
        if source.files:
            raise InvalidImage(f"a {source.format} volume is sent as data, not as files")
        if not source.data:
            raise InvalidImage(f"the {source.format} volume's data is empty")
        uploaded = len(source.data)
    if uploaded > limits.max_volume_bytes:
        raise PayloadTooLarge(f"the upload is {uploaded} bytes; the limit is {limits.max_volume_bytes} bytes "
                              "per volume")


def _check_size(depth: int, rows: int, cols: int, nbytes: int, limits: VolumeLimits) -> None:
    """The volume bounds, from declared sizes, before the voxels are allocated."""
    if depth < 1 or rows < 1 or cols < 1:
        raise InvalidImage(f"the volume has an empty axis ({depth} slice(s) of {cols}x{rows} pixels)")
    if depth > limits.max_slices:
        raise PayloadTooLarge(f"the volume has {depth} slices; the limit is {limits.max_slices} slices per volume")
    if max(rows, cols) > limits.max_side:
        raise PayloadTooLarge(f"the volume's slices are {cols}x{rows} pixels; the limit is {limits.max_side} "
                              "pixels per side")
    if nbytes > limits.max_volume_bytes:
        raise PayloadTooLarge(f"the volume holds {nbytes} bytes of voxels; the limit is {limits.max_volume_bytes} "
                              "bytes per volume")


def _image_limits(limits: VolumeLimits) -> ImageLimits:
    """imageio's per-file bounds for one slice of a volume: its side, and the volume's byte
    bound for a file (a deflated file inflates at most to what its pixel attributes declare)."""
    return ImageLimits(max_side=limits.max_side, max_pixels=limits.max_side ** 2,
                       max_encoded_bytes=limits.max_volume_bytes)


def _check_finite(voxels: np.ndarray) -> None:
    """NaN/inf in float voxels are refused, one slice at a time (no whole-volume bool array)."""
    if voxels.dtype.kind != "f":
        return
    for k in range(voxels.shape[0]):
        if not np.isfinite(voxels[k]).all():
            raise InvalidImage(f"the volume has NaN or infinite voxel values (slice {k})")


def _choose_window(request: Window | None, file: Window | None, modality: str | None,
                   voxels: np.ndarray, slope: float, intercept: float) -> tuple[Window, str]:
    """One window for the whole volume: the request's, the file's, the CT default, else the
    0.5th/99.5th percentiles in native units."""
    if request is not None:
        return request, "request"
    if file is not None:
        return file, "file"
    if (modality or "").upper() == "CT":
        return CT_DEFAULT_WINDOW, "modality default"
    return _percentile_window(voxels, slope, intercept), SLICE_PERCENTILES


def _percentile_window(voxels: np.ndarray, slope: float, intercept: float) -> Window:
    """0.5th-99.5th percentiles, in native units, of a deterministic strided subsample of at
    most :data:`PERCENTILE_SAMPLES` voxels (a 768 MiB volume is not copied to float64);
    a constant volume gets width 1 (its voxels map to 0.5)."""
    steps = [1, 1, 1]
    counts = list(voxels.shape)
    while math.prod(counts) > PERCENTILE_SAMPLES:
        axis = int(np.argmax(counts))
        steps[axis] *= 2
        counts[axis] = -(-voxels.shape[axis] // steps[axis])
    # percentiles of the stored values (a copy in their own dtype, not float64), then rescaled:
    # the linear interpolation of percentiles commutes with the increasing map v * |slope| + b
    sample = np.ascontiguousarray(voxels[::steps[0], ::steps[1], ::steps[2]])
    lo, hi = sorted(float(v) * slope + intercept for v in np.percentile(sample, (0.5, 99.5)))
    window = Window(center=lo, width=1.0) if not hi > lo else Window(center=lo / 2 + hi / 2, width=hi - lo)
    if not _window_ok(window):
        raise InvalidImage("the volume's voxel values span too wide a range for a window; send a window")
    return window


def _dominant(direction: np.ndarray) -> int:
    return int(np.argmax(np.abs(direction)))


def _in_plane(col_dir: np.ndarray, row_dir: np.ndarray) -> InPlane:
    """The transpose/flips that bring an input slice to model orientation, from the RAS
    directions of its column axis (increasing column index) and row axis (increasing row
    index): columns along the lower-index patient axis, increasing; rows along the other,
    decreasing. Equal dominant axes (a degenerate affine): identity."""
    col_axis, row_axis = _dominant(col_dir), _dominant(row_dir)
    if col_axis == row_axis:
        return InPlane()
    transpose = col_axis > row_axis
    if transpose:
        col_dir, row_dir, col_axis, row_axis = row_dir, col_dir, row_axis, col_axis
    return InPlane(transpose=transpose, flip_rows=bool(row_dir[row_axis] > 0), flip_cols=bool(col_dir[col_axis] < 0))


def _model_spacing(row: float, col: float, depth: float, in_plane: InPlane) -> tuple[float, float, float]:
    """(row, column, slice) spacing of model-orientation slices from the input convention's."""
    return (col, row, depth) if in_plane.transpose else (row, col, depth)


def _read_only(array: np.ndarray) -> np.ndarray:
    """Volumes are shared by requests: nobody may write into their voxels."""
    array.flags.writeable = False
    return array


# --------------------------------------------------------------------------- raw
def _raw_layout(source: VolumeSource, limits: VolumeLimits) -> tuple[np.dtype, tuple[int, int, int]]:
    if source.dtype not in RAW_DTYPES:
        raise InvalidImage(f"raw dtype must be one of {', '.join(RAW_DTYPES)}")
    shape = tuple(source.shape)
    if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise InvalidImage(f"raw volume shape must be 3 integers (Z, H, W); got {len(shape)} value(s)")
    z, h, w = (int(s) for s in shape)
    if min(z, h, w) < 1:
        raise InvalidImage(f"raw volume shape {(z, h, w)} must have sides >= 1")
    dtype = np.dtype(source.dtype).newbyteorder("<")
    _check_size(z, h, w, z * h * w * dtype.itemsize, limits)
    return dtype, (z, h, w)


def _raw_spacing(spacing: tuple[float, ...]) -> tuple[float, float, float]:
    try:
        sx, sy, sz = (float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InvalidImage("raw volume spacing_mm must be 3 numbers (sx, sy, sz): column, row and slice "
                           "spacing in mm") from None
    if not all(math.isfinite(s) and s > 0 for s in (sx, sy, sz)):
        raise InvalidImage(f"raw volume spacing_mm ({sx:g}, {sy:g}, {sz:g}) must be finite and > 0 "
                           "(zero spacing)")
    return sx, sy, sz


def _load_raw(source: VolumeSource, limits: VolumeLimits) -> Volume:
    dtype, shape = _raw_layout(source, limits)
    sx, sy, sz = _raw_spacing(source.spacing_mm)
    expected = math.prod(shape) * dtype.itemsize
    if len(source.data) != expected:
        raise InvalidImage(f"raw volume data is {len(source.data)} bytes; shape {shape} of {source.dtype} "
                           f"needs {expected}")
    voxels = _read_only(np.frombuffer(source.data, dtype=dtype).reshape(shape))
    _check_finite(voxels)
    window, window_source = _choose_window(source.window, None, None, voxels, 1.0, 0.0)
    affine = np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return Volume(voxels=voxels, slope=1.0, intercept=0.0, window=window, window_source=window_source,
                  spacing_mm=(sy, sx, sz), in_plane=InPlane(), input_shape=shape, affine=affine,
                  source_format="raw", nbytes=int(voxels.nbytes))


# --------------------------------------------------------------------------- NIfTI
@dataclass(frozen=True)
class _NiftiLayout:
    """A NIfTI header, checked: where the voxels are and how large they are."""

    header: Nifti1Header
    gzip: bool         # a .nii.gz (else a .nii, viewed in place)
    shape: tuple[int, int, int]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _nifti_layout(data: bytes, limits: VolumeLimits) -> _NiftiLayout:
    """The header of a .nii / .nii.gz (only 348 bytes inflated), checked against the volume
    rules and bounds before any voxel is read."""
    with _translating("nifti"):
        header, inflater, _ = _nifti_head(data)  # 348 bytes inflated: the inflater is dropped
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton axes (x, y, z, 1) are a 3-D volume
        shape = shape[:-1]
    if len(shape) < 3:
        raise InvalidImage(f"the NIfTI image is {len(shape)}-D, not a volume: send a 3-D volume")
    if len(shape) == 4:
        raise InvalidImage(f"4-D NIfTI with {shape[3]} volumes: send one 3-D volume")
    if len(shape) > 4:
        raise InvalidImage(f"the NIfTI image is {len(shape)}-D (shape {shape}): send one 3-D volume")
    if dtype.kind not in "iuf" or dtype.fields:
        raise InvalidImage(f"NIfTI data type {dtype} is not supported; send integer or real voxels")
    if offset < 348:
        raise InvalidImage("NIfTI vox_offset is invalid for a single-file (.nii) image")
    x, y, z = shape
    _check_size(z, y, x, x * y * z * dtype.itemsize, limits)
    pixdim = [float(v) for v in header["pixdim"][1:4]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise InvalidImage(f"NIfTI voxel size (pixdim) ({pixdim[0]:g}, {pixdim[1]:g}, {pixdim[2]:g}) mm must be "
                           "finite and > 0 on every spatial axis (zero spacing)")
    return _NiftiLayout(header, inflater is not None, (x, y, z), dtype, offset)


def _nifti_voxels(data: bytes, layout: _NiftiLayout) -> np.ndarray:
    """The stored voxels as a flat array: a view of a .nii's bytes, or a .nii.gz inflated in
    :data:`INFLATE_CHUNK` pieces into one preallocated buffer, only up to the declared size."""
    count = math.prod(layout.shape)
    if not layout.gzip:
        if len(data) < layout.offset + layout.nbytes:
            raise InvalidImage(f"NIfTI data is truncated: {len(data)} bytes, the header declares "
                               f"{layout.offset + layout.nbytes}")
        return np.frombuffer(data, dtype=layout.dtype, count=count, offset=layout.offset)
    buffer = np.empty(layout.nbytes, dtype=np.uint8)
    with _translating("nifti"):
        pieces = _inflate(data, layout.offset, layout.nbytes)
        filled = 0
        for piece in pieces:
            buffer[filled:filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            filled += len(piece)
    if filled < layout.nbytes:
        raise InvalidImage(f"NIfTI data is truncated: it inflates to {filled} voxel bytes, the header declares "
                           f"{layout.nbytes}")
    return buffer.view(layout.dtype)


def _inflate(data: bytes, skip: int, size: int) -> Iterator[bytes]:
    """Inflate the gzip ``data`` afresh, drop ``skip`` bytes (header and extensions), then
    yield at most ``size`` bytes in pieces of at most :data:`INFLATE_CHUNK`; stops early at
    the end of the stream (the caller counts). The input goes in by zero-copy slices of
    :data:`INFLATE_INPUT` bytes, so zlib's ``unconsumed_tail`` never copies the whole upload."""
    inflater = zlib.decompressobj(wbits=31)
    view = memoryview(data)
    position, pending = 0, b""
    wanted = skip + size
    while wanted > 0 and not inflater.eof:
        if not pending:
            if position >= len(view):
                return
            pending = view[position:position + INFLATE_INPUT]
            position += len(pending)
        piece = inflater.decompress(pending, min(wanted, INFLATE_CHUNK))
        pending = inflater.unconsumed_tail
        wanted -= len(piece)
        if skip >= len(piece):
            skip -= len(piece)
            continue
        yield piece[skip:] if skip else piece
        skip = 0


def _nifti_scaling(header: Nifti1Header) -> tuple[float, float]:
    """scl_slope/scl_inter as nibabel reads them: slope 0 or non-finite means no scaling
    (1, 0); a valid slope with a non-finite intercept is refused."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope == 0 or not math.isfinite(slope):
        return 1.0, 0.0
    if not math.isfinite(inter):
        raise InvalidImage("NIfTI scl_inter is not finite")
    return slope, inter


def _load_nifti(source: VolumeSource, limits: VolumeLimits) -> Volume:
    layout = _nifti_layout(source.data, limits)
    slope, intercept = _nifti_scaling(layout.header)
    with _translating("nifti"):
        affine = np.asarray(layout.header.get_best_affine(), dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidImage("the NIfTI affine (qform/sform) is not finite or not invertible")
    stored = _nifti_voxels(source.data, layout).reshape(layout.shape, order="F")
    voxels = _read_only(stored).transpose(2, 1, 0)[:, ::-1, :]  # voxels[k] == flipud(stored[:, :, k].T)
    _check_finite(voxels)
    window, window_source = _choose_window(source.window, None, None, voxels, slope, intercept)
    # input slice: columns follow voxel axis 0 (increasing), rows voxel axis 1 DEcreasing (flipud)
    in_plane = _in_plane(affine[:3, 0], -affine[:3, 1])
    zooms = [float(v) for v in layout.header["pixdim"][1:4]]
    return Volume(voxels=voxels, slope=slope, intercept=intercept, window=window, window_source=window_source,
                  spacing_mm=_model_spacing(zooms[1], zooms[0], zooms[2], in_plane), in_plane=in_plane,
                  input_shape=layout.shape, affine=affine, source_format="nifti", nbytes=int(voxels.nbytes))


# --------------------------------------------------------------------------- DICOM series
@dataclass(frozen=True, eq=False)
class _SliceHeader:
    """What one file of a series says about its slice (no tag value leaves this module)."""

    number: int              # 1-based, upload order
    series: str
    rows: int
    columns: int
    bits_allocated: int
    signed: bool
    photometric: str
    position: np.ndarray     # ImagePositionPatient, LPS mm
    row_dir: np.ndarray      # IOP[:3]: direction of increasing column index
    col_dir: np.ndarray      # IOP[3:]: direction of increasing row index
    spacing: tuple[float, float]   # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float
    window: Window | None
    modality: str | None
    thickness: float | None  # SpacingBetweenSlices, else SliceThickness (only used for a 1-file series)
    header: bytes = field(default=b"", repr=False)  # the file's Part 10 bytes without Pixel Data

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)


@contextmanager
def _dicom_file(number: int) -> Iterator[None]:
    """Errors while reading file ``number`` name it (its number, never its contents)."""
    try:
        with _translating("dicom"):
            yield
    except PayloadTooLarge as exc:
        raise PayloadTooLarge(f"DICOM file {number}: {exc.message}") from exc
    except InvalidImage as exc:
        raise InvalidImage(f"DICOM file {number}: {exc.message}") from exc


def _floats(ds: pydicom.Dataset, keyword: str, count: int, number: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InvalidImage(f"DICOM file {number} has no {keyword}; a series needs ImagePositionPatient, "
                           "ImageOrientationPatient and PixelSpacing in every file to stack its slices")
    try:
        values = np.array([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise InvalidImage(f"DICOM file {number}: {keyword} is not {count} finite number(s)")
    return values


def _optional_float(ds: pydicom.Dataset, keyword: str, default: float | None, number: int) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InvalidImage(f"DICOM file {number}: {keyword} is not a number") from None
    if not math.isfinite(result):
        raise InvalidImage(f"DICOM file {number}: {keyword} is not finite")
    return result


def _unit(vector: np.ndarray, number: int) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not norm > 1e-6:
        raise InvalidImage(f"DICOM file {number}: ImageOrientationPatient has a zero direction")
    return vector / norm


def _slice_header(data: bytes, number: int, limits: ImageLimits) -> _SliceHeader:
    """Read file ``number``'s data set without Pixel Data and check it as one slice."""
    with _dicom_file(number):
        ds, _ = _read_dicom(data, limits, pixels=False)
        attrs = _dicom_pixels(ds, limits, with_pixel_data=False)
        header = _header_bytes(data, ds)
    if attrs.frames > 1:
        raise InvalidImage(f"DICOM file {number} is a multi-frame image ({attrs.frames} frames): send single-frame "
                           "files, or the frames as a raw array")
    if attrs.samples != 1 or attrs.photometric == "PALETTE COLOR":
        raise InvalidImage(f"DICOM file {number} is a colour image ({attrs.photometric}); a volume must be "
                           "greyscale")
    iop = _floats(ds, "ImageOrientationPatient", 6, number)
    position = _floats(ds, "ImagePositionPatient", 3, number)
    spacing = _floats(ds, "PixelSpacing", 2, number)
    if not (spacing > 0).all():
        raise InvalidImage(f"DICOM file {number}: PixelSpacing ({spacing[0]:g}, {spacing[1]:g}) mm must be > 0 "
                           "(zero spacing)")
    row_dir, col_dir = _unit(iop[:3], number), _unit(iop[3:], number)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise InvalidImage(f"DICOM file {number}: ImageOrientationPatient's row and column directions are not "
                           "perpendicular")
    slope = _optional_float(ds, "RescaleSlope", 1.0, number)
    if slope == 0:
        raise InvalidImage(f"DICOM file {number}: RescaleSlope is 0")
    thickness = _optional_float(ds, "SpacingBetweenSlices", None, number)
    if thickness is None or not thickness > 0:
        thickness = _optional_float(ds, "SliceThickness", None, number)
    modality = str(ds.get("Modality") or "").strip() or None
    return _SliceHeader(
        number=number, series=str(ds.get("SeriesInstanceUID") or "").strip(), rows=attrs.rows,
        columns=attrs.columns, bits_allocated=attrs.bits_allocated,
        signed=_optional_float(ds, "PixelRepresentation", 0.0, number) == 1.0, photometric=attrs.photometric,
        position=position, row_dir=row_dir, col_dir=col_dir, spacing=(float(spacing[0]), float(spacing[1])),
        slope=float(slope), intercept=float(_optional_float(ds, "RescaleIntercept", 0.0, number)),
        window=dicom_window(ds), modality=modality, thickness=thickness if thickness and thickness > 0 else None,
        header=header)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b)))))


def _check_alike(headers: list[_SliceHeader], limits: VolumeLimits) -> None:
    """All files are slices of one series: one size, pixel format, rescale, pixel spacing
    and orientation (normals and row directions within ``angle_tolerance_deg``)."""
    first = headers[0]
    for h in headers[1:]:
        if h.series != first.series:
            raise InvalidImage(f"the DICOM files belong to more than one series (file {h.number} is of another series "
                               f"than file {first.number}): send one series per volume")
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise InvalidImage(f"DICOM files differ in size: file {first.number} is {first.columns}x{first.rows} "
                               f"pixels, file {h.number} is {h.columns}x{h.rows}")
        if (h.bits_allocated, h.signed, h.photometric) != (first.bits_allocated, first.signed, first.photometric):
            raise InvalidImage(f"DICOM files differ in pixel format (BitsAllocated, PixelRepresentation or "
                               f"PhotometricInterpretation): files {first.number} and {h.number}")
        if (h.slope, h.intercept) != (first.slope, first.intercept):
            raise InvalidImage(f"DICOM files differ in RescaleSlope/RescaleIntercept (files {first.number} and "
                               f"{h.number}); a volume needs one rescale for all slices")
        if not np.allclose(h.spacing, first.spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise InvalidImage(f"DICOM files differ in PixelSpacing: file {first.number} has ({first.spacing[0]:g}, "
                               f"{first.spacing[1]:g}) mm, file {h.number} ({h.spacing[0]:g}, {h.spacing[1]:g}) mm")
        tilt = _angle_deg(h.normal, first.normal)
        if tilt > limits.angle_tolerance_deg:
            raise InvalidImage(f"the slices are not parallel: file {h.number} is tilted {tilt:.3g} degrees against "
                               f"file {first.number} (the tolerance is {limits.angle_tolerance_deg:g} degrees)")
        turn = _angle_deg(h.row_dir, first.row_dir)
        if turn > limits.angle_tolerance_deg:
            raise InvalidImage(f"the slices are not aligned: file {h.number}'s rows are turned {turn:.3g} degrees "
                               f"against file {first.number}'s in the slice plane (the tolerance is "
                               f"{limits.angle_tolerance_deg:g} degrees)")


def _sort_and_check_positions(headers: list[_SliceHeader], limits: VolumeLimits) -> tuple[list[_SliceHeader], float]:
    """Sort along the first file's slice normal by the projection of ImagePositionPatient;
    refuse duplicated positions, missing slices / uneven gaps and positions off one line.
    Returns the sorted headers and the slice spacing (mm along the normal)."""
    normal = headers[0].normal
    ordered = sorted(headers, key=lambda h: (float(h.position @ normal), h.number))
    if len(ordered) == 1:
        return ordered, ordered[0].thickness or 1.0
    along = np.array([float(h.position @ normal) for h in ordered])
    gaps = np.diff(along)
    for j, gap in enumerate(gaps):
        if gap < SAME_POSITION_MM:
            raise InvalidImage(f"DICOM files {ordered[j].number} and {ordered[j + 1].number} are at the same position "
                               "(a duplicated slice): send each slice once")
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median)
    worst = int(np.argmax(deviation))
    if deviation[worst] > limits.spacing_tolerance * median:
        raise InvalidImage(
            f"a slice is missing or the spacing is uneven: gap {gaps[worst]:.4g} mm between sorted slices "
            f"{worst + 1} and {worst + 2} (files {ordered[worst].number} and {ordered[worst + 1].number}), median gap "
            f"{median:.4g} mm (the tolerance is {limits.spacing_tolerance:g} of it)")
    start, end = ordered[0].position, ordered[-1].position
    steps = np.arange(len(ordered))[:, None] / (len(ordered) - 1)
    off = np.linalg.norm(np.stack([h.position for h in ordered]) - (start + steps * (end - start)), axis=1)
    worst = int(np.argmax(off))
    if off[worst] > limits.spacing_tolerance * median:
        raise InvalidImage(f"the slice positions are not on one line: sorted slice {worst + 1} (file "
                           f"{ordered[worst].number}) is {off[worst]:.4g} mm off the line from the first to the "
                           "last slice")
    return ordered, float(along[-1] - along[0]) / (len(ordered) - 1)


def _dicom_affine(ordered: list[_SliceHeader], spacing: float) -> np.ndarray:
    """RAS affine of the input grid (columns, rows, slices) (module docstring)."""
    first = ordered[0]
    lps = np.eye(4)
    lps[:3, 0] = first.row_dir * first.spacing[1]   # increasing column index: IOP[:3], column spacing
    lps[:3, 1] = first.col_dir * first.spacing[0]   # increasing row index: IOP[3:], row spacing
    if len(ordered) > 1:
        lps[:3, 2] = (ordered[-1].position - first.position) / (len(ordered) - 1)
    else:
        lps[:3, 2] = first.normal * spacing
    lps[:3, 3] = first.position
    return _LPS_TO_RAS @ lps


def _decode_series(files: tuple[bytes, ...], ordered: list[_SliceHeader], limits: ImageLimits) -> np.ndarray:
    """Decode the files in slice order into one preallocated ``(Z, rows, cols)`` array of
    the stored dtype (allocated with the first frame, whose dtype the decoder decides)."""
    voxels: np.ndarray | None = None
    first = ordered[0]
    for k, h in enumerate(ordered):
        with _dicom_file(h.number):
            frame, _, _ = _dicom_frame(files[h.number - 1], limits, 0)
        if frame.shape != (first.rows, first.columns):
            raise InvalidImage(f"DICOM file {h.number} decoded to shape {frame.shape}; expected "
                               f"({first.rows}, {first.columns})")
        if voxels is None:
            voxels = np.empty((len(ordered), first.rows, first.columns), dtype=frame.dtype)
        elif frame.dtype != voxels.dtype:
            raise InvalidImage(f"DICOM file {h.number} decodes to {frame.dtype} voxels, file {first.number} to "
                               f"{voxels.dtype}")
        voxels[k] = frame
        del frame
    assert voxels is not None
    return voxels


def _load_dicom_series(source: VolumeSource, limits: VolumeLimits) -> Volume:
    image_limits = _image_limits(limits)
    headers = [_slice_header(data, i, image_limits) for i, data in enumerate(source.files, 1)]
    _check_alike(headers, limits)
    first = headers[0]
    _check_size(len(headers), first.rows, first.columns,
                len(headers) * first.rows * first.columns * max(1, first.bits_allocated // 8), limits)
    ordered, slice_spacing = _sort_and_check_positions(headers, limits)
    voxels = _read_only(_decode_series(source.files, ordered, image_limits))
    _check_finite(voxels)
    top = ordered[0]
    window, window_source = _choose_window(source.window, top.window, top.modality, voxels, top.slope,
                                           top.intercept)
    affine = _dicom_affine(ordered, slice_spacing)
    in_plane = _in_plane(affine[:3, 0], affine[:3, 1])  # columns: axis 0, rows: axis 1, both increasing
    extra: dict[str, object] = {"file_order": tuple(h.number - 1 for h in ordered),
                                "dicom_header_bytes": tuple(h.header for h in ordered)}
    if top.photometric == "MONOCHROME1":
        extra["monochrome1"] = True
    return Volume(voxels=voxels, slope=top.slope, intercept=top.intercept, window=window,
                  window_source=window_source,
                  spacing_mm=_model_spacing(top.spacing[0], top.spacing[1], slice_spacing, in_plane),
                  in_plane=in_plane, input_shape=(top.columns, top.rows, len(ordered)), affine=affine,
                  source_format="dicom_series", modality=top.modality, nbytes=int(voxels.nbytes), extra=extra)
