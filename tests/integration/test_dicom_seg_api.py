"""DICOM SEG answers over real gRPC from a real gateway, on the real CT series of
../shared/data/volumes/dicom: a 2-D Segment on one DICOM file with MASK_ENCODING_DICOM_SEG
(one segment per prompt), and GetSegmentMask(dicom_seg) of a segment of the uploaded series.
Each SEG is read back with highdicom and pydicom, its frames compared with the gateway's own
masks (BITS / the streamed slices), its references and codes checked, and validated by
dciodvfy and dcmdump. SEG asked for on a non-DICOM input is INVALID_ARGUMENT; SegmentStudy on
a gateway without a PACS is FAILED_PRECONDITION; the gateway keeps serving."""

from __future__ import annotations

import io

import grpc
import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image

from medseg_client import image_from_file
from medseg_client.masks import decode_mask
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from tests.dicom_tools import dciodvfy_errors, dcmdump_ok, frames_by_source, seg_frames
from tests.harness import code_of

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SLICE, RANGE = 54, (53, 56)
pytestmark = pytest.mark.usefixtures("shared_data")


@pytest.fixture(scope="module")
def ct(shared_data):
    folder = shared_data / "volumes" / "dicom" / "promed_ct_0051"
    head = np.asarray(nibabel.load(str(shared_data / "volumes" / "promed_ct_0051" / "masks" / "head.nii.gz")).dataobj) > 0
    files = sorted(folder.glob("*.dcm"))
    return folder, files, head


def file_mask(head: np.ndarray, k: int) -> np.ndarray:
    """The reference mask of sorted file k in its own rows/columns (dicom/index.json)."""
    return head[::-1, ::-1, k].T


def box_of(mask: np.ndarray, margin: int = 3) -> pb.Box:
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return pb.Box(x0=max(0, cols.min() - margin), y0=max(0, rows.min() - margin),
                  x1=min(w, cols.max() + 1 + margin), y1=min(h, rows.max() + 1 + margin))


@pytest.fixture(scope="module")
def stubs(gateway):
    with grpc.insecure_channel(gateway.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield pb_grpc.SegmentationStub(channel), vpb_grpc.VolumesStub(channel)


def bits_mask(mask: pb.Mask) -> np.ndarray:
    return decode_mask(mask.data, mask.height, mask.width, "bits")


def test_segment_on_a_dicom_image_answers_one_seg_with_a_segment_per_prompt(stubs, ct, tmp_path):
    segmentation, _ = stubs
    _, files, head = ct
    source = pydicom.dcmread(str(files[SLICE]), stop_before_pixels=True)
    reference = file_mask(head, SLICE)
    big = box_of(reference)
    small = pb.Box(x0=big.x0 + 20, y0=big.y0 + 20, x1=big.x1 - 60, y1=big.y1 - 60)
    image = image_from_file(files[SLICE])
    prompts = [pb.Prompt(box=big), pb.Prompt(box=small)]
    plain = segmentation.Segment(pb.SegmentRequest(image=image, prompts=prompts, encoding=pb.MASK_ENCODING_BITS),
                                 timeout=120)
    options = pb.DicomSegOptions(segments=[pb.SegmentDescription(label="head"), pb.SegmentDescription(
        label="my region", category=pb.Code(scheme_designator="SCT", value="91723000", meaning="Anatomical Structure"),
        type=pb.Code(scheme_designator="99LOCAL", value="R-1", meaning="Region one"))],
        series_description="SEG API test")
    answer = segmentation.Segment(pb.SegmentRequest(image=image, prompts=prompts,
                                                    encoding=pb.MASK_ENCODING_DICOM_SEG, dicom_seg=options),
                                  timeout=120)
    assert answer.dicom_seg and len(answer.masks) == 2
    assert all(m.encoding == pb.MASK_ENCODING_DICOM_SEG and not m.data for m in answer.masks)
    assert [m.area for m in answer.masks] == [m.area for m in plain.masks]

    ds = pydicom.dcmread(io.BytesIO(answer.dicom_seg))
    assert ds.SOPClassUID == SEG_STORAGE and ds.SeriesDescription == "SEG API test"
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.PatientID == source.PatientID            # the patient module is the source's
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    first, second = ds.SegmentSequence
    assert (first.SegmentLabel, second.SegmentLabel) == ("head", "my region")
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "69536005"       # SNOMED CT: head
    assert second.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99LOCAL"
    assert first.SegmentAlgorithmName == answer.model.name and first.SegmentAlgorithmType == "SEMIAUTOMATIC"
    _, frames = seg_frames(answer.dicom_seg)
    assert set(frames) == {(source.SOPInstanceUID, 1), (source.SOPInstanceUID, 2)}
    for number, mask in enumerate(plain.masks, 1):
        np.testing.assert_array_equal(frames[source.SOPInstanceUID, number], bits_mask(mask))
    read = hd.seg.Segmentation.from_dataset(ds)       # and highdicom reads it back the same
    both = read.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2])
    np.testing.assert_array_equal(both[0, :, :, 0].astype(bool), bits_mask(plain.masks[0]))
    assert dciodvfy_errors(answer.dicom_seg, tmp_path) == []
    dcmdump_ok(answer.dicom_seg, tmp_path)


def test_seg_needs_dicom_input_and_the_gateway_keeps_serving(stubs, ct):
    segmentation, _ = stubs
    _, files, head = ct
    box = box_of(file_mask(head, SLICE))
    buffer = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(buffer, format="PNG")
    as_seg = pb.SegmentRequest(image=pb.Image(encoded=buffer.getvalue()), prompts=[pb.Prompt(box=pb.Box(x0=1, y0=1, x1=40, y1=40))],
                               encoding=pb.MASK_ENCODING_DICOM_SEG)
    with pytest.raises(grpc.RpcError) as raised:
        segmentation.Segment(as_seg, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DICOM" in raised.value.details()

    dicom = segmentation.Segment(pb.SegmentRequest(image=image_from_file(files[SLICE]), prompts=[pb.Prompt(box=box)]),
                                 timeout=60)
    by_id = pb.SegmentRequest(image_id=dicom.image_id, prompts=[pb.Prompt(box=box)], encoding=pb.MASK_ENCODING_DICOM_SEG)
    with pytest.raises(grpc.RpcError) as raised:
        segmentation.Segment(by_id, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_id" in raised.value.details()

    stray = pb.SegmentRequest(image=image_from_file(files[SLICE]), prompts=[pb.Prompt(box=box)],
                              dicom_seg=pb.DicomSegOptions(series_description="x"))
    assert code_of(lambda: segmentation.Segment(stray, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    too_many = pb.SegmentRequest(image=image_from_file(files[SLICE]), prompts=[pb.Prompt(box=box)],
                                 encoding=pb.MASK_ENCODING_DICOM_SEG,
                                 dicom_seg=pb.DicomSegOptions(segments=[pb.SegmentDescription(label="a"),
                                                                        pb.SegmentDescription(label="b")]))
    assert code_of(lambda: segmentation.Segment(too_many, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    half_code = pb.SegmentRequest(image=image_from_file(files[SLICE]), prompts=[pb.Prompt(box=box)],
                                  encoding=pb.MASK_ENCODING_DICOM_SEG,
                                  dicom_seg=pb.DicomSegOptions(segments=[pb.SegmentDescription(
                                      label="a", category=pb.Code(scheme_designator="SCT", value="1", meaning="x"))]))
    assert code_of(lambda: segmentation.Segment(half_code, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    again = segmentation.Segment(pb.SegmentRequest(image=image_from_file(files[SLICE]), prompts=[pb.Prompt(box=box)],
                                                   encoding=pb.MASK_ENCODING_DICOM_SEG), timeout=60)
    assert again.dicom_seg


def test_a_segment_of_an_uploaded_series_as_seg(client, stubs, ct, tmp_path):
    _, volumes = stubs
    folder, files, head = ct
    info = client.upload_volume(folder)
    try:
        request = vpb.SegmentVolumeRequest(volume_id=info.volume_id, slice_index=SLICE,
                                           box=box_of(file_mask(head, SLICE)),
                                           range=vpb.SliceRange(first=RANGE[0], last=RANGE[1]))
        items = list(volumes.SegmentVolume(request, timeout=300))
        summary = items[-1].summary
        answer = volumes.GetSegmentMask(vpb.GetSegmentMaskRequest(
            volume_id=info.volume_id, segment_id=summary.segment_id, dicom_seg=True,
            dicom_seg_options=pb.DicomSegOptions(segments=[pb.SegmentDescription(label="head")])), timeout=120)
        assert answer.dicom_seg and answer.nifti_gz
        ds, frames = frames_by_source(answer.dicom_seg)
        hd.seg.Segmentation.from_dataset(ds)              # highdicom reads it
        sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
        by_uid = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
        referenced = ds.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
        assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == set(by_uid)
        assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        assert ds.SegmentSequence[0].SegmentLabel == "head"
        # the files are named in slice order: sorted file k is slice k of the volume
        slices = {s.slice_index: s for s in answer.slices}
        assert {by_uid[uid] for uid in frames} == set(slices) and int(ds.NumberOfFrames) == len(slices)
        for uid, frame in frames.items():
            np.testing.assert_array_equal(frame, bits_mask(slices[by_uid[uid]].mask))
        assert dciodvfy_errors(answer.dicom_seg, tmp_path) == []
        dcmdump_ok(answer.dicom_seg, tmp_path)

        # slice masks cannot be SEGs; a SEG of a non-DICOM volume is refused
        bad = vpb.SegmentVolumeRequest(volume_id=info.volume_id, slice_index=SLICE, box=box_of(file_mask(head, SLICE)),
                                       range=vpb.SliceRange(first=SLICE, last=SLICE),
                                       encoding=pb.MASK_ENCODING_DICOM_SEG)
        assert code_of(lambda: list(volumes.SegmentVolume(bad, timeout=60))) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.delete_volume(info.volume_id)


def test_seg_of_a_nifti_volume_is_refused(client, stubs, shared_data, ct):
    _, volumes = stubs
    _, _, head = ct
    info = client.upload_volume(shared_data / "volumes" / "promed_ct_0051" / "image.nii.gz")
    try:
        nifti_box = box_of(np.flipud(head[:, :, SLICE].T))
        items = list(volumes.SegmentVolume(vpb.SegmentVolumeRequest(
            volume_id=info.volume_id, slice_index=SLICE, box=nifti_box, range=vpb.SliceRange(first=SLICE, last=SLICE)),
            timeout=120))
        ask = vpb.GetSegmentMaskRequest(volume_id=info.volume_id, segment_id=items[-1].summary.segment_id,
                                        dicom_seg=True)
        with pytest.raises(grpc.RpcError) as raised:
            volumes.GetSegmentMask(ask, timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DICOM series" in raised.value.details()
    finally:
        client.delete_volume(info.volume_id)


def test_segment_study_without_a_pacs_is_a_failed_precondition(stubs):
    _, volumes = stubs
    request = vpb.SegmentStudyRequest(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", slice_index=0,
                                      box=pb.Box(x0=1, y0=1, x1=20, y1=20))
    with pytest.raises(grpc.RpcError) as raised:
        volumes.SegmentStudy(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--pacs-url" in raised.value.details()
    bad_uid = vpb.SegmentStudyRequest(study_instance_uid="not a uid", series_instance_uid="1.2")
    assert code_of(lambda: volumes.SegmentStudy(bad_uid, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT


def test_no_patient_data_of_a_seg_answer_reaches_the_log(stubs, ct, gateway):
    """A SEG answer copies the source's patient and study modules; the gateway's log (service
    and audit lines) holds none of their values, on success and on an error path."""
    segmentation, _ = stubs
    _, files, head = ct
    ds = pydicom.dcmread(str(files[SLICE]))
    ds.PatientName, ds.PatientID, ds.StudyDescription = "CANARY^SEG^4412", "CANARYSEG4412", "CANARY STUDY 4412"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    image = pb.Image(encoded=buffer.getvalue())
    box = box_of(file_mask(head, SLICE))
    answer = segmentation.Segment(pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=box)],
                                                    encoding=pb.MASK_ENCODING_DICOM_SEG), timeout=120)
    assert str(pydicom.dcmread(io.BytesIO(answer.dicom_seg)).PatientName) == "CANARY^SEG^4412"
    bad = pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=box)], encoding=pb.MASK_ENCODING_DICOM_SEG,
                            dicom_seg=pb.DicomSegOptions(series_description="bad\\value"))
    assert code_of(lambda: segmentation.Segment(bad, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    log = gateway.log()
    assert "4412" not in log and "CANARY" not in log and ds.SOPInstanceUID not in log


def test_the_segment_volume_command_writes_the_seg_of_a_dicom_folder(gateway, ct, tmp_path, capsys):
    from medseg_client.__main__ import main as cli

    folder, files, head = ct
    box = box_of(file_mask(head, SLICE))
    out, seg = tmp_path / "mask.nii.gz", tmp_path / "seg.dcm"
    code = cli(["segment-volume", "--server", gateway.target, "--image", str(folder), "--slice", str(SLICE),
                "--box", str(box.x0), str(box.y0), str(box.x1), str(box.y1), "--range", str(SLICE), str(SLICE),
                "--out", str(out), "--out-seg", str(seg), "--label", "head"])
    assert code == 0, capsys.readouterr()
    ds, frames = frames_by_source(seg.read_bytes())
    source = pydicom.dcmread(str(files[SLICE]), stop_before_pixels=True)
    assert list(frames) == [source.SOPInstanceUID] and ds.SegmentSequence[0].SegmentLabel == "head"
    assert frames[source.SOPInstanceUID].sum() > 0 and out.is_file()
