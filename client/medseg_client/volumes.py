"""The ``medseg.v1.Volumes`` calls of the SDK: upload a 3-D volume once, segment a structure
through it (the slice masks stream back as they are done), refine, undo, fetch the mask as
NIfTI, delete. Mixed into :class:`medseg_client.SegmentationClient` (one channel for both
services)::

    from medseg_client import SegmentationClient

    with SegmentationClient("127.0.0.1:50051") as client:
        info = client.upload_volume("brain_t1.nii.gz")           # or a DICOM folder, or .npy + spacing
        stream = client.segment_volume(info.volume_id, slice_index=72, box=(60, 80, 75, 98),
                                       range=(65, 80))
        for s in stream:                                           # as each slice is done
            print(s.slice_index, s.area, s.predicted_iou)          # s.mask: bool (H, W), input convention
        print(stream.summary.voxel_count, stream.summary.volume_ml)
        mask = client.get_segment_mask(info.volume_id, stream.summary.segment_id)
        open("mask.nii.gz", "wb").write(mask.nifti_gz)             # the input's grid and affine
        client.delete_volume(info.volume_id)

A DICOM series also gives its segment as a DICOM SEG (``get_segment_mask(..., dicom_seg=True)``),
and a series in the gateway's PACS is segmented without uploading it::

        study = client.segment_study(study_uid, series_uid, slice_index=54, box=(80, 60, 180, 170),
                                     store=True, label="liver", timeout=600)
        print(study.seg_sop_instance_uid, study.stored, study.summary.volume_ml)

Coordinates are the *input-convention pixels* of slice ``k`` (x = column, y = row, origin at
the top-left corner): NIfTI ``numpy.flipud(vol[:, :, k].T)`` of the stored array (as the 2-D
``segment`` call shows NIfTI slice ``k``), DICOM series file ``k`` after sorting along the slice
normal by ImagePositionPatient, raw ``array[k]`` of a ``(Z, H, W)`` array. Masks come back in
that convention, at each slice's size. Only grpcio, protobuf and numpy are needed; reading a
volume's pixels locally (:func:`volume_slices`, the CLI's overlays) needs nibabel (NIfTI) or
pydicom (DICOM): ``pip install 'medseg-client[files]'``.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
import re
from typing import Any

import grpc
import numpy as np

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from medseg_client._optional import require
from medseg_client.images import window_message, wire_dtype
from medseg_client.masks import MaskEncoding, decode_mask, wire_encoding
from medseg_client.prompts import _point
from medseg_client.seg import DicomSegOptions, dicom_seg_message
from medseg_client.wire import DICOM_SEG_ENCODING, DTYPE_TO_PB, MASK_ENCODINGS, VOLUME_FORMAT_TO_PB

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SegmentMask",
    "SegmentStudyResult",
    "SliceMask",
    "VolumeClient",
    "VolumeInfo",
    "VolumeSlices",
    "VolumeStream",
    "VolumeSummary",
    "dicom_series_files",
    "volume_kind",
    "volume_slices",
]

DEFAULT_CHUNK_BYTES = 1024 * 1024
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOMDIR = "DICOMDIR"
# A DICOM UID: digit groups separated by dots, at most 64 characters (PS3.5 9.1).
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_CHARS = 64


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class VolumeInfo:
    """An uploaded volume. ``spacing_mm``: (row, column, slice) of the input-convention slices;
    ``window``: (center, width) applied to every slice, and ``window_source`` where it came from."""

    volume_id: str
    depth: int
    height: int
    width: int
    spacing_mm: tuple[float, ...]
    window: tuple[float, float]
    window_source: str
    source_format: str
    stored_bytes: int
    expires_in_s: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(depth, height, width)."""
        return self.depth, self.height, self.width


@dataclass(frozen=True)
class SliceMask:
    """One slice of a segment: ``mask`` bool ``(height, width)`` in the slice's input convention
    (all False: the slice is, now, empty)."""

    slice_index: int
    mask: np.ndarray
    predicted_iou: float
    area: int


@dataclass(frozen=True)
class VolumeSummary:
    """The state of a segment after a call (the last message of a streamed answer)."""

    volume_id: str
    segment_id: str
    model_name: str
    model_version: str
    voxel_count: int
    volume_ml: float
    first_slice: int  # -1 (and last_slice -1) when the segment is empty
    last_slice: int
    slices_changed: int
    stop_reasons: tuple[str, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)
    embeddings_reused: int = 0
    interactions: int = 0


@dataclass(frozen=True)
class SegmentMask:
    """``GetSegmentMask``: the 3-D mask as gzipped NIfTI bytes (uint8 {0, 1}, the input's grid
    and affine), its non-empty slices decoded, and the summary; ``dicom_seg``: the segment as a
    DICOM SEG of the uploaded series (Part 10 bytes) when asked for (``dicom_seg=True``), else
    ``None``."""

    nifti_gz: bytes
    slices: list[SliceMask]
    summary: VolumeSummary
    dicom_seg: bytes | None = None

    def nifti(self) -> Any:
        """The mask as a ``nibabel`` image (needs nibabel: ``pip install 'medseg-client[files]'``)."""
        nibabel = require("nibabel", "files", "reading the NIfTI mask")
        return nibabel.Nifti1Image.from_bytes(_gunzip(self.nifti_gz))


@dataclass(frozen=True)
class SegmentStudyResult:
    """``SegmentStudy``: a series of the gateway's PACS, segmented and written as a DICOM SEG.

    ``seg_sop_instance_uid`` / ``seg_series_instance_uid``: the SEG written (new UIDs each call);
    ``stored``: the PACS accepted it (``store=True``); ``dicom_seg``: its Part 10 bytes with
    ``return_dicom_seg=True``, else ``None``; ``volume``: the retrieved series' geometry
    (``volume_id`` empty unless ``keep_volume=True``); ``summary``: the segment's;
    ``instances_retrieved``: files fetched from the PACS; ``timings_ms``: per step (retrieve,
    decode, segment, write_seg, store, total)."""

    seg_sop_instance_uid: str
    seg_series_instance_uid: str
    stored: bool
    dicom_seg: bytes | None
    volume: VolumeInfo
    summary: VolumeSummary
    instances_retrieved: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class VolumeStream(Iterator[SliceMask]):
    """A streamed answer (SegmentVolume, RefineSegment, UndoSegment): iterating yields each
    :class:`SliceMask` as the gateway sends it; :attr:`summary` (the last message) is there once
    the stream has ended (reading it first reads the rest). :attr:`slices` keeps every slice
    received. :meth:`cancel` ends the call early (the gateway stops within one slice); a gRPC
    error raises :class:`grpc.RpcError` from the iteration. Use as a context manager to cancel
    a stream left unfinished."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.slices: list[SliceMask] = []
        self._summary: VolumeSummary | None = None

    def __iter__(self) -> VolumeStream:
        return self

    def __next__(self) -> SliceMask:
        if self._summary is not None:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            raise ValueError("the gateway ended the stream without its summary message") from None
        which = message.WhichOneof("item")
        if which == "summary":
            self._summary = _summary(message.summary)
            raise StopIteration
        if which != "slice":
            raise ValueError("the gateway sent a stream message with neither a slice nor a summary")
        item = _slice(message.slice)
        self.slices.append(item)
        return item

    @property
    def done(self) -> bool:
        return self._summary is not None

    @property
    def summary(self) -> VolumeSummary:
        for _ in self:
            pass
        assert self._summary is not None
        return self._summary

    def cancel(self) -> None:
        """Cancel the call; iterating further raises :class:`grpc.RpcError` (CANCELLED)."""
        self._call.cancel()

    def __enter__(self) -> VolumeStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if not self.done:
            self.cancel()


# --------------------------------------------------------------------------- what a path is
def volume_kind(path: str | Path) -> str:
    """``"dicom_series"`` (a folder), ``"nifti"`` (.nii, .nii.gz) or ``"raw"`` (.npy);
    :class:`ValueError` otherwise."""
    path = Path(path)
    if path.is_dir():
        return "dicom_series"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".npy"):
        return "raw"
    raise ValueError(f"unsupported volume {path.name!r}: give a .nii/.nii.gz file, a folder holding one DICOM "
                     "series, or a .npy (Z, H, W) array with its spacing")


def dicom_series_files(folder: str | Path) -> list[Path]:
    """The files a DICOM folder upload sends: every regular file in ``folder`` (not its
    subfolders), sorted by name, without DICOMDIR. :class:`ValueError` when there is none."""
    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.name.upper() != DICOMDIR),
                   key=lambda p: p.name)
    if not files:
        raise ValueError(f"the folder {folder.name!r} holds no file to upload as a DICOM series")
    return files


# --------------------------------------------------------------------------- the calls
class VolumeClient:
    """The Volumes calls; mixed into :class:`medseg_client.SegmentationClient`, whose channel,
    token and default deadline they use (create a ``SegmentationClient``, not this class).
    Server errors raise :class:`grpc.RpcError`, mistakes caught before sending
    :class:`ValueError` (and :class:`OSError` for unreadable files)."""

    _channel: grpc.Channel
    _metadata: tuple[tuple[str, str], ...] | None
    _volumes_stub: vpb_grpc.VolumesStub | None = None

    def _deadline(self, timeout: float | None) -> float:  # pragma: no cover - SegmentationClient's
        raise NotImplementedError

    @property
    def _volumes(self) -> vpb_grpc.VolumesStub:
        if self._volumes_stub is None:
            self._volumes_stub = vpb_grpc.VolumesStub(self._channel)
        return self._volumes_stub

    def upload_volume(
        self,
        source: str | Path | np.ndarray,
        *,
        spacing: Sequence[float] | None = None,
        window: Sequence[float] | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> VolumeInfo:
        """Upload one volume; returns its :class:`VolumeInfo` (``volume_id`` for later calls).

        ``source``: a ``.nii``/``.nii.gz`` file (sent unchanged), a folder holding one DICOM
        series (every regular file in it, sorted by name, DICOMDIR skipped; the gateway sorts
        the slices by position), a ``.npy`` file or a numpy array of shape ``(Z, H, W)`` (slice
        ``k`` is ``array[k]``; then ``spacing`` = ``(sx, sy, sz)`` in mm, column, row and slice
        spacing, is required). ``window``: ``(center, width)`` in native units for every slice
        (default: the file's, the modality's or a percentile stretch). Files are read and sent
        in parts of ``chunk_bytes``, one at a time.
        """
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        header, payloads = _upload_plan(source, spacing)
        if window is not None:
            header.window.CopyFrom(window_message(window))
        header.total_bytes = sum(size for size, _ in payloads)
        sender = _Sender(header, payloads, int(chunk_bytes))
        try:
            response = self._volumes.UploadVolume(iter(sender), timeout=self._deadline(timeout),
                                                  metadata=self._metadata)
        except grpc.RpcError:
            if sender.error is not None:  # our own file could not be read: that is the error
                raise sender.error from None
            raise
        return _info(response)

    def segment_volume(
        self,
        volume_id: str,
        *,
        slice_index: int | None = None,
        box: Sequence[float] | None = None,
        range: Sequence[int] | None = None,  # noqa: A002 - the documented name
        model: str = "",
        segment_id: str = "",
        encoding: int | MaskEncoding = pb.MASK_ENCODING_BITS,
        timeout: float | None = None,
    ) -> VolumeStream:
        """Segment one structure through the volume (a new segment); returns the stream.

        ``box``: ``(x0, y0, x1, y1)`` on slice ``slice_index`` (both or neither; a promptable
        model such as LiteMedSAM needs them: the mask is propagated from that slice to both
        sides until it vanishes or ``range`` ends). Neither, with a prompt-free model: every
        slice of the range. ``range``: ``(first, last)`` slices, inclusive (default: all).
        ``model``: ``""`` = the server's default. ``timeout`` bounds the whole stream.
        """
        if (box is None) != (slice_index is None):
            raise ValueError("give box and slice_index together (the slice the box is drawn on), or neither")
        request = vpb.SegmentVolumeRequest(volume_id=str(volume_id), model=model, segment_id=segment_id,
                                           encoding=wire_encoding(encoding))
        if box is not None:
            request.slice_index = _index(slice_index, "slice_index")
            request.box.CopyFrom(_box(box))
        if range is not None:
            request.range.CopyFrom(_slice_range(range, "range"))
        call = self._volumes.SegmentVolume(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return VolumeStream(call)

    def refine_segment(
        self,
        volume_id: str,
        segment_id: str,
        *,
        slice_index: int | None = None,
        box: Sequence[float] | None = None,
        erase: Sequence[int] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        encoding: int | MaskEncoding = pb.MASK_ENCODING_BITS,
        timeout: float | None = None,
    ) -> VolumeStream:
        """Change a segment: add ``box`` on slice ``slice_index`` (re-segments from there),
        add clicks ``points`` on slice ``slice_index`` (``(x, y, label)``, label 1 foreground,
        0 background; a model that takes point prompts), or ``erase`` = ``(first, last)``
        slices, inclusive; exactly one of the three. The stream carries only the slices that
        changed (an empty mask: cleared), then the summary."""
        clicking = points is not None
        adding = box is not None or (slice_index is not None and not clicking)
        if adding + clicking + (erase is not None) != 1:
            raise ValueError("give exactly one action: slice_index + box (add a box), slice_index + points (add "
                             "clicks), or erase=(first, last)")
        request = vpb.RefineSegmentRequest(volume_id=str(volume_id), segment_id=str(segment_id),
                                           encoding=wire_encoding(encoding))
        if clicking:
            if slice_index is None or not points:
                raise ValueError("adding clicks needs slice_index and at least one point")
            request.add_points.CopyFrom(vpb.AddPoints(slice_index=_index(slice_index, "slice_index"),
                                                      points=[_point(p) for p in points]))
        elif adding:
            if box is None or slice_index is None:
                raise ValueError("adding a box needs both slice_index and box")
            request.add_box.CopyFrom(vpb.AddBox(slice_index=_index(slice_index, "slice_index"), box=_box(box)))
        else:
            request.erase.CopyFrom(_slice_range(erase, "erase"))
        call = self._volumes.RefineSegment(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return VolumeStream(call)

    def add_box(self, volume_id: str, segment_id: str, slice_index: int, box: Sequence[float],
                **kwargs: Any) -> VolumeStream:
        """:meth:`refine_segment` with a box on another slice."""
        return self.refine_segment(volume_id, segment_id, slice_index=slice_index, box=box, **kwargs)

    def add_points(self, volume_id: str, segment_id: str, slice_index: int, points: Sequence[Sequence[float]],
                   **kwargs: Any) -> VolumeStream:
        """:meth:`refine_segment` with clicks ``(x, y, label)`` on a slice (label 1: on the
        structure, 0: not); they add to the clicks sent on that slice before."""
        return self.refine_segment(volume_id, segment_id, slice_index=slice_index, points=points, **kwargs)

    def erase_slices(self, volume_id: str, segment_id: str, first: int, last: int, **kwargs: Any) -> VolumeStream:
        """:meth:`refine_segment` erasing slices ``first..last`` (inclusive)."""
        return self.refine_segment(volume_id, segment_id, erase=(first, last), **kwargs)

    def undo_segment(self, volume_id: str, segment_id: str, *,
                     encoding: int | MaskEncoding = pb.MASK_ENCODING_BITS,
                     timeout: float | None = None) -> VolumeStream:
        """Undo the segment's last interaction; streams the slices that changed, then the summary."""
        request = vpb.UndoSegmentRequest(volume_id=str(volume_id), segment_id=str(segment_id),
                                         encoding=wire_encoding(encoding))
        call = self._volumes.UndoSegment(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return VolumeStream(call)

    def get_segment_mask(self, volume_id: str, segment_id: str, *,
                         encoding: int | MaskEncoding = pb.MASK_ENCODING_BITS,
                         dicom_seg: bool = False,
                         dicom_seg_options: DicomSegOptions | pb.DicomSegOptions | None = None,
                         timeout: float | None = None) -> SegmentMask:
        """The segment's whole mask: NIfTI bytes on the input's grid, non-empty slices, summary.

        ``dicom_seg=True`` (a volume uploaded as a DICOM series only; any other is INVALID_ARGUMENT):
        also the segment as a DICOM SEG of the series (:attr:`SegmentMask.dicom_seg`), written as
        ``dicom_seg_options`` says (one segment; only with ``dicom_seg``)."""
        if dicom_seg_options is not None and not dicom_seg:
            raise ValueError("dicom_seg_options go only with dicom_seg=True")
        request = vpb.GetSegmentMaskRequest(volume_id=str(volume_id), segment_id=str(segment_id),
                                            encoding=wire_encoding(encoding), dicom_seg=bool(dicom_seg))
        options = dicom_seg_message(dicom_seg_options, max_segments=1)
        if options is not None:
            request.dicom_seg_options.CopyFrom(options)
        response = self._volumes.GetSegmentMask(request, timeout=self._deadline(timeout), metadata=self._metadata)
        if dicom_seg and not response.dicom_seg:
            raise ValueError("the gateway answered a DICOM SEG request without the SEG "
                             "(GetSegmentMaskResponse.dicom_seg)")
        return SegmentMask(nifti_gz=bytes(response.nifti_gz), slices=[_slice(s) for s in response.slices],
                           summary=_summary(response.summary),
                           dicom_seg=bytes(response.dicom_seg) if dicom_seg else None)

    def segment_study(
        self,
        study_uid: str,
        series_uid: str,
        *,
        slice_index: int | None = None,
        box: Sequence[float] | None = None,
        model: str = "",
        range: Sequence[int] | None = None,  # noqa: A002 - the documented name
        window: Sequence[float] | None = None,
        store: bool = False,
        return_dicom_seg: bool = False,
        label: str = "",
        dicom_seg_options: DicomSegOptions | pb.DicomSegOptions | None = None,
        keep_volume: bool = False,
        timeout: float | None = None,
    ) -> SegmentStudyResult:
        """Segment a series of the gateway's PACS (``--pacs-url``): the gateway retrieves it by its
        Study and Series Instance UIDs, segments it as :meth:`segment_volume` does (``slice_index``
        + ``box``, both or neither, on the slices sorted along the normal; ``range``; ``model``;
        ``window`` = ``(center, width)``, default as for an upload), writes a DICOM SEG and, with
        ``store=True``, stores it back in the PACS under the source's study (STOW-RS).

        ``return_dicom_seg``: also return the SEG's bytes. ``label``: the segment's label (or give
        ``dicom_seg_options``, not both with a segment in it). ``keep_volume``: keep the series as
        this caller's volume (``result.volume.volume_id``, segment ``result.summary.segment_id``) to
        refine it; else the gateway forgets it when it answers. ``timeout``: retrieval, segmentation
        and storage together (pass one longer than the client's default for a large series).

        Server errors (:class:`grpc.RpcError`) beyond the other calls': FAILED_PRECONDITION (no
        PACS configured, or the PACS refused the SEG), UNAVAILABLE (the PACS unreachable or
        failing), NOT_FOUND (no such study/series), RESOURCE_EXHAUSTED (the series is too large).
        """
        if (box is None) != (slice_index is None):
            raise ValueError("give box and slice_index together (the slice the box is drawn on), or neither")
        options = dicom_seg_message(dicom_seg_options, max_segments=1)
        if label:
            if options is not None and options.segments:
                raise ValueError("give the segment's label either as label or in dicom_seg_options, not both")
            labelled = dicom_seg_message(DicomSegOptions(segments=[label]))
            if options is None:
                options = labelled
            else:
                options.segments.extend(labelled.segments)
        request = vpb.SegmentStudyRequest(study_instance_uid=_uid(study_uid, "study_uid"),
                                          series_instance_uid=_uid(series_uid, "series_uid"), model=model,
                                          store=bool(store), return_dicom_seg=bool(return_dicom_seg),
                                          keep_volume=bool(keep_volume))
        if box is not None:
            request.slice_index = _index(slice_index, "slice_index")
            request.box.CopyFrom(_box(box))
        if range is not None:
            request.range.CopyFrom(_slice_range(range, "range"))
        if window is not None:
            request.window.CopyFrom(window_message(window))
        if options is not None:
            request.dicom_seg_options.CopyFrom(options)
        response = self._volumes.SegmentStudy(request, timeout=self._deadline(timeout), metadata=self._metadata)
        if return_dicom_seg and not response.dicom_seg:
            raise ValueError("the gateway answered without the SEG asked for (SegmentStudyResponse.dicom_seg)")
        return SegmentStudyResult(seg_sop_instance_uid=response.seg_sop_instance_uid,
                                  seg_series_instance_uid=response.seg_series_instance_uid,
                                  stored=bool(response.stored),
                                  dicom_seg=bytes(response.dicom_seg) if return_dicom_seg else None,
                                  volume=_info(response.volume), summary=_summary(response.summary),
                                  instances_retrieved=int(response.instances_retrieved),
                                  timings_ms=dict(response.timings_ms))

    def delete_volume(self, volume_id: str, *, timeout: float | None = None) -> bool:
        """Forget the volume and its segments now; False when there was no such volume."""
        response = self._volumes.DeleteVolume(vpb.DeleteVolumeRequest(volume_id=str(volume_id)),
                                              timeout=self._deadline(timeout), metadata=self._metadata)
        return bool(response.deleted)


# --------------------------------------------------------------------------- upload helpers
def _upload_plan(source: str | Path | np.ndarray,
                 spacing: Sequence[float] | None) -> tuple[vpb.VolumeHeader, list[tuple[int, Any]]]:
    """The header and the payloads (size, path or bytes) of an upload."""
    if isinstance(source, np.ndarray):
        return _raw_plan(source, spacing)
    path = Path(source)
    kind = volume_kind(path)
    if kind == "raw":
        return _raw_plan(np.load(path, allow_pickle=False), spacing)
    if spacing is not None:
        raise ValueError("spacing is only for raw arrays: NIfTI and DICOM carry their own")
    if kind == "nifti":
        return vpb.VolumeHeader(format=VOLUME_FORMAT_TO_PB["nifti"]), [(path.stat().st_size, path)]
    files = dicom_series_files(path)
    header = vpb.VolumeHeader(format=VOLUME_FORMAT_TO_PB["dicom_series"], file_count=len(files))
    return header, [(p.stat().st_size, p) for p in files]


def _raw_plan(array: np.ndarray, spacing: Sequence[float] | None) -> tuple[vpb.VolumeHeader, list[tuple[int, Any]]]:
    array = np.asarray(array)
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"a raw volume is a (Z, H, W) array (slice k = array[k]); got shape {array.shape}")
    if spacing is None:
        raise ValueError("a raw volume needs spacing=(sx, sy, sz) in mm: column, row and slice spacing")
    values = [float(v) for v in spacing]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing is (sx, sy, sz) in mm, three finite values > 0; got {tuple(spacing)}")
    array = wire_dtype(array)
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes(order="C")
    raw = vpb.RawVolume(dtype=DTYPE_TO_PB[array.dtype.name], shape=[int(n) for n in array.shape], spacing_mm=values)
    return vpb.VolumeHeader(format=VOLUME_FORMAT_TO_PB["raw"], raw=raw), [(len(data), data)]


class _Sender:
    """The request iterator of an upload: the header, then each payload in parts (files are
    read one at a time). A file that cannot be read ends the stream early and is kept in
    :attr:`error`, raised by the caller instead of the server's answer to the cut stream."""

    def __init__(self, header: vpb.VolumeHeader, payloads: list[tuple[int, Any]], chunk: int) -> None:
        self.header, self.payloads, self.chunk = header, payloads, chunk
        self.error: OSError | None = None

    def __iter__(self) -> Iterator[vpb.UploadVolumeRequest]:
        yield vpb.UploadVolumeRequest(header=self.header)
        for _, payload in self.payloads:
            try:
                data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
            except OSError as exc:
                self.error = exc
                return
            view = memoryview(data)
            for start in range(0, max(len(data), 1), self.chunk):
                end = start + self.chunk
                yield vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=bytes(view[start:end]),
                                                                     end_of_file=end >= len(data)))
            del view, data


# --------------------------------------------------------------------------- messages


def _index(value: int, name: str) -> int:
    if int(value) != value or int(value) < 0:
        raise ValueError(f"{name} must be a slice index >= 0, got {value!r}")
    return int(value)


def _uid(value: str, name: str) -> str:
    uid = str(value).strip()
    if not uid:
        raise ValueError(f"{name} is required (a DICOM UID such as 1.2.840.113619.2.55.3)")
    if len(uid) > MAX_UID_CHARS or not _UID.fullmatch(uid):
        raise ValueError(f"{name} is not a DICOM UID (digits separated by dots, at most {MAX_UID_CHARS} "
                         "characters)")
    return uid


def _box(box: Sequence[float]) -> pb.Box:
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {len(box)} values: {tuple(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def _slice_range(values: Sequence[int], name: str) -> vpb.SliceRange:
    if len(values) != 2:
        raise ValueError(f"{name} is (first, last), got {tuple(values)}")
    first, last = _index(values[0], f"{name} first"), _index(values[1], f"{name} last")
    if first > last:
        raise ValueError(f"{name}: first ({first}) is after last ({last})")
    return vpb.SliceRange(first=first, last=last)


def _info(msg: vpb.VolumeInfo) -> VolumeInfo:
    return VolumeInfo(volume_id=msg.volume_id, depth=int(msg.depth), height=int(msg.height), width=int(msg.width),
                      spacing_mm=tuple(float(v) for v in msg.spacing_mm),
                      window=(float(msg.window.center), float(msg.window.width)), window_source=msg.window_source,
                      source_format=msg.source_format, stored_bytes=int(msg.stored_bytes),
                      expires_in_s=float(msg.expires_in_s))


def _slice(msg: vpb.SliceMaskMessage) -> SliceMask:
    mask = msg.mask
    encoding = MASK_ENCODINGS.get(mask.encoding)
    if encoding is None or encoding == DICOM_SEG_ENCODING[1]:  # a SEG is no slice encoding
        raise ValueError(f"slice {msg.slice_index}: the server used an unknown mask encoding {mask.encoding}")
    return SliceMask(slice_index=int(msg.slice_index), mask=decode_mask(mask.data, mask.height, mask.width, encoding),
                     predicted_iou=float(mask.predicted_iou), area=int(mask.area))


def _summary(msg: vpb.VolumeSummary) -> VolumeSummary:
    return VolumeSummary(volume_id=msg.volume_id, segment_id=msg.segment_id, model_name=msg.model.name,
                         model_version=msg.model.version, voxel_count=int(msg.voxel_count),
                         volume_ml=float(msg.volume_ml), first_slice=int(msg.first_slice),
                         last_slice=int(msg.last_slice), slices_changed=int(msg.slices_changed),
                         stop_reasons=tuple(msg.stop_reasons), timings_ms=dict(msg.timings_ms),
                         embeddings_reused=int(msg.embeddings_reused), interactions=int(msg.interactions))


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# --------------------------------------------------------------------------- local pixels (display)
class VolumeSlices:
    """Input-convention slices of a local volume in native units (float64), for display:
    ``slices[k]`` is what the gateway calls slice ``k`` (see the module docstring)."""

    def __init__(self, depth: int, read) -> None:
        self.depth = depth
        self._read = read

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= int(k) < self.depth:
            raise IndexError(f"slice {k} is outside 0..{self.depth - 1}")
        return self._read(int(k))


def volume_slices(source: str | Path | np.ndarray) -> VolumeSlices:
    """The input-convention slices of a volume file (as :meth:`VolumeClient.upload_volume`
    sends it), read locally: NIfTI needs nibabel, DICOM pydicom (the ``files`` extra). DICOM
    files are sorted along the slice normal by ImagePositionPatient, as the gateway does."""
    if isinstance(source, np.ndarray) or volume_kind(source) == "raw":
        array = np.asarray(source) if isinstance(source, np.ndarray) else np.load(Path(source), allow_pickle=False)
        if array.ndim != 3:
            raise ValueError(f"a raw volume is a (Z, H, W) array; got shape {array.shape}")
        return VolumeSlices(array.shape[0], lambda k: np.asarray(array[k], dtype=np.float64))
    if volume_kind(source) == "nifti":
        nibabel = require("nibabel", "files", "reading a NIfTI volume's slices")
        image = nibabel.load(str(source))
        shape = image.shape
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            raise ValueError(f"a NIfTI volume is 3-D; this one has shape {tuple(shape)}")

        def nifti_slice(k: int) -> np.ndarray:
            plane = np.asarray(image.dataobj[(slice(None), slice(None), k) + (0,) * (len(shape) - 3)],
                               dtype=np.float64)
            return np.flipud(plane.T)

        return VolumeSlices(int(shape[2]), nifti_slice)
    return _dicom_slices(Path(source))


def _dicom_slices(folder: Path) -> VolumeSlices:
    pydicom = require("pydicom", "files", "reading a DICOM series' slices")
    positions = []
    for path in dicom_series_files(folder):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        orientation = [float(v) for v in getattr(header, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
        position = [float(v) for v in getattr(header, "ImagePositionPatient", [0, 0, 0])]
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append((float(np.dot(normal, position)), path))
    positions.sort(key=lambda item: item[0])
    files = [path for _, path in positions]

    def dicom_slice(k: int) -> np.ndarray:
        dataset = pydicom.dcmread(files[k])
        pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
        slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
        intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
        return pixels * slope + intercept

    return VolumeSlices(len(files), dicom_slice)
