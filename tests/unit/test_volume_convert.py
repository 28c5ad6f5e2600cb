"""service.edge.volume_convert: the only module that reads and builds medseg.v1 volume messages
(the upload stream, the requests, the streamed answers, the audit fields)."""

from __future__ import annotations

import numpy as np
import pytest

from medseg_client import wire
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client.masks import decode_mask
from service.core import errors
from service.core.domain import PAYLOAD_ENCODINGS, Box, MaskEncoding, Window
from service.core.mask_codec import encode_mask
from service.core.volume import FORMATS
from service.edge import convert
from service.edge import volume_convert as vc
from service.inference.volumes import SegmentMaskResult, SliceMask, VolumeInfo, VolumeSummary

DICOM, NIFTI, RAW = vpb.VOLUME_FORMAT_DICOM_SERIES, vpb.VOLUME_FORMAT_NIFTI, vpb.VOLUME_FORMAT_RAW
BOX = pb.Box(x0=1, y0=2, x1=30, y1=40)


def header(fmt=DICOM, **kw) -> vpb.UploadVolumeRequest:
    return vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=fmt, **kw))


def part(data: bytes, end: bool = True) -> vpb.UploadVolumeRequest:
    return vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=data, end_of_file=end))


def assemble(messages, max_files: int = 0):
    upload = vc.UploadAssembler(max_files)
    checks = [upload.feed(m) for m in messages]
    return upload.finish(), checks


def raw_header(dtype=pb.DTYPE_INT16, shape=(2, 3, 4), spacing=(0.5, 0.5, 2.0), **kw):
    return header(RAW, raw=vpb.RawVolume(dtype=dtype, shape=list(shape), spacing_mm=list(spacing)), **kw)


# ----------------------------------------------------------------- uploads
def test_a_dicom_series_upload_joins_the_parts_of_each_file_and_checks_as_it_goes():
    source, checks = assemble([header(file_count=2, total_bytes=7, window=pb.Window(center=40, width=400)),
                               part(b"ab", end=False), part(b"cd"), part(b"efg")])
    assert source.format == "dicom_series" and source.files == (b"abcd", b"efg") and source.data == b""
    assert source.window == Window(40.0, 400.0)
    # the declared total before any part, then the bytes received so far after each part
    assert checks == [7, 2, 4, 7]


def test_nifti_and_raw_uploads_are_one_file():
    source, checks = assemble([header(NIFTI), part(b"\x1f\x8b", end=False), part(b"rest")])
    assert (source.format, source.data, source.files, source.window) == ("nifti", b"\x1f\x8brest", (), None)
    assert checks == [None, 2, 6]  # nothing declared: nothing to check before the first part
    data = np.arange(24, dtype="<i2").tobytes()
    source, _ = assemble([raw_header(), part(data)])
    assert (source.format, source.dtype, source.shape, source.spacing_mm) == ("raw", "int16", (2, 3, 4),
                                                                              (0.5, 0.5, 2.0))
    assert source.data == data


@pytest.mark.parametrize("messages, match", [
    ([], "the upload is empty: send a VolumeHeader first"),
    ([part(b"x")], "starts with a file_part: send the VolumeHeader"),
    ([header(), header()], "second header"),
    ([vpb.UploadVolumeRequest()], "neither a header nor a file_part"),
    ([convert.Undecodable("medseg.v1.UploadVolumeRequest")], "not a valid medseg.v1.UploadVolumeRequest"),
    ([header(vpb.VOLUME_FORMAT_UNSPECIFIED)], "VOLUME_FORMAT_UNSPECIFIED is not a volume format: use one of "
                                              "VOLUME_FORMAT_DICOM_SERIES, VOLUME_FORMAT_NIFTI, VOLUME_FORMAT_RAW"),
    ([header(17)], "header.format 17 is not a volume format"),
    ([header(), part(b"ab", end=False)], "ended in the middle of file 1: send end_of_file on its last part"),
    ([header(), part(b"a"), part(b"b", end=False)], "ended in the middle of file 2"),
    ([header()], "carries no file"),
    ([header(), part(b"")], "file 1 of the upload is empty"),
    ([header(NIFTI), part(b"a"), part(b"b")], "VOLUME_FORMAT_NIFTI upload is one file, but message 3 starts a second"),
    ([header(total_bytes=3), part(b"ab")], "declares 3 bytes but the upload delivered 2"),
    ([header(total_bytes=3), part(b"ab", end=False), part(b"cd")], "more than the 3 bytes header.total_bytes"),
    ([header(file_count=3), part(b"a"), part(b"b")], "file_count declares 3 files but the upload carried 2"),
    ([header(NIFTI, file_count=1)], "file_count is for DICOM series"),
    ([header(NIFTI, raw=vpb.RawVolume(dtype=pb.DTYPE_UINT8))], "header.raw is only for VOLUME_FORMAT_RAW"),
    ([header(RAW)], "header.raw.dtype is missing or unknown"),
    ([raw_header(shape=(3, 4))], r"header.raw.shape is \[3, 4\]: VOLUME_FORMAT_RAW needs three sizes"),
    ([raw_header(shape=(0, 3, 4))], "needs three sizes >= 1"),
    ([raw_header(spacing=())], "header.raw.spacing_mm has 0 values"),
    ([raw_header(spacing=(1, 1, float("nan")))], "three finite values > 0"),
    ([raw_header(spacing=(1, 0, 1))], "three finite values > 0"),
    ([raw_header(), part(b"\0" * 47)], r"a raw int16 volume of shape \(2, 3, 4\) \(Z, H, W\) is 48 bytes; the upload "
                                       "carried 47"),
])
def test_a_malformed_upload_says_what_to_send(messages, match):
    with pytest.raises(errors.InvalidArgument, match=match):
        assemble(messages)


def test_an_upload_with_too_many_files_is_refused_as_soon_as_it_shows():
    with pytest.raises(errors.PayloadTooLarge, match="file_count is 5; one series upload may hold at most 4"):
        assemble([header(file_count=5)], max_files=4)
    upload = vc.UploadAssembler(max_files=2)
    upload.feed(header())
    upload.feed(part(b"a"))
    upload.feed(part(b"b"))
    with pytest.raises(errors.PayloadTooLarge, match="more than 2 files"):
        upload.feed(part(b"c"))


def test_the_raw_shape_is_known_from_the_header_for_the_audit_line():
    upload = vc.UploadAssembler()
    assert upload.shape is None
    upload.feed(raw_header(shape=(5, 6, 7)))
    assert upload.shape == (5, 6, 7)


def test_the_wire_table_names_the_core_formats():
    assert set(wire.VOLUME_FORMATS.values()) == set(FORMATS)
    assert set(wire.VOLUME_FORMATS) == set(vpb.VolumeFormat.values()) - {vpb.VOLUME_FORMAT_UNSPECIFIED}


# ----------------------------------------------------------------- requests
def test_segment_request_maps_every_field_and_takes_the_resolved_model():
    msg = vpb.SegmentVolumeRequest(volume_id="v1", model="", segment_id="s", slice_index=7, box=BOX,
                                   range=vpb.SliceRange(first=3, last=9), encoding=pb.MASK_ENCODING_PNG)
    req = vc.segment_request_from_proto(msg, "medsam_lite")
    assert (req.volume_id, req.model, req.segment_id, req.slice_index) == ("v1", "medsam_lite", "s", 7)
    assert req.box == Box(1, 2, 30, 40) and (req.first_slice, req.last_slice) == (3, 9)
    assert req.encoding is MaskEncoding.PNG
    # slice 0 and an empty range [0, 0] are values, not absences; no box: a prompt-free model
    req = vc.segment_request_from_proto(vpb.SegmentVolumeRequest(volume_id="v", slice_index=0, box=BOX,
                                                                 range=vpb.SliceRange()), "m")
    assert (req.slice_index, req.first_slice, req.last_slice) == (0, 0, 0)
    req = vc.segment_request_from_proto(vpb.SegmentVolumeRequest(volume_id="v"), "unet")
    assert (req.box, req.slice_index, req.first_slice, req.last_slice) == (None, None, None, None)
    assert req.encoding is MaskEncoding.BITS  # UNSPECIFIED = BITS, the 2-D convention


@pytest.mark.parametrize("msg, match", [
    (vpb.SegmentVolumeRequest(box=BOX, slice_index=1), "volume_id is empty: send the id UploadVolume returned"),
    (vpb.SegmentVolumeRequest(volume_id="v", slice_index=3), "slice_index without a box"),
    (vpb.SegmentVolumeRequest(volume_id="v", box=BOX), "a box without slice_index"),
    (vpb.SegmentVolumeRequest(volume_id="v", range=vpb.SliceRange(first=5, last=4)),
     r"range: first \(5\) is after last \(4\)"),
    (vpb.SegmentVolumeRequest(volume_id="v", encoding=9), "unknown mask encoding 9"),
])
def test_a_malformed_segment_request_says_what_is_wrong(msg, match):
    with pytest.raises(errors.InvalidArgument, match=match):
        vc.segment_request_from_proto(msg, "m")


def test_refine_takes_exactly_one_action():
    add = vc.refine_request_from_proto(vpb.RefineSegmentRequest(
        volume_id="v", segment_id="s", add_box=vpb.AddBox(slice_index=4, box=BOX)))
    assert (add.slice_index, add.box, add.erase_first, add.erase_last) == (4, Box(1, 2, 30, 40), None, None)
    assert add.encoding is MaskEncoding.BITS
    erase = vc.refine_request_from_proto(vpb.RefineSegmentRequest(
        volume_id="v", segment_id="s", erase=vpb.SliceRange(first=2, last=2), encoding=pb.MASK_ENCODING_COCO_RLE))
    assert (erase.slice_index, erase.box, erase.erase_first, erase.erase_last) == (None, None, 2, 2)
    assert erase.encoding is MaskEncoding.COCO_RLE
    # both cannot travel: the oneof keeps the last one set
    both = vpb.RefineSegmentRequest(volume_id="v", segment_id="s", add_box=vpb.AddBox(slice_index=1, box=BOX))
    both.erase.CopyFrom(vpb.SliceRange(first=0, last=1))
    assert both.WhichOneof("action") == "erase"


@pytest.mark.parametrize("msg, match", [
    (vpb.RefineSegmentRequest(volume_id="v", segment_id="s"), "needs one action: add_box .* or erase"),
    (vpb.RefineSegmentRequest(volume_id="v", segment_id="s", add_box=vpb.AddBox(slice_index=1)), "add_box has no box"),
    (vpb.RefineSegmentRequest(volume_id="v", segment_id="s", erase=vpb.SliceRange(first=3, last=1)), "erase: first"),
    (vpb.RefineSegmentRequest(volume_id="v", erase=vpb.SliceRange()), "segment_id is empty"),
    (vpb.RefineSegmentRequest(segment_id="s", erase=vpb.SliceRange()), "volume_id is empty"),
])
def test_a_malformed_refine_request_says_what_is_wrong(msg, match):
    with pytest.raises(errors.InvalidArgument, match=match):
        vc.refine_request_from_proto(msg)


def test_undo_mask_and_delete_requests():
    ref = vc.segment_ref_from_proto(vpb.UndoSegmentRequest(volume_id="v", segment_id="s",
                                                           encoding=pb.MASK_ENCODING_PNG))
    assert ref == vc.SegmentRef("v", "s", MaskEncoding.PNG)
    assert vc.segment_ref_from_proto(vpb.GetSegmentMaskRequest(volume_id="v", segment_id="s")).encoding \
        is MaskEncoding.BITS
    with pytest.raises(errors.InvalidArgument, match="segment_id is empty"):
        vc.segment_ref_from_proto(vpb.GetSegmentMaskRequest(volume_id="v"))
    assert vc.delete_request_from_proto(vpb.DeleteVolumeRequest(volume_id="v")) == "v"
    with pytest.raises(errors.InvalidArgument, match="volume_id is empty"):
        vc.delete_request_from_proto(vpb.DeleteVolumeRequest())


def test_request_summary_names_the_model_only_where_the_request_does():
    assert vc.request_summary(vpb.SegmentVolumeRequest(volume_id="v", model="other", slice_index=1, box=BOX)) == \
        convert.RequestSummary(model="other", prompts=1)
    assert vc.request_summary(vpb.SegmentVolumeRequest(volume_id="v")) == convert.RequestSummary(model="", prompts=0)
    add = vpb.RefineSegmentRequest(add_box=vpb.AddBox(slice_index=1, box=BOX))
    assert vc.request_summary(add) == convert.RequestSummary(model=None, prompts=1)
    for msg in (vpb.UndoSegmentRequest(), vpb.GetSegmentMaskRequest(), vpb.DeleteVolumeRequest(),
                convert.Undecodable("medseg.v1.SegmentVolumeRequest")):
        assert vc.request_summary(msg) == convert.RequestSummary()


# ----------------------------------------------------------------- answers
def _slice(k: int, mask: np.ndarray, encoding=MaskEncoding.BITS, iou=0.9) -> SliceMask:
    return SliceMask(k, mask.shape[0], mask.shape[1], encoding, encode_mask(mask, encoding), iou, int(mask.sum()))


SUMMARY = VolumeSummary("v", "s", "medsam_lite", "1", 42, 0.042, 3, 5, 3, ("range end", "mask vanished"),
                        {"embed": 12.5, "total": 20.0}, 2, 1)


@pytest.mark.parametrize("encoding", PAYLOAD_ENCODINGS)
def test_stream_items_become_slice_and_summary_messages(encoding):
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    msg = vc.stream_item_to_proto(_slice(4, mask, encoding))
    assert msg.WhichOneof("item") == "slice" and not vc.is_summary(msg)
    m = msg.slice.mask
    assert (msg.slice.slice_index, m.height, m.width, m.area) == (4, 5, 7, 8)
    assert m.predicted_iou == pytest.approx(0.9) and m.encoding == wire.MASK_ENCODING_TO_PB[encoding.value]
    assert np.array_equal(decode_mask(m.data, m.height, m.width, encoding.value), mask)
    summary = vc.stream_item_to_proto(SUMMARY)
    assert vc.is_summary(summary)
    s = summary.summary
    assert (s.volume_id, s.segment_id, s.model.name, s.model.version, s.voxel_count) == ("v", "s", "medsam_lite",
                                                                                          "1", 42)
    assert (s.first_slice, s.last_slice, s.slices_changed, list(s.stop_reasons)) == (3, 5, 3, ["range end",
                                                                                                "mask vanished"])
    assert dict(s.timings_ms) == {"embed": 12.5, "total": 20.0} and (s.embeddings_reused, s.interactions) == (2, 1)
    assert s.volume_ml == pytest.approx(0.042)
    with pytest.raises(TypeError):
        vc.stream_item_to_proto("neither")


def test_an_empty_summary_says_minus_one():
    empty = VolumeSummary("v", "s", "m", "1", 0, 0.0, -1, -1, 0, ())
    s = vc.summary_to_proto(empty)
    assert (s.first_slice, s.last_slice, dict(s.timings_ms)) == (-1, -1, {})


def test_volume_info_mask_and_delete_responses():
    info = VolumeInfo("v", 108, 256, 240, (0.957, 0.957, 1.5), Window(40, 400), "request", "nifti", 14_155_776, 1799.5)
    msg = vc.volume_info_to_proto(info)
    assert (msg.volume_id, msg.depth, msg.height, msg.width, list(msg.spacing_mm)) == ("v", 108, 256, 240,
                                                                                        [0.957, 0.957, 1.5])
    assert (msg.window.center, msg.window.width, msg.window_source, msg.source_format) == (40, 400, "request", "nifti")
    assert (msg.stored_bytes, msg.expires_in_s) == (14_155_776, 1799.5)
    assert vc.response_size(msg) == (108, 256, 240) == vc.info_shape(info)
    assert vc.response_size(vpb.DeleteVolumeResponse()) is None
    mask = np.ones((2, 3), bool)
    result = SegmentMaskResult(SUMMARY, b"\x1f\x8bnifti", (_slice(3, mask), _slice(5, mask)))
    response = vc.mask_response_to_proto(result)
    assert response.nifti_gz == b"\x1f\x8bnifti" and [s.slice_index for s in response.slices] == [3, 5]
    assert response.summary.segment_id == "s"
    assert vc.delete_response(True).deleted and not vc.delete_response(False).deleted


# ----------------------------------------------------------------- the servicer's tables
def test_codecs_cover_every_method_with_tolerant_parsers_and_their_streaming_shape():
    codecs = vc.volume_codecs()
    assert set(codecs) == {"UploadVolume", "SegmentVolume", "RefineSegment", "UndoSegment", "GetSegmentMask",
                           "DeleteVolume", "SegmentStudy"} == set(vc.method_kinds())
    parse, serialize = codecs["SegmentVolume"]
    assert isinstance(parse(b"\xff\xff\xff"), convert.Undecodable)
    assert parse(vpb.SegmentVolumeRequest(volume_id="v").SerializeToString()).volume_id == "v"
    assert vpb.VolumeSegmentResponse.FromString(serialize(vc.stream_item_to_proto(SUMMARY))).summary.volume_id == "v"
    assert vc.method_kinds() == {"UploadVolume": (True, False), "SegmentVolume": (False, True),
                                 "RefineSegment": (False, True), "UndoSegment": (False, True),
                                 "GetSegmentMask": (False, False), "DeleteVolume": (False, False),
                                 "SegmentStudy": (False, False)}
    assert vc.SERVICE_NAME == "medseg.v1.Volumes"


# ----------------------------------------------------------------- DICOM SEG and SegmentStudy
def test_slice_masks_cannot_be_dicom_seg_and_seg_options_need_dicom_seg():
    with pytest.raises(errors.InvalidArgument, match="GetSegmentMask with dicom_seg"):
        vc.segment_request_from_proto(vpb.SegmentVolumeRequest(volume_id="v", encoding=pb.MASK_ENCODING_DICOM_SEG),
                                      "m")
    with pytest.raises(errors.InvalidArgument, match="dicom_seg = true"):
        vc.segment_ref_from_proto(vpb.GetSegmentMaskRequest(volume_id="v", segment_id="s",
                                                            dicom_seg_options=pb.DicomSegOptions()))
    ref = vc.segment_ref_from_proto(vpb.GetSegmentMaskRequest(
        volume_id="v", segment_id="s", dicom_seg=True,
        dicom_seg_options=pb.DicomSegOptions(segments=[pb.SegmentDescription(label="liver")],
                                             kind=pb.SEG_KIND_LABELMAP, series_description="x")))
    assert ref.dicom_seg.kind == "labelmap" and ref.dicom_seg.segments[0].label == "liver"
    assert vc.segment_ref_from_proto(vpb.GetSegmentMaskRequest(volume_id="v", segment_id="s")).dicom_seg is None


@pytest.mark.parametrize("study, series", [("", "1.2"), ("1.2", ""), ("1.2.x", "1.2"), ("1.2", "1..2"),
                                           ("1." + "2" * 70, "1.2"), (".1.2", "1.2")])
def test_segment_study_needs_dicom_uids(study, series):
    with pytest.raises(errors.InvalidArgument) as raised:
        vc.study_request_from_proto(vpb.SegmentStudyRequest(study_instance_uid=study, series_instance_uid=series), "m")
    message = str(raised.value)
    assert "UID" in message and not [v for v in (study, series) if len(v) > 3 and v in message]   # never echoed


def test_segment_study_request_and_response():
    with pytest.raises(errors.InvalidArgument, match="together"):
        vc.study_request_from_proto(vpb.SegmentStudyRequest(study_instance_uid="1.2", series_instance_uid="1.3",
                                                            slice_index=3), "m")
    req = vc.study_request_from_proto(vpb.SegmentStudyRequest(
        study_instance_uid="1.2", series_instance_uid="1.3", slice_index=3, box=pb.Box(x0=1, y0=2, x1=3, y1=4),
        range=vpb.SliceRange(first=1, last=5), store=True, keep_volume=True, return_dicom_seg=True,
        window=pb.Window(center=40, width=400)), "medsam_lite")
    assert (req.study_uid, req.series_uid, req.model, req.slice_index, req.first_slice, req.last_slice) == \
        ("1.2", "1.3", "medsam_lite", 3, 1, 5)
    assert req.store and req.keep_volume and req.return_dicom_seg and req.box == Box(1, 2, 3, 4)
    assert req.window == Window(40, 400) and req.dicom_seg.kind == "binary"
    assert vc.request_summary(vpb.SegmentStudyRequest(model="x", box=pb.Box())).model == "x"
