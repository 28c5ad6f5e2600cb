"""No patient data in any log line: the three real DICOM files, with every identifying field
set to a unique canary string, go through a real gateway running at DEBUG log level (good
requests, a file without pixel data, a truncated file, a model name that is a canary); no
canary may appear anywhere in the gateway's output (stdout + stderr, audit lines included)
or in the error details sent back (except the client's own model name, echoed to it)."""

from __future__ import annotations

import io
import json
import uuid

import grpc
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client import SegmentationClient
from tests.harness import GatewayProcess

FILES = ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm")
# Person names, identifiers, dates, descriptions and free text that identify a patient or study.
TEXT_FIELDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientAddress", "PatientComments",
               "PatientMotherBirthName", "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
               "StudyDescription", "SeriesDescription", "ImageComments", "AdditionalPatientHistory",
               "StationName", "DeviceSerialNumber", "RequestingPhysician", "ScheduledProcedureStepID")
DATE_FIELDS = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
UID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def _canary(kind: str, index: int) -> str:
    return f"CANARY{kind}{index}X{uuid.uuid4().hex[:10].upper()}"


def _identified_copy(source, index: int, canaries: list[str]) -> bytes:
    ds = pydicom.dcmread(source)
    for field in TEXT_FIELDS:
        value = _canary(field[:6].upper(), index)
        setattr(ds, field, value)
        canaries.append(value)
    for n, field in enumerate(DATE_FIELDS):
        value = f"18{index}{n}0{n + 1}1{n}"  # a date no log line would carry by chance
        setattr(ds, field, value)
        canaries.append(value)
    for field in UID_FIELDS:
        value = generate_uid(prefix="1.2.826.0.1.3680043.10.999.")
        setattr(ds, field, value)
        canaries.append(value)
    ds.PatientAge, ds.PatientSex = "077Y", "O"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without_pixel_data(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def debug_gateway(model_repository, tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("phi-gw"), "--backend", "embedded", "--log-level", "DEBUG")
    gw.start().wait_serving()
    yield gw
    gw.stop()


def test_no_dicom_identifier_reaches_any_log_line_or_error_detail(debug_gateway, shared_data):
    canaries: list[str] = []
    copies = [_identified_copy(shared_data / "dicom" / name, i, canaries) for i, name in enumerate(FILES)]
    assert any(c.startswith("CANARYPATIEN") for c in canaries)
    model_canary = _canary("MODEL", 9)  # a client putting a name where the model goes
    details: list[str] = []
    codes: list[str] = []

    def send(request: pb.SegmentRequest) -> None:
        try:
            client._stub.Segment(request, timeout=120)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
            details.append(exc.details() or "")

    with SegmentationClient(debug_gateway.target, timeout=120) as client:
        for data in copies:
            image = pb.Image(encoded=data)
            send(pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=pb.Box(x0=10, y0=10, x1=60, y1=60))]))
            client.embed(image)
            send(pb.SegmentRequest(image=pb.Image(encoded=_without_pixel_data(data)),
                                   prompts=[pb.Prompt(box=pb.Box(x0=1, y0=1, x1=9, y1=9))]))
            send(pb.SegmentRequest(image=pb.Image(encoded=data[: len(data) // 3]),
                                   prompts=[pb.Prompt(box=pb.Box(x0=1, y0=1, x1=9, y1=9))]))
            send(pb.SegmentRequest(model=model_canary, image=image,
                                   prompts=[pb.Prompt(box=pb.Box(x0=1, y0=1, x1=9, y1=9))]))
    assert codes.count("OK") == 3 and codes.count("INVALID_ARGUMENT") == 6 and codes.count("NOT_FOUND") == 3, codes
    debug_gateway.stop()  # flush everything, including shutdown lines
    log = debug_gateway.log()
    audit_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(line["method"] == "Segment" for line in audit_lines) == 12
    assert " DEBUG " in log  # the run really logged at DEBUG
    leaked = sorted({c for c in [*canaries, model_canary] if c in log})
    assert not leaked, f"patient data in the gateway log: {leaked}"
    leaked = sorted({c for c in canaries if any(c in d for d in details)})
    assert not leaked, f"patient data in error details: {leaked}"
