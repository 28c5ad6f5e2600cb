"""Client SDK and CLI for DICOM SEG: ``segment(..., encoding="dicom_seg")``,
``get_segment_mask(..., dicom_seg=True)``, ``segment_study`` and the CLI's ``--out-seg`` and
``segment-study``, against fake in-process servicers (127.0.0.1, port 0) that record each request."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import nibabel
import numpy as np
import pytest
from PIL import Image

import medseg_client
from medseg_client import Code, DicomSegOptions, SegmentationClient, SegmentDescription, image_from_array, \
    image_from_file
from medseg_client.__main__ import build_parser, format_timings, main
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from medseg_client.masks import MaskEncoding, segment_encoding, wire_encoding
from medseg_client.seg import dicom_seg_message

CT_SMALL = Path("/work/shared/data/dicom/CT_small.dcm")
SEG_BYTES = b"\0" * 128 + b"DICM" + b"fake SEG"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
SEG_SOP, SEG_SERIES = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.78"
# Study UIDs the fake PACS answers with an error (the codes SegmentStudy documents).
STUDY_ERRORS = {
    "1.2.3.404": (grpc.StatusCode.NOT_FOUND, "no series 1.2.3 in study 1.2.3.404 in the PACS"),
    "1.2.3.412": (grpc.StatusCode.FAILED_PRECONDITION, "no PACS configured (--pacs-url)"),
    "1.2.3.503": (grpc.StatusCode.UNAVAILABLE, "the PACS did not answer within 30 s"),
}


# --------------------------------------------------------------------------- fake servicers
def _bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask.reshape(-1)).tobytes()


class FakeSegmentation(pb_grpc.SegmentationServicer):
    """Each box prompt's mask is its box; with MASK_ENCODING_DICOM_SEG the masks carry metadata
    only and the answer one SEG (unless the model is "no-seg": then the SEG is missing)."""

    def __init__(self) -> None:
        self.requests: list[pb.SegmentRequest] = []

    def Segment(self, request: pb.SegmentRequest, context: grpc.ServicerContext) -> pb.SegmentResponse:
        self.requests.append(request)
        height, width = 128, 128  # CT_small.dcm
        if request.HasField("image") and request.image.WhichOneof("source") == "raw":
            height, width = (int(n) for n in request.image.raw.shape[:2])
        elif request.HasField("image") and request.image.encoded[128:132] != b"DICM":
            with Image.open(io.BytesIO(request.image.encoded)) as decoded:
                height, width = decoded.height, decoded.width
        seg = request.encoding == pb.MASK_ENCODING_DICOM_SEG
        masks = []
        for prompt in request.prompts:
            mask = np.zeros((height, width), bool)
            mask[int(prompt.box.y0):int(prompt.box.y1), int(prompt.box.x0):int(prompt.box.x1)] = True
            logits = pb.LowResLogits(height=2, width=2, data=np.ones(4, "<f4").tobytes())
            masks.append(pb.Mask(height=height, width=width, encoding=request.encoding or pb.MASK_ENCODING_BITS,
                                 data=b"" if seg else _bits(mask), predicted_iou=0.75, area=int(mask.sum()),
                                 low_res_logits=logits if request.return_low_res_logits else None))
        return pb.SegmentResponse(masks=masks, model=pb.ModelRef(name="fake", version="1"), image_id="img-1",
                                  height=height, width=width,
                                  dicom_seg=SEG_BYTES if seg and request.model != "no-seg" else b"")


def _summary(volume_id: str = "vol-1") -> vpb.VolumeSummary:
    return vpb.VolumeSummary(volume_id=volume_id, segment_id="seg-1", model=pb.ModelRef(name="fake", version="1"),
                             voxel_count=1234, volume_ml=1.5, first_slice=2, last_slice=4, slices_changed=3,
                             stop_reasons=["mask vanished", "range end"], timings_ms={"total": 12.0},
                             interactions=1)


def _info(volume_id: str = "vol-1") -> vpb.VolumeInfo:
    return vpb.VolumeInfo(volume_id=volume_id, depth=6, height=8, width=10, spacing_mm=[0.7, 0.7, 2.5],
                          window=pb.Window(center=40, width=400), window_source="file",
                          source_format="dicom_series", stored_bytes=960, expires_in_s=600)


class FakeVolumes(vpb_grpc.VolumesServicer):
    """One 6 x 8 x 10 volume; its segment covers slices 2..4; a SEG only for a DICOM series upload
    (as the gateway: INVALID_ARGUMENT otherwise); SegmentStudy answers STUDY_ERRORS' codes."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.format = vpb.VOLUME_FORMAT_UNSPECIFIED

    def UploadVolume(self, request_iterator, context: grpc.ServicerContext) -> vpb.VolumeInfo:
        messages = list(request_iterator)
        self.requests.append(messages[0].header)
        self.format = messages[0].header.format
        return _info()

    def SegmentVolume(self, request: vpb.SegmentVolumeRequest, context: grpc.ServicerContext):
        self.requests.append(request)
        for k in (2, 3, 4):
            mask = np.zeros((8, 10), bool)
            mask[2:6, 3:7] = True
            yield vpb.VolumeSegmentResponse(slice=vpb.SliceMaskMessage(slice_index=k, mask=pb.Mask(
                height=8, width=10, encoding=pb.MASK_ENCODING_BITS, data=_bits(mask), predicted_iou=0.9, area=16)))
        yield vpb.VolumeSegmentResponse(summary=_summary())

    def GetSegmentMask(self, request: vpb.GetSegmentMaskRequest,
                       context: grpc.ServicerContext) -> vpb.GetSegmentMaskResponse:
        self.requests.append(request)
        if request.dicom_seg and self.format != vpb.VOLUME_FORMAT_DICOM_SERIES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a DICOM SEG needs a volume uploaded as a DICOM series")
        return vpb.GetSegmentMaskResponse(nifti_gz=gzip.compress(b"nifti"), summary=_summary(),
                                          dicom_seg=SEG_BYTES if request.dicom_seg else b"")

    def DeleteVolume(self, request: vpb.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> vpb.DeleteVolumeResponse:
        self.requests.append(request)
        return vpb.DeleteVolumeResponse(deleted=True)

    def SegmentStudy(self, request: vpb.SegmentStudyRequest,
                     context: grpc.ServicerContext) -> vpb.SegmentStudyResponse:
        self.requests.append(request)
        if request.study_instance_uid in STUDY_ERRORS:
            context.abort(*STUDY_ERRORS[request.study_instance_uid])
        volume_id = "vol-kept" if request.keep_volume else ""
        return vpb.SegmentStudyResponse(
            volume=_info(volume_id), summary=_summary(volume_id), seg_sop_instance_uid=SEG_SOP,
            seg_series_instance_uid=SEG_SERIES, stored=request.store,
            dicom_seg=SEG_BYTES if request.return_dicom_seg else b"", instances_retrieved=6,
            timings_ms={"total": 950.4, "retrieve": 400.0, "segment": 500.2, "extra": 1.0})


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeSegmentation, FakeVolumes]]:
    segmentation, volumes = FakeSegmentation(), FakeVolumes()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SegmentationServicer_to_server(segmentation, server)
    vpb_grpc.add_VolumesServicer_to_server(volumes, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", segmentation, volumes
    server.stop(None)


def _of(servicer: FakeVolumes, kind: type) -> list:
    return [r for r in servicer.requests if isinstance(r, kind)]


# --------------------------------------------------------------------------- encodings and options
@pytest.mark.parametrize("encoding", ["dicom_seg", "dicom-seg", "DICOM_SEG", pb.MASK_ENCODING_DICOM_SEG,
                                      MaskEncoding.DICOM_SEG])
def test_segment_encoding_names_the_dicom_seg(encoding) -> None:
    assert segment_encoding(encoding) == pb.MASK_ENCODING_DICOM_SEG


@pytest.mark.parametrize("encoding", ["dicom_seg", pb.MASK_ENCODING_DICOM_SEG])
def test_wire_encoding_of_the_volume_calls_refuses_the_seg_with_a_pointer(encoding) -> None:
    with pytest.raises(ValueError, match="get_segment_mask"):
        wire_encoding(encoding)


def test_mask_encodings_keep_their_names() -> None:
    assert [segment_encoding(e) for e in ("bits", "png", MaskEncoding.COCO_RLE, pb.MASK_ENCODING_PNG)] == [
        pb.MASK_ENCODING_BITS, pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_COCO_RLE, pb.MASK_ENCODING_PNG]
    with pytest.raises(ValueError, match="unknown mask encoding"):
        segment_encoding("jpeg")
    assert segment_encoding(MaskEncoding.DICOM_SEG) == pb.MASK_ENCODING_DICOM_SEG
    with pytest.raises(ValueError, match="get_segment_mask"):
        wire_encoding(MaskEncoding.DICOM_SEG)
    for encoding in (MaskEncoding.DICOM_SEG, "dicom_seg"):  # no mask travels in it: nothing to decode
        with pytest.raises(ValueError, match="carry no data"):
            medseg_client.decode_mask(b"", 2, 2, encoding)


def test_dicom_seg_options_become_the_message() -> None:
    message = dicom_seg_message(DicomSegOptions(
        segments=["liver", SegmentDescription("left kidney", category=("SCT", "123037004", "Anatomical Structure"),
                                              type=Code("SCT", "64033007", "Kidney"),
                                              type_modifier=pb.Code(scheme_designator="SCT", value="7771000",
                                                                    meaning="Left"))],
        kind="labelmap", series_description="AI segmentation"))
    assert [s.label for s in message.segments] == ["liver", "left kidney"]
    assert not message.segments[0].HasField("category")
    second = message.segments[1]
    assert (second.category.value, second.type.meaning, second.type_modifier.meaning) == (
        "123037004", "Kidney", "Left")
    assert (message.kind, message.series_description) == (pb.SEG_KIND_LABELMAP, "AI segmentation")
    assert dicom_seg_message(None) is None
    assert dicom_seg_message(DicomSegOptions()).kind == pb.SEG_KIND_BINARY


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (DicomSegOptions(segments=[SegmentDescription("x", category=("SCT", "1", "c"))]), "both category and type"),
        (DicomSegOptions(segments=[SegmentDescription("x", type_modifier=("SCT", "1", "m"))]),
         "segment 1: type_modifier goes only with category and type"),
        (DicomSegOptions(segments=["x" * 65]), "at most 64"),
        (DicomSegOptions(segments=["a\\b"]), "backslash"),
        (DicomSegOptions(kind="overlay"), "SEG kind"),
        (DicomSegOptions(segments="liver"), "not one string"),
        (DicomSegOptions(segments=[SegmentDescription("x", category=("SCT", "", "c"), type=("SCT", "1", "t"))]),
         "all required"),
        (DicomSegOptions(segments=[SegmentDescription("x", category=("SCT", "1"), type=("SCT", "1", "t"))]),
         "a code is"),
        ({"segments": ["liver"]}, "DicomSegOptions"),
    ],
    ids=["category_only", "modifier_alone", "long_label", "backslash", "kind", "one_string", "empty_code",
         "short_code", "dict"],
)
def test_dicom_seg_options_that_cannot_be_written_are_refused(options, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dicom_seg_message(options)


# --------------------------------------------------------------------------- SDK: 2-D segment
def test_segment_asks_for_a_seg_and_returns_it_with_the_masks_metadata(fake_server) -> None:
    address, segmentation, _ = fake_server
    options = DicomSegOptions(segments=["liver", "spleen"], series_description="AI")
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment(image=image_from_file(CT_SMALL), boxes=[(0, 0, 4, 5), (10, 10, 20, 12)],
                                encoding="dicom_seg", dicom_seg_options=options, return_low_res_logits=True)
    (request,) = segmentation.requests
    assert request.encoding == pb.MASK_ENCODING_DICOM_SEG
    assert [s.label for s in request.dicom_seg.segments] == ["liver", "spleen"]
    assert request.dicom_seg.series_description == "AI" and request.image.encoded == CT_SMALL.read_bytes()
    assert result.dicom_seg == SEG_BYTES
    assert result.masks == [] and result.areas == [20, 20] and result.predicted_ious == [0.75, 0.75]
    assert [logits.shape for logits in result.low_res_logits] == [(2, 2), (2, 2)]
    assert (result.height, result.width, result.image_id) == (128, 128, "img-1")
    with pytest.raises(ValueError, match="DICOM SEG"):
        result.union()


def test_segment_by_image_id_can_ask_for_a_seg(fake_server) -> None:
    address, segmentation, _ = fake_server
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment(image_id="img-1", boxes=[(0, 0, 2, 2)], encoding=pb.MASK_ENCODING_DICOM_SEG)
    assert segmentation.requests[0].image_id == "img-1" and not segmentation.requests[0].HasField("dicom_seg")
    assert result.dicom_seg == SEG_BYTES and result.areas == [4]


def test_other_encodings_have_no_seg_and_decode_their_masks(fake_server) -> None:
    with SegmentationClient(fake_server[0], timeout=10) as client:
        result = client.segment(image=image_from_array(np.zeros((6, 9), np.uint8)), boxes=[(1, 1, 4, 5)])
    assert result.dicom_seg is None and result.areas == [12] and result.mask_areas == [12]
    assert result.union().sum() == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": image_from_array(np.zeros((6, 9), np.uint8)), "encoding": "dicom_seg"}, "raw pixel array"),
        ({"image": pb.Image(encoded=b"\x89PNG\r\n\x1a\n...."), "encoding": "dicom_seg"}, "this image is PNG"),
        ({"image_id": "img-1", "dicom_seg_options": DicomSegOptions(segments=["liver"])}, "only with encoding"),
        ({"image_id": "img-1", "encoding": "dicom_seg", "dicom_seg_options": DicomSegOptions(segments=["a", "b"])},
         "2 segment descriptions for a SEG of 1 segment"),
    ],
    ids=["raw", "png", "options_without_seg", "more_labels_than_prompts"],
)
def test_segment_refuses_a_seg_it_cannot_get_before_sending(fake_server, kwargs: dict, match: str) -> None:
    address, segmentation, _ = fake_server
    with SegmentationClient(address, timeout=10) as client, pytest.raises(ValueError, match=match):
        client.segment(boxes=[(0, 0, 2, 2)], **kwargs)
    assert segmentation.requests == []


def test_a_seg_answer_without_the_seg_is_an_error_not_empty_masks(fake_server) -> None:
    with SegmentationClient(fake_server[0], timeout=10) as client, pytest.raises(ValueError, match="without the SEG"):
        client.segment(image=image_from_file(CT_SMALL), boxes=[(0, 0, 2, 2)], encoding="dicom_seg", model="no-seg")


# --------------------------------------------------------------------------- SDK: volumes
def test_get_segment_mask_asks_for_the_seg_of_a_series(fake_server, tmp_path: Path) -> None:
    address, _, volumes = fake_server
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"x")
    with SegmentationClient(address, timeout=10) as client:
        info = client.upload_volume(tmp_path / "series")
        plain = client.get_segment_mask(info.volume_id, "seg-1")
        seg = client.get_segment_mask(info.volume_id, "seg-1", dicom_seg=True,
                                      dicom_seg_options=DicomSegOptions(segments=["liver"], kind="labelmap"))
    first, second = _of(volumes, vpb.GetSegmentMaskRequest)
    assert not first.dicom_seg and not first.HasField("dicom_seg_options") and plain.dicom_seg is None
    assert second.dicom_seg and second.dicom_seg_options.segments[0].label == "liver"
    assert second.dicom_seg_options.kind == pb.SEG_KIND_LABELMAP
    assert seg.dicom_seg == SEG_BYTES and seg.nifti_gz == gzip.compress(b"nifti") and seg.summary.voxel_count == 1234


def test_volume_calls_refuse_the_seg_encoding_and_stray_options(fake_server) -> None:
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client:
        with pytest.raises(ValueError, match="dicom_seg=True"):
            client.get_segment_mask("vol-1", "seg-1", encoding="dicom_seg")
        with pytest.raises(ValueError, match="only with dicom_seg=True"):
            client.get_segment_mask("vol-1", "seg-1", dicom_seg_options=DicomSegOptions(segments=["x"]))
        with pytest.raises(ValueError, match="1 segment"):
            client.get_segment_mask("vol-1", "seg-1", dicom_seg=True,
                                    dicom_seg_options=DicomSegOptions(segments=["x", "y"]))
        with pytest.raises(ValueError, match="get_segment_mask"):
            client.segment_volume("vol-1", slice_index=1, box=(0, 0, 2, 2), encoding=pb.MASK_ENCODING_DICOM_SEG)
    assert volumes.requests == []


def test_segment_study_sends_every_field_and_returns_the_typed_result(fake_server) -> None:
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment_study(STUDY, SERIES, slice_index=3, box=(1, 2, 7, 8), model="litemedsam",
                                      range=(1, 5), window=(40, 400), store=True, return_dicom_seg=True,
                                      label="liver", keep_volume=True, timeout=30)
    (request,) = _of(volumes, vpb.SegmentStudyRequest)
    assert (request.study_instance_uid, request.series_instance_uid, request.model) == (STUDY, SERIES, "litemedsam")
    assert request.slice_index == 3 and (request.box.x0, request.box.y1) == (1, 8)
    assert (request.range.first, request.range.last) == (1, 5)
    assert (request.window.center, request.window.width) == (40, 400)
    assert request.store and request.return_dicom_seg and request.keep_volume
    assert [s.label for s in request.dicom_seg_options.segments] == ["liver"]
    assert isinstance(result, medseg_client.SegmentStudyResult)
    assert (result.seg_sop_instance_uid, result.seg_series_instance_uid, result.stored) == (SEG_SOP, SEG_SERIES, True)
    assert result.dicom_seg == SEG_BYTES and result.instances_retrieved == 6
    assert result.volume.volume_id == "vol-kept" and result.volume.shape == (6, 8, 10)
    assert result.summary.segment_id == "seg-1" and result.summary.volume_ml == 1.5
    assert result.timings_ms["retrieve"] == 400.0


def test_segment_study_defaults_send_only_the_uids(fake_server) -> None:
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment_study(STUDY, SERIES)
    (request,) = _of(volumes, vpb.SegmentStudyRequest)
    for name in ("slice_index", "box", "range", "window", "dicom_seg_options"):
        assert not request.HasField(name), name
    assert not (request.store or request.return_dicom_seg or request.keep_volume) and request.model == ""
    assert result.dicom_seg is None and not result.stored and result.volume.volume_id == ""


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("", SERIES), {}, "study_uid is required"),
        ((STUDY, "1.2.abc"), {}, "series_uid is not a DICOM UID"),
        ((STUDY, "1." * 40 + "1"), {}, "at most 64"),
        ((STUDY, SERIES), {"box": (0, 0, 2, 2)}, "together"),
        ((STUDY, SERIES), {"range": (4, 2)}, "after last"),
        ((STUDY, SERIES), {"window": (40, 0)}, "width > 0"),
        ((STUDY, SERIES), {"label": "liver", "dicom_seg_options": DicomSegOptions(segments=["x"])}, "not both"),
        ((STUDY, SERIES), {"label": "x" * 65}, "at most 64"),
    ],
    ids=["no_study", "bad_uid", "long_uid", "box_without_slice", "range", "window", "label_twice", "long_label"],
)
def test_segment_study_refuses_bad_arguments_before_sending(fake_server, args, kwargs, match: str) -> None:
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client, pytest.raises(ValueError, match=match):
        client.segment_study(*args, **kwargs)
    assert volumes.requests == []


def test_segment_study_label_joins_the_other_options(fake_server) -> None:
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client:
        client.segment_study(STUDY, SERIES, label="liver", dicom_seg_options=DicomSegOptions(kind="labelmap"))
    options = _of(volumes, vpb.SegmentStudyRequest)[0].dicom_seg_options
    assert [s.label for s in options.segments] == ["liver"] and options.kind == pb.SEG_KIND_LABELMAP


@pytest.mark.parametrize("study", sorted(STUDY_ERRORS))
def test_segment_study_errors_are_rpc_errors_with_their_code(fake_server, study: str) -> None:
    with SegmentationClient(fake_server[0], timeout=10) as client, pytest.raises(grpc.RpcError) as exc:
        client.segment_study(study, "1.2.3")
    assert exc.value.code() == STUDY_ERRORS[study][0]


# --------------------------------------------------------------------------- CLI: segment --out-seg
def test_cli_segment_out_seg_writes_the_seg_of_a_dicom_image(fake_server, tmp_path: Path, capsys) -> None:
    address, segmentation, _ = fake_server
    out_seg = tmp_path / "seg.dcm"
    code = main(["segment", "--server", address, "--image", str(CT_SMALL), "--box", "0", "0", "4", "5",
                 "--box", "10", "10", "20", "12", "--out-seg", str(out_seg), "--label", "liver", "--labelmap"])
    assert code == 0 and out_seg.read_bytes() == SEG_BYTES
    (request,) = segmentation.requests  # one call: no PNG asked for
    assert request.encoding == pb.MASK_ENCODING_DICOM_SEG and len(request.prompts) == 2
    assert [s.label for s in request.dicom_seg.segments] == ["liver"]
    assert request.dicom_seg.kind == pb.SEG_KIND_LABELMAP
    out = capsys.readouterr().out
    assert "mask 1: predicted_iou=0.7500 area=20 px" in out and f"wrote {out_seg} (DICOM SEG, 2 segments)" in out


def test_cli_segment_out_and_out_seg_write_both(fake_server, tmp_path: Path) -> None:
    address, segmentation, _ = fake_server
    code = main(["segment", "--server", address, "--image", str(CT_SMALL), "--box", "0", "0", "4", "5",
                 "--out", str(tmp_path / "m.png"), "--out-seg", str(tmp_path / "seg.dcm")])
    assert code == 0 and (tmp_path / "seg.dcm").read_bytes() == SEG_BYTES
    with Image.open(tmp_path / "m.png") as png:
        assert (np.asarray(png) == 255).sum() == 20
    assert [r.encoding for r in segmentation.requests] == [pb.MASK_ENCODING_BITS, pb.MASK_ENCODING_DICOM_SEG]
    assert not segmentation.requests[1].HasField("dicom_seg")  # no --label/--labelmap: the gateway's defaults


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--image", "IMG.png", "--out-seg", "SEG"], "needs a DICOM image (.dcm)"),
        (["--image", "IMG.png"], "required: --out"),
        (["--image", "CT", "--out-seg", "SEG", "--overlay", "OV"], "--overlay draws the PNG masks"),
        (["--image", "CT", "--out", "M", "--label", "liver"], "go with --out-seg"),
        (["--image", "CT", "--out-seg", "SEG", "--label", "a", "--label", "b"], "2 --label flags for 1 mask"),
        (["--image", "CT", "--out-seg", "NOWHERE/seg.dcm"], "does not exist"),
    ],
    ids=["png_input", "no_output", "overlay_without_out", "label_without_seg", "too_many_labels", "no_folder"],
)
def test_cli_segment_refuses_a_seg_it_cannot_get_before_any_call(fake_server, tmp_path: Path, capsys,
                                                                  extra: list[str], match: str) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "in.png")
    names = {"IMG.png": str(tmp_path / "in.png"), "CT": str(CT_SMALL), "SEG": str(tmp_path / "seg.dcm"),
             "M": str(tmp_path / "m.png"), "OV": str(tmp_path / "ov.png"),
             "NOWHERE/seg.dcm": str(tmp_path / "nowhere" / "seg.dcm")}
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--server", fake_server[0], "--box", "0", "0", "4", "4", *(names.get(a, a) for a in extra)])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert fake_server[1].requests == [] and not (tmp_path / "seg.dcm").exists()


def test_cli_segment_a_png_dressed_as_dicom_is_refused_by_the_sdk_before_sending(fake_server, tmp_path: Path,
                                                                                 capsys) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "in.dcm", format="PNG")
    code = main(["segment", "--server", fake_server[0], "--image", str(tmp_path / "in.dcm"), "--box", "0", "0", "4",
                 "4", "--out-seg", str(tmp_path / "seg.dcm")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "this image is PNG" in err
    assert fake_server[1].requests == []


# --------------------------------------------------------------------------- CLI: segment-volume --out-seg
def test_cli_segment_volume_out_seg_writes_the_seg_of_a_series(fake_server, tmp_path: Path, capsys) -> None:
    address, _, volumes = fake_server
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        (series / f"{k}.dcm").write_bytes(b"slice %d" % k)
    code = main(["segment-volume", "--server", address, "--image", str(series), "--slice", "3", "--box", "3", "2",
                 "7", "6", "--out", str(tmp_path / "m.nii.gz"), "--out-seg", str(tmp_path / "seg.dcm"),
                 "--label", "left kidney"])
    assert code == 0 and (tmp_path / "seg.dcm").read_bytes() == SEG_BYTES
    assert (tmp_path / "m.nii.gz").read_bytes() == gzip.compress(b"nifti")
    (request,) = _of(volumes, vpb.GetSegmentMaskRequest)
    assert request.dicom_seg and request.dicom_seg_options.segments[0].label == "left kidney"
    assert request.dicom_seg_options.kind == pb.SEG_KIND_BINARY
    assert _of(volumes, vpb.DeleteVolumeRequest)  # still cleaned up
    assert f"wrote {tmp_path / 'seg.dcm'} (DICOM SEG)" in capsys.readouterr().out


def test_cli_segment_volume_without_out_seg_asks_for_no_seg(fake_server, tmp_path: Path) -> None:
    address, _, volumes = fake_server
    path = tmp_path / "ct.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((10, 8, 6), np.int16), np.eye(4)), path)
    assert main(["segment-volume", "--server", address, "--image", str(path), "--slice", "3", "--box", "3", "2",
                 "7", "6", "--out", str(tmp_path / "m.nii.gz")]) == 0
    (request,) = _of(volumes, vpb.GetSegmentMaskRequest)
    assert not request.dicom_seg and not request.HasField("dicom_seg_options")


@pytest.mark.parametrize("kind", ["nii.gz", "npy"])
def test_cli_segment_volume_out_seg_of_a_non_dicom_volume_is_refused_before_any_call(
        fake_server, tmp_path: Path, capsys, kind: str) -> None:
    path = tmp_path / f"ct.{kind}"
    extra = []
    if kind == "npy":
        np.save(path, np.zeros((6, 8, 10), np.int16))
        extra = ["--spacing", "1", "1", "2"]
    else:
        nibabel.save(nibabel.Nifti1Image(np.zeros((10, 8, 6), np.int16), np.eye(4)), path)
    with pytest.raises(SystemExit) as exc:
        main(["segment-volume", "--server", fake_server[0], "--image", str(path), "--slice", "3", "--box", "3", "2",
              "7", "6", "--out", str(tmp_path / "m.nii.gz"), "--out-seg", str(tmp_path / "seg.dcm"), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--out-seg needs a DICOM series" in err
    assert ("a NIfTI file" if kind == "nii.gz" else "a .npy array") in err
    assert fake_server[2].requests == []


def test_the_server_refusal_of_a_non_series_seg_is_one_line(fake_server, tmp_path: Path) -> None:
    """The SDK leaves it to the gateway (the CLI checks first): INVALID_ARGUMENT reaches the caller."""
    address, _, volumes = fake_server
    with SegmentationClient(address, timeout=10) as client:
        info = client.upload_volume(np.zeros((2, 3, 4), np.int16), spacing=(1, 1, 1))
        with pytest.raises(grpc.RpcError) as exc:
            client.get_segment_mask(info.volume_id, "seg-1", dicom_seg=True)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- CLI: segment-study
STUDY_ARGS = ["--study", STUDY, "--series", SERIES, "--slice", "3", "--box", "1", "2", "7", "8"]


def test_cli_segment_study_parses_its_flags() -> None:
    args = build_parser().parse_args(["segment-study", "--server", "h:1", *STUDY_ARGS, "--model", "m", "--store",
                                      "--out-seg", "s.dcm", "--label", "liver", "--labelmap", "--range", "1", "5",
                                      "--window", "40", "400", "--token-file", "t", "--tls"])
    assert (args.study, args.series, args.slice, args.box) == (STUDY, SERIES, 3, [1, 2, 7, 8])
    assert (args.model, args.store, args.out_seg, args.label, args.labelmap) == ("m", True, Path("s.dcm"), "liver",
                                                                                 True)
    assert (args.range, args.window, args.timeout, args.token_file, args.tls) == ([1, 5], [40, 400], 600.0, "t", True)
    defaults = build_parser().parse_args(["segment-study", "--server", "h:1", "--study", STUDY, "--series", SERIES])
    assert (defaults.slice, defaults.box, defaults.store, defaults.out_seg, defaults.model) == (None, None, False,
                                                                                                None, "")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--series", SERIES], "required: --study"),
        (["--study", STUDY], "required: --series"),
        (["--study", STUDY, "--series", SERIES, "--slice", "3"], "go together"),
        (["--study", STUDY, "--series", SERIES, "--box", "1", "2", "3", "4"], "go together"),
        (["--study", STUDY, "--series", SERIES, "--slice", "-1", "--box", "1", "2", "3", "4"], "--slice must be"),
        (["--study", STUDY, "--series", SERIES, "--range", "5", "1"], "--range"),
        (["--study", STUDY, "--series", SERIES, "--box", "1", "2", "3"], "--box"),
        ([*STUDY_ARGS, "--window", "40", "0"], "WIDTH must be > 0"),
        ([*STUDY_ARGS, "--out-seg", "NOWHERE/seg.dcm"], "does not exist"),
    ],
    ids=["no_study", "no_series", "slice_alone", "box_alone", "negative_slice", "range", "short_box", "window",
         "no_folder"],
)
def test_cli_segment_study_refuses_bad_arguments(fake_server, capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["segment-study", "--server", fake_server[0], *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert fake_server[2].requests == []


def test_cli_segment_study_needs_a_server() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["segment-study", *STUDY_ARGS])
    assert exc.value.code == 2


def test_cli_segment_study_stores_writes_and_prints_a_summary(fake_server, tmp_path: Path, capsys) -> None:
    address, _, volumes = fake_server
    out_seg = tmp_path / "seg.dcm"
    code = main(["segment-study", "--server", address, *STUDY_ARGS, "--model", "litemedsam", "--store",
                 "--out-seg", str(out_seg), "--label", "liver", "--labelmap"])
    assert code == 0 and out_seg.read_bytes() == SEG_BYTES
    (request,) = _of(volumes, vpb.SegmentStudyRequest)
    assert (request.study_instance_uid, request.series_instance_uid, request.slice_index) == (STUDY, SERIES, 3)
    assert (request.box.x0, request.box.y0, request.box.x1, request.box.y1) == (1, 2, 7, 8)
    assert request.model == "litemedsam" and request.store and request.return_dicom_seg and not request.keep_volume
    assert request.dicom_seg_options.segments[0].label == "liver"
    assert request.dicom_seg_options.kind == pb.SEG_KIND_LABELMAP
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"seg_sop_instance_uid: {SEG_SOP}",
        f"seg_series_instance_uid: {SEG_SERIES}",
        "stored: yes",
        "series: 6 instances retrieved, 6 x 8 x 10 slices x rows x columns",
        "model: fake 1",
        "voxels: 1234 (1.500 ml), slices 2..4, stopped: mask vanished, range end",
        "timings: retrieve 400 ms, segment 500 ms, total 950 ms, extra 1 ms",
        f"wrote {out_seg} (DICOM SEG)",
    ]


def test_cli_segment_study_without_store_or_out_seg_asks_for_neither(fake_server, tmp_path: Path, capsys) -> None:
    address, _, volumes = fake_server
    assert main(["segment-study", "--server", address, *STUDY_ARGS]) == 0
    (request,) = _of(volumes, vpb.SegmentStudyRequest)
    assert not (request.store or request.return_dicom_seg) and not request.HasField("dicom_seg_options")
    out = capsys.readouterr().out
    assert "stored: no" in out and "wrote" not in out


@pytest.mark.parametrize("study", sorted(STUDY_ERRORS))
def test_cli_segment_study_reports_server_errors_in_one_line(fake_server, tmp_path: Path, capsys, study: str) -> None:
    code = main(["segment-study", "--server", fake_server[0], "--study", study, "--series", "1.2.3", "--slice", "0",
                 "--box", "0", "0", "4", "4", "--out-seg", str(tmp_path / "seg.dcm")])
    captured = capsys.readouterr()
    status, details = STUDY_ERRORS[study]
    assert code == 1 and captured.err == f"error: {status.name}: {details}\n"
    assert captured.out == "" and not (tmp_path / "seg.dcm").exists()


def test_cli_segment_study_with_a_bad_uid_is_a_local_error(fake_server, capsys) -> None:
    code = main(["segment-study", "--server", fake_server[0], "--study", "1.2.x", "--series", SERIES])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a DICOM UID" in err
    assert fake_server[2].requests == []


def test_format_timings_orders_the_documented_steps_first() -> None:
    assert format_timings({"total": 3.0, "zeta": 1.0, "decode": 2.4, "alpha": 0.5}) == \
        "decode 2 ms, total 3 ms, alpha 0 ms, zeta 1 ms"
    assert format_timings({}) == "-"


def test_the_new_sdk_names_are_exported_and_aliased() -> None:
    import service.client

    for name in ("Code", "DicomSegOptions", "SegmentDescription", "SegmentStudyResult"):
        assert name in medseg_client.__all__ and getattr(service.client, name) is getattr(medseg_client, name)
