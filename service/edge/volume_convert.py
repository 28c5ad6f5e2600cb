"""The API edge of ``medseg.v1.Volumes``: protobuf messages <-> the domain types of
:mod:`service.inference.volumes` and :mod:`service.core.volume`. Like :mod:`service.edge.convert`
for the 2-D API (whose helpers it uses: windows, boxes, mask encodings and messages, the
tolerant parsers), it is the only place volume messages are read and built; the servicer
(:mod:`service.edge.volume_servicer`) goes through these functions.

Every malformed request or upload raises :class:`service.core.errors.InvalidArgument` with a
message that says what to send instead (numbers and field names only, never request text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medseg_client import wire
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb
from service.core import errors
from service.core.dicom_seg import SegOptions
from service.core.domain import MaskEncoding, Point
from service.core.volume import FORMATS, VolumeSource
from service.edge import convert
from service.inference.studies import StudyRequest, StudyResult
from service.inference.volumes import (RefineRequest, SegmentMaskResult, SegmentVolumeRequest, SliceMask,
                                       VolumeInfo, VolumeSummary)

SERVICE = vpb.DESCRIPTOR.services_by_name["Volumes"]
SERVICE_NAME = SERVICE.full_name
_FORMATS = wire.VOLUME_FORMATS
if set(_FORMATS.values()) != set(FORMATS):  # the one wire table and the core's names must agree
    raise ImportError("medseg_client.wire.VOLUME_FORMATS and service.core.volume.FORMATS differ")
_FORMAT_NAMES = ", ".join(vpb.VolumeFormat.Name(code) for code in sorted(_FORMATS))
RAW_RANK = 3


# ----------------------------------------------------------------- uploads
class UploadAssembler:
    """Reads an ``UploadVolume`` stream one message at a time (:meth:`feed`) and builds the
    :class:`VolumeSource` when it has ended (:meth:`finish`).

    The first message must be the header, and only the first; then file parts, each file
    ending with ``end_of_file``. ``max_files``: the most files one upload may carry
    (``--max-series-files``; more is RESOURCE_EXHAUSTED as soon as it shows)."""

    def __init__(self, max_files: int = 0) -> None:
        self.max_files = max_files
        self.header: vpb.VolumeHeader | None = None
        self.format = ""
        self.messages = 0
        self.received = 0                    # bytes of file parts so far
        self.files: list[bytes] = []
        self._open: list[bytes] | None = None  # the parts of the file being received

    @property
    def declared_bytes(self) -> int:
        return int(self.header.total_bytes) if self.header is not None else 0

    @property
    def shape(self) -> tuple[int, ...] | None:
        """(Z, H, W) of a raw upload once its header is read (for the audit line), else ``None``."""
        if self.header is not None and self.format == "raw":
            return tuple(int(n) for n in self.header.raw.shape)
        return None

    def feed(self, msg: object) -> int | None:
        """Take the next message. Returns the bytes to check against the upload bounds now
        (``UploadReservation.grow``): the declared ``total_bytes`` after the header,
        the bytes received so far after a part; ``None`` when there is nothing to check."""
        self.messages += 1
        n = self.messages
        if isinstance(msg, convert.Undecodable):
            raise errors.InvalidArgument(f"upload message {n} is not a valid {msg.type_name} message")
        which = msg.WhichOneof("part")
        if which is None:
            raise errors.InvalidArgument(f"upload message {n} carries neither a header nor a file_part")
        if which == "header":
            if self.header is not None:
                raise errors.InvalidArgument(f"upload message {n} is a second header: send the VolumeHeader "
                                             "once, as the first message, then only file parts")
            self._read_header(msg.header)
            return self.declared_bytes or None
        if self.header is None:
            raise errors.InvalidArgument("the upload starts with a file_part: send the VolumeHeader (format, ...) "
                                         "as the first message")
        self._part(msg.file_part)
        return self.received

    def _read_header(self, header: vpb.VolumeHeader) -> None:
        if header.format not in _FORMATS:
            known = header.format in vpb.VolumeFormat.values()
            name = vpb.VolumeFormat.Name(header.format) if known else str(header.format)
            raise errors.InvalidArgument(f"header.format {name} is not a volume format: use one of {_FORMAT_NAMES}")
        self.format = _FORMATS[header.format]
        if self.format == "raw":
            _check_raw(header.raw)
        elif header.HasField("raw"):
            raise errors.InvalidArgument(f"header.raw is only for VOLUME_FORMAT_RAW, not "
                                         f"{vpb.VolumeFormat.Name(header.format)}: leave it unset")
        if header.file_count:
            if self.format != "dicom_series":
                raise errors.InvalidArgument("header.file_count is for DICOM series; a NIfTI or raw upload is "
                                             "one file: leave it 0")
            if self.max_files and header.file_count > self.max_files:
                raise errors.PayloadTooLarge(f"header.file_count is {header.file_count}; one series upload may "
                                             f"hold at most {self.max_files} files (--max-series-files)")
        self.header = header

    def _part(self, part: vpb.FilePart) -> None:
        if self._open is None:  # this part starts a file
            if self.files and self.format != "dicom_series":
                raise errors.InvalidArgument(f"a {vpb.VolumeFormat.Name(self.header.format)} upload is one file, "
                                             f"but message {self.messages} starts a second one (the first "
                                             "ended with end_of_file)")
            if self.max_files and len(self.files) >= self.max_files:
                raise errors.PayloadTooLarge(f"the upload carries more than {self.max_files} files, the most one "
                                             "series may hold (--max-series-files)")
            self._open = []
        self._open.append(part.data)
        self.received += len(part.data)
        declared = self.declared_bytes
        if declared and self.received > declared:
            raise errors.InvalidArgument(f"the upload delivers more than the {declared} bytes header.total_bytes "
                                         "declares: declare the sum of all file parts, or 0")
        if part.end_of_file:
            data = b"".join(self._open)
            self._open = None
            if not data:
                raise errors.InvalidArgument(f"file {len(self.files) + 1} of the upload is empty (end_of_file "
                                             "without data)")
            self.files.append(data)

    def finish(self) -> VolumeSource:
        """The upload as the volume service takes it, once the stream has ended."""
        if self.header is None:
            raise errors.InvalidArgument("the upload is empty: send a VolumeHeader first, then the file parts"
                                         if self.messages == 0 else "the upload has no header")
        if self._open is not None:
            raise errors.InvalidArgument(f"the upload ended in the middle of file {len(self.files) + 1}: send "
                                         "end_of_file on its last part")
        if not self.files:
            raise errors.InvalidArgument("the upload carries no file: after the header send the file parts "
                                         "(end_of_file on each file's last part)")
        declared = self.declared_bytes
        if declared and declared != self.received:
            raise errors.InvalidArgument(f"header.total_bytes declares {declared} bytes but the upload delivered "
                                         f"{self.received}")
        header = self.header
        if header.file_count and header.file_count != len(self.files):
            raise errors.InvalidArgument(f"header.file_count declares {header.file_count} files but the upload "
                                         f"carried {len(self.files)}")
        window = convert.window_from_proto(header.window) if header.HasField("window") else None
        if self.format == "dicom_series":
            return VolumeSource(format=self.format, files=tuple(self.files), window=window)
        data = self.files[0]
        self.files = []
        if self.format == "nifti":
            return VolumeSource(format=self.format, data=data, window=window)
        raw = header.raw
        dtype, shape = wire.DTYPES[raw.dtype], tuple(int(n) for n in raw.shape)
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if len(data) != expected:
            raise errors.InvalidArgument(f"a raw {dtype} volume of shape {shape} (Z, H, W) is {expected} bytes; "
                                         f"the upload carried {len(data)}")
        return VolumeSource(format=self.format, data=data, dtype=dtype, shape=shape,
                            spacing_mm=tuple(float(v) for v in raw.spacing_mm), window=window)


def _check_raw(raw: vpb.RawVolume) -> None:
    if raw.dtype not in wire.DTYPES:
        raise errors.InvalidArgument("header.raw.dtype is missing or unknown: VOLUME_FORMAT_RAW needs one of "
                                     f"{', '.join(pb.DType.Name(d) for d in sorted(wire.DTYPES))}")
    if len(raw.shape) != RAW_RANK or min(raw.shape) < 1:
        raise errors.InvalidArgument(f"header.raw.shape is {list(raw.shape)}: VOLUME_FORMAT_RAW needs three sizes "
                                     ">= 1, (Z, H, W) = (slices, rows, columns)")
    spacing = list(raw.spacing_mm)
    if len(spacing) != RAW_RANK or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise errors.InvalidArgument(f"header.raw.spacing_mm has {len(spacing)} values: VOLUME_FORMAT_RAW needs "
                                     "three finite values > 0 in mm, (sx, sy, sz) = (column, row, slice) spacing")


# ----------------------------------------------------------------- requests
@dataclass(frozen=True)
class SegmentRef:
    """A segment named by a request (UndoSegment, GetSegmentMask), and the encoding asked for."""

    volume_id: str
    segment_id: str
    encoding: MaskEncoding = MaskEncoding.BITS
    dicom_seg: SegOptions | None = None   # GetSegmentMask: also the SEG, written with these options


def _slice_encoding(value: int) -> MaskEncoding:
    """The encoding of streamed slice masks: BITS, PNG or COCO_RLE (a SEG is one object for the
    whole segment: GetSegmentMask with dicom_seg)."""
    encoding = convert.mask_encoding_from_proto(value)
    if encoding is MaskEncoding.DICOM_SEG:
        raise errors.InvalidArgument("slice masks travel as BITS, PNG or COCO_RLE; for a DICOM SEG of the whole "
                                     "segment call GetSegmentMask with dicom_seg = true")
    return encoding


def _volume_id(value: str) -> str:
    if not value:
        raise errors.InvalidArgument("volume_id is empty: send the id UploadVolume returned")
    return value


def _segment_id(value: str) -> str:
    if not value:
        raise errors.InvalidArgument("segment_id is empty: send the id of the segment (the summary of "
                                     "SegmentVolume carries it)")
    return value


def _range(msg: vpb.SliceRange, field: str) -> tuple[int, int]:
    if msg.first > msg.last:
        raise errors.InvalidArgument(f"{field}: first ({msg.first}) is after last ({msg.last}); the range is "
                                     "first..last, both inclusive")
    return int(msg.first), int(msg.last)


def segment_request_from_proto(msg: vpb.SegmentVolumeRequest, model: str) -> SegmentVolumeRequest:
    """``model``: the served model's name, resolved from ``msg.model`` by ``Gateway.model_name``."""
    encoding = _slice_encoding(msg.encoding)
    has_box, has_slice = msg.HasField("box"), msg.HasField("slice_index")
    if has_slice and not has_box:
        raise errors.InvalidArgument("slice_index without a box: slice_index names the slice the box is drawn on; "
                                     "send both, or neither (a prompt-free model)")
    if has_box and not has_slice:
        raise errors.InvalidArgument("a box without slice_index: say which slice the box is drawn on")
    first, last = _range(msg.range, "range") if msg.HasField("range") else (None, None)
    return SegmentVolumeRequest(
        volume_id=_volume_id(msg.volume_id), model=model, segment_id=msg.segment_id,
        slice_index=int(msg.slice_index) if has_slice else None,
        box=convert.box_from_proto(msg.box) if has_box else None,
        first_slice=first, last_slice=last, encoding=encoding)


def refine_request_from_proto(msg: vpb.RefineSegmentRequest) -> RefineRequest:
    encoding = _slice_encoding(msg.encoding)
    volume_id, segment_id = _volume_id(msg.volume_id), _segment_id(msg.segment_id)
    action = msg.WhichOneof("action")
    if action is None:
        raise errors.InvalidArgument("RefineSegment needs one action: add_box (a box on a slice), add_points "
                                     "(clicks on a slice) or erase (a range of slices)")
    if action == "add_box":
        if not msg.add_box.HasField("box"):
            raise errors.InvalidArgument("add_box has no box: send the box on slice add_box.slice_index")
        return RefineRequest(volume_id, segment_id, slice_index=int(msg.add_box.slice_index),
                             box=convert.box_from_proto(msg.add_box.box), encoding=encoding)
    if action == "add_points":
        if not msg.add_points.points:
            raise errors.InvalidArgument("add_points has no points: send at least one click on slice "
                                         "add_points.slice_index")
        points = tuple(Point(p.x, p.y, p.positive) for p in msg.add_points.points)
        return RefineRequest(volume_id, segment_id, slice_index=int(msg.add_points.slice_index), points=points,
                             encoding=encoding)
    first, last = _range(msg.erase, "erase")
    return RefineRequest(volume_id, segment_id, erase_first=first, erase_last=last, encoding=encoding)


def segment_ref_from_proto(msg: vpb.UndoSegmentRequest | vpb.GetSegmentMaskRequest) -> SegmentRef:
    encoding = _slice_encoding(msg.encoding)
    dicom_seg = None
    if isinstance(msg, vpb.GetSegmentMaskRequest):
        if msg.dicom_seg:
            dicom_seg = convert.seg_options_from_proto(msg.dicom_seg_options)
        elif msg.HasField("dicom_seg_options"):
            raise errors.InvalidArgument("dicom_seg_options need dicom_seg = true")
    return SegmentRef(_volume_id(msg.volume_id), _segment_id(msg.segment_id), encoding, dicom_seg)


_UID_CHARS = frozenset("0123456789.")


def _uid(value: str, field: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{field} is empty: send the DICOM UID of the study/series in the PACS")
    if len(value) > 64 or not set(value) <= _UID_CHARS or value.startswith(".") or value.endswith(".") \
            or ".." in value:
        raise errors.InvalidArgument(f"{field} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def study_request_from_proto(msg: vpb.SegmentStudyRequest, model: str) -> StudyRequest:
    """``model``: resolved by ``Gateway.model_name`` (the one place the default applies)."""
    has_box, has_slice = msg.HasField("box"), msg.HasField("slice_index")
    if has_slice != has_box:
        raise errors.InvalidArgument("send slice_index and box together (the box is drawn on that slice), or "
                                     "neither (a prompt-free model)")
    first, last = _range(msg.range, "range") if msg.HasField("range") else (None, None)
    return StudyRequest(
        study_uid=_uid(msg.study_instance_uid, "study_instance_uid"),
        series_uid=_uid(msg.series_instance_uid, "series_instance_uid"), model=model,
        slice_index=int(msg.slice_index) if has_slice else None,
        box=convert.box_from_proto(msg.box) if has_box else None, first_slice=first, last_slice=last,
        window=convert.window_from_proto(msg.window) if msg.HasField("window") else None,
        store=msg.store, return_dicom_seg=msg.return_dicom_seg,
        dicom_seg=convert.seg_options_from_proto(msg.dicom_seg_options), keep_volume=msg.keep_volume)


def delete_request_from_proto(msg: vpb.DeleteVolumeRequest) -> str:
    return _volume_id(msg.volume_id)


def volume_id_of(msg: object) -> str | None:
    """The volume a request names, when it names one (for the servicer's early NOT_FOUND)."""
    if isinstance(msg, (vpb.SegmentVolumeRequest, vpb.RefineSegmentRequest, vpb.UndoSegmentRequest,
                        vpb.GetSegmentMaskRequest)) and msg.volume_id:
        return msg.volume_id
    return None


# ----------------------------------------------------------------- responses
def volume_info_to_proto(info: VolumeInfo) -> vpb.VolumeInfo:
    return vpb.VolumeInfo(
        volume_id=info.volume_id, depth=info.depth, height=info.height, width=info.width,
        spacing_mm=[float(v) for v in info.spacing_mm],
        window=pb.Window(center=info.window.center, width=info.window.width),
        window_source=info.window_source, source_format=info.source_format, stored_bytes=info.stored_bytes,
        expires_in_s=info.expires_in_s)


def slice_to_proto(item: SliceMask) -> vpb.SliceMaskMessage:
    mask = convert.mask_to_proto(item.height, item.width, item.encoding, item.encoded, item.predicted_iou, item.area)
    return vpb.SliceMaskMessage(slice_index=item.slice_index, mask=mask)


def summary_to_proto(summary: VolumeSummary) -> vpb.VolumeSummary:
    return vpb.VolumeSummary(
        volume_id=summary.volume_id, segment_id=summary.segment_id,
        model=pb.ModelRef(name=summary.model, version=summary.model_version),
        voxel_count=summary.voxel_count, volume_ml=summary.volume_ml, first_slice=summary.first_slice,
        last_slice=summary.last_slice, slices_changed=summary.slices_changed,
        stop_reasons=list(summary.stop_reasons), timings_ms={k: float(v) for k, v in summary.timings_ms.items()},
        embeddings_reused=summary.embeddings_reused, interactions=summary.interactions)


def stream_item_to_proto(item: SliceMask | VolumeSummary) -> vpb.VolumeSegmentResponse:
    """One message of a streamed answer: a slice, or the summary (the last)."""
    if isinstance(item, SliceMask):
        return vpb.VolumeSegmentResponse(slice=slice_to_proto(item))
    if isinstance(item, VolumeSummary):
        return vpb.VolumeSegmentResponse(summary=summary_to_proto(item))
    raise TypeError(f"a volume stream yields SliceMask or VolumeSummary, not {type(item).__name__}")


def mask_response_to_proto(result: SegmentMaskResult) -> vpb.GetSegmentMaskResponse:
    return vpb.GetSegmentMaskResponse(nifti_gz=result.nifti_gz, slices=[slice_to_proto(s) for s in result.slices],
                                      summary=summary_to_proto(result.summary),
                                      dicom_seg=result.dicom_seg.data if result.dicom_seg is not None else b"")


def study_response_to_proto(result: StudyResult, with_seg: bool) -> vpb.SegmentStudyResponse:
    return vpb.SegmentStudyResponse(
        volume=volume_info_to_proto(result.volume), summary=summary_to_proto(result.summary),
        seg_sop_instance_uid=result.seg.sop_instance_uid, seg_series_instance_uid=result.seg.series_instance_uid,
        stored=result.stored, dicom_seg=result.seg.data if with_seg else b"", instances_retrieved=result.instances,
        timings_ms={k: float(v) for k, v in result.timings_ms.items()})


def delete_response(deleted: bool) -> vpb.DeleteVolumeResponse:
    return vpb.DeleteVolumeResponse(deleted=deleted)


def is_summary(msg: vpb.VolumeSegmentResponse) -> bool:
    return msg.WhichOneof("item") == "summary"


# ----------------------------------------------------------------- what the servicer reads of a call
def volume_codecs() -> dict[str, tuple[Callable[[bytes], object], Callable[[object], bytes]]]:
    """Volumes method name -> (request parser that never raises, see
    :class:`service.edge.convert.Undecodable`; serializer of one response message)."""
    return {method.name: (convert.tolerant_parser(getattr(vpb, method.input_type.name)),
                          getattr(vpb, method.output_type.name).SerializeToString)
            for method in SERVICE.methods}


def method_kinds() -> dict[str, tuple[bool, bool]]:
    """Volumes method name -> (client streaming, server streaming)."""
    return {method.name: (method.client_streaming, method.server_streaming) for method in SERVICE.methods}


def request_summary(msg: object) -> convert.RequestSummary:
    """The model a volume request names (``None``: it names none) and its prompt count."""
    if isinstance(msg, vpb.SegmentVolumeRequest):
        return convert.RequestSummary(msg.model, 1 if msg.HasField("box") else 0)
    if isinstance(msg, vpb.RefineSegmentRequest):
        return convert.RequestSummary(None, 1 if msg.WhichOneof("action") in ("add_box", "add_points") else None)
    if isinstance(msg, vpb.SegmentStudyRequest):
        return convert.RequestSummary(msg.model, 1 if msg.HasField("box") else 0)
    return convert.RequestSummary()


def response_size(msg: object) -> tuple[int, ...] | None:
    """(depth, height, width) of the volume a response describes, when it describes one."""
    if isinstance(msg, vpb.VolumeInfo) and msg.depth:
        return int(msg.depth), int(msg.height), int(msg.width)
    return None


def info_shape(info: VolumeInfo) -> tuple[int, int, int]:
    return int(info.depth), int(info.height), int(info.width)
