"""The DICOM round trip with a real PACS: Orthanc + its DICOMweb plugin (authentication on, a
generated password) and a real gateway pointed at it (--pacs-url, --pacs-username,
--pacs-password-file), both on ephemeral loopback ports, stopped by PID.

The CT series of ../shared/data/volumes/dicom is stored in Orthanc by STOW-RS, with canary
values in its patient and study fields; the gateway is asked to segment it by its UIDs and to
store the result: the SEG is then found in Orthanc by QIDO-RS under the same study, read back
(WADO-RS) with highdicom and pydicom, references the source series and Frame of Reference,
carries the source's patient module, and its frames equal the gateway's own mask of the kept
volume (GetSegmentMask). Every error path gets its status (unknown series NOT_FOUND, a series
over the bounds RESOURCE_EXHAUSTED, a refused STOW FAILED_PRECONDITION with the PACS's reason,
the PACS down UNAVAILABLE) and the gateway keeps serving; its log never holds a canary or a
raw UID, on any of these paths."""

from __future__ import annotations

import io

import grpc
import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client.masks import decode_mask
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from tests.dicom_tools import dciodvfy_errors, dcmdump_ok, frames_by_source
from tests.harness import GatewayProcess, OrthancProcess, metric_value, status_of

CANARY_NAME, CANARY_ID, CANARY_STUDY = "CANARY^PATIENT^7731", "CANARYID7731", "CANARY STUDY DESCRIPTION 7731"
CANARIES = ("CANARY", "7731")
REFUSED = "REFUSED BY TEST PACS"
MAX_FILES = 110
SLICE, RANGE = 54, (50, 58)
# Orthanc's hook on every instance it receives (STOW-RS included): a SEG with this series
# description is refused, as a PACS refuses what its rules do not accept
LUA_FILTER = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SeriesDescription == '{REFUSED}' then
    return false
  end
  return true
end
"""
pytestmark = pytest.mark.usefixtures("shared_data")


def canary_copy(data: bytes, **changes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID, ds.StudyDescription = CANARY_NAME, CANARY_ID, CANARY_STUDY
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def series(shared_data):
    folder = shared_data / "volumes" / "dicom" / "promed_ct_0051"
    files = [f.read_bytes() for f in sorted(folder.glob("*.dcm"))]
    first = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    head = np.asarray(nibabel.load(str(shared_data / "volumes" / "promed_ct_0051" / "masks" / "head.nii.gz")).dataobj)
    mask = head[::-1, ::-1, SLICE].T > 0
    rows, cols = np.nonzero(mask)
    box = pb.Box(x0=max(0, cols.min() - 3), y0=max(0, rows.min() - 3), x1=cols.max() + 4, y1=rows.max() + 4)
    return [canary_copy(f) for f in files], str(first.StudyInstanceUID), str(first.SeriesInstanceUID), box


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, series):
    tmp = tmp_path_factory.mktemp("pacs")
    lua = tmp / "filter.lua"
    lua.write_text(LUA_FILTER)
    files, study, _, _ = series
    proc = OrthancProcess(tmp, LuaScripts=[str(lua)])
    try:
        proc.start()
        assert proc.stow(files) == len(files)
        # a second series of the same study with more files than the gateway's --max-series-files
        big_series = generate_uid()
        extra = [canary_copy(files[k % len(files)], SeriesInstanceUID=big_series, SOPInstanceUID=generate_uid(),
                             InstanceNumber=k + 1, ImagePositionPatient=[0.0, 0.0, 1.5 * k])
                 for k in range(MAX_FILES + 5)]
        assert proc.stow(extra) == len(extra)
        proc.big_series = big_series
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def pacs_gateway(pacs, model_repository, tmp_path_factory):
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway-pacs"), "--backend", "embedded", "--default-model",
                          "medsam_lite", "--pacs-url", pacs.url, "--pacs-username", pacs.username,
                          "--pacs-password-file", str(pacs.password_file), "--pacs-timeout-s", "10",
                          "--max-series-files", str(MAX_FILES), "--seg-content-creator", "MEDSEG^GATEWAY")
    try:
        proc.start().wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def stubs(pacs_gateway):
    with grpc.insecure_channel(pacs_gateway.target,
                               options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield pb_grpc.SegmentationStub(channel), vpb_grpc.VolumesStub(channel)


def no_patient_data_in(log: str, *uids: str) -> None:
    assert not [c for c in CANARIES if c in log], "a canary value reached the gateway's log"
    assert not [u for u in uids if u in log], "a raw UID reached the gateway's log"


def test_segment_a_series_by_uid_and_store_the_seg_back(stubs, pacs, pacs_gateway, series, tmp_path):
    _, volumes = stubs
    _, study, series_uid, box = series
    request = vpb.SegmentStudyRequest(
        study_instance_uid=study, series_instance_uid=series_uid, slice_index=SLICE, box=box,
        range=vpb.SliceRange(first=RANGE[0], last=RANGE[1]), store=True, return_dicom_seg=True, keep_volume=True,
        dicom_seg_options=pb.DicomSegOptions(segments=[pb.SegmentDescription(label="head")]))
    answer = volumes.SegmentStudy(request, timeout=600)
    assert answer.stored and answer.seg_sop_instance_uid and answer.instances_retrieved == 108
    assert answer.volume.volume_id and answer.volume.depth == 108 and answer.volume.source_format == "dicom_series"
    assert answer.summary.voxel_count > 0 and RANGE[0] <= answer.summary.first_slice <= SLICE
    assert {"retrieve", "decode", "segment", "write_seg", "store", "total"} <= set(answer.timings_ms)

    # the SEG is in the PACS, under the same study
    found = [s for s in pacs.qido_series(study) if s.SeriesInstanceUID == answer.seg_series_instance_uid]
    assert len(found) == 1 and found[0].Modality == "SEG"
    with pacs.dicomweb_client() as client:
        stored = client.retrieve_series(study, answer.seg_series_instance_uid)
    assert len(stored) == 1
    buffer = io.BytesIO()
    stored[0].save_as(buffer, enforce_file_format=True)
    ds, frames = frames_by_source(buffer.getvalue())
    hd.seg.Segmentation.from_dataset(ds)
    assert ds.SOPInstanceUID == answer.seg_sop_instance_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert ds.StudyInstanceUID == study and str(ds.PatientName) == CANARY_NAME   # the source's patient module
    assert str(ds.ContentCreatorName) == "MEDSEG^GATEWAY" and ds.SegmentSequence[0].SegmentLabel == "head"

    # its frames are the gateway's own mask of the kept volume
    mask = volumes.GetSegmentMask(vpb.GetSegmentMaskRequest(volume_id=answer.volume.volume_id,
                                                            segment_id=answer.summary.segment_id), timeout=120)
    sources = {pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID: k
               for k, f in enumerate(series[0])}
    slices = {s.slice_index: s.mask for s in mask.slices}
    assert {sources[uid] for uid in frames} == set(slices)
    for uid, frame in frames.items():
        m = slices[sources[uid]]
        np.testing.assert_array_equal(frame, decode_mask(m.data, m.height, m.width, "bits"))
    assert answer.dicom_seg == buffer.getvalue() or frames_by_source(answer.dicom_seg)[1].keys() == frames.keys()
    assert dciodvfy_errors(answer.dicom_seg, tmp_path) == []
    dcmdump_ok(answer.dicom_seg, tmp_path)
    volumes.DeleteVolume(vpb.DeleteVolumeRequest(volume_id=answer.volume.volume_id), timeout=30)
    no_patient_data_in(pacs_gateway.log(), study, series_uid, answer.seg_sop_instance_uid)
    assert metric_value(pacs_gateway.metrics_text(), "medseg_pacs_requests_total", operation="store",
                        outcome="ok") >= 1


def test_the_segment_study_command(pacs_gateway, pacs, series, tmp_path, capsys):
    """``python -m medseg_client segment-study``: the documented command writes the SEG and
    stores it; its printout names the SEG, never the patient."""
    from medseg_client.__main__ import main as cli

    _, study, series_uid, box = series
    out = tmp_path / "seg.dcm"
    code = cli(["segment-study", "--server", pacs_gateway.target, "--study", study, "--series", series_uid,
                "--slice", str(SLICE), "--box", str(box.x0), str(box.y0), str(box.x1), str(box.y1),
                "--range", str(SLICE - 1), str(SLICE + 1), "--store", "--out-seg", str(out), "--label", "head"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    ds = pydicom.dcmread(str(out))
    assert ds.Modality == "SEG" and ds.SOPInstanceUID in printed and "CANARY" not in printed
    assert any(s.SeriesInstanceUID == ds.SeriesInstanceUID for s in pacs.qido_series(study))


def test_every_error_gets_its_status_and_no_patient_data_is_logged(stubs, pacs, pacs_gateway, series):
    segmentation, volumes = stubs
    _, study, series_uid, box = series

    def ask(**fields):
        base = dict(study_instance_uid=study, series_instance_uid=series_uid, slice_index=SLICE, box=box,
                    range=vpb.SliceRange(first=SLICE, last=SLICE))
        base.update(fields)
        return status_of(lambda: volumes.SegmentStudy(vpb.SegmentStudyRequest(**base), timeout=300))

    code, message = ask(series_instance_uid=generate_uid())
    assert code == grpc.StatusCode.NOT_FOUND, message
    code, message = ask(series_instance_uid=pacs.big_series)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_FILES) in message, message
    code, message = ask(store=True, dicom_seg_options=pb.DicomSegOptions(series_description=REFUSED))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PACS" in message, message
    code, message = ask(box=pb.Box(x0=5000, y0=5000, x1=5100, y1=5100))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert ask(study_instance_uid="1.2.x")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert metric_value(pacs_gateway.metrics_text(), "medseg_pacs_requests_total", operation="store",
                        outcome="refused") >= 1

    pacs.stop()   # the PACS goes down
    code, message = ask()
    assert code == grpc.StatusCode.UNAVAILABLE and "PACS" in message, message
    assert segmentation.ListModels(pb.ListModelsRequest(), timeout=30).models   # still serving
    no_patient_data_in(pacs_gateway.log(), study, series_uid, pacs.big_series)
