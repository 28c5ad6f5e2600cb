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


# --- TIFF tags, PNG text chunks, NIfTI descriptions (issue 14, finding 8) ----------------------
#
# Decoder libraries quote such text in their own warnings and log records (Pillow logs every
# short TIFF tag value at DEBUG; tifffile warns about a tag it cannot decode, quoting it), so
# these canaries travel through tifffile, Pillow and nibabel on success and error paths.

TIFF_TEXT_TAGS = {269: "DocumentName", 270: "ImageDescription", 271: "Make", 272: "Model", 285: "PageName",
                  305: "Software", 315: "Artist", 316: "HostComputer", 33432: "Copyright"}


def _short_canary(kind: str) -> str:
    return f"CANARY{kind}X{uuid.uuid4().hex[:8].upper()}"  # <= 24 characters: fits every field


def _tiff_files(canaries: list[str]) -> dict[str, bytes]:
    import numpy as np
    import tifffile
    from PIL import Image

    pixels = np.random.default_rng(8).integers(0, 255, (48, 40), dtype=np.uint8)

    def tags(kind: str) -> list[tuple[int, str]]:
        values = [(code, _short_canary(f"{kind}{code}")) for code in TIFF_TEXT_TAGS]
        canaries.extend(v for _, v in values)
        return values

    plain = io.BytesIO()  # uncompressed: tifffile decodes it
    tifffile.imwrite(plain, pixels, metadata=None, extratags=[(code, "s", 0, value, True) for code, value in tags("T")])
    lzw = io.BytesIO()  # LZW: Pillow decodes it (and logs its tags at DEBUG)
    Image.fromarray(pixels).save(lzw, "TIFF", compression="tiff_lzw", tiffinfo=dict(tags("L")))
    bad_ascii = _short_canary("TIFFBIN")  # not ASCII: tifffile warns about the tag, quoting it
    canaries.append(bad_ascii)
    coerced = io.BytesIO()
    tifffile.imwrite(coerced, pixels, metadata=None,
                     extratags=[(270, "s", 0, bad_ascii.encode() + b"\xff\xfe", True)])
    data = {"tiff": plain.getvalue(), "tiff_lzw": lzw.getvalue(), "tiff_binary_tag": coerced.getvalue()}
    data["tiff_truncated"] = data["tiff"][: len(data["tiff"]) // 2]
    data["tiff_lzw_truncated"] = data["tiff_lzw"][: len(data["tiff_lzw"]) * 2 // 3]
    return data


def _png_files(canaries: list[str]) -> dict[str, bytes]:
    import numpy as np
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for kind, add in (("TEXT", lambda k, v: info.add_text(k, v)),                        # tEXt
                      ("ZTXT", lambda k, v: info.add_text(k, v, zip=True)),              # zTXt
                      ("ITXT", lambda k, v: info.add_itxt(k, v, lang="en", tkey=v)),     # iTXt
                      ("ITXZ", lambda k, v: info.add_itxt(k, v, zip=True))):
        for key in ("Title", "Author", "Description", "Comment"):
            value = _short_canary(f"{kind}{key[:2]}")
            add(key, value)
            canaries.append(value)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (40, 44), dtype=np.uint8)).save(
        buffer, "PNG", pnginfo=info)
    data = buffer.getvalue()
    return {"png": data, "png_truncated": data[: len(data) - 40]}


def _nifti_files(canaries: list[str]) -> dict[str, bytes]:
    import gzip

    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.random.default_rng(10).integers(0, 900, (36, 30), dtype=np.int16), np.eye(4))
    values = {"descrip": _short_canary("DESCRIP"), "aux_file": _short_canary("AUX"),
              "intent_name": f"CNRY{uuid.uuid4().hex[:8].upper()}", "db_name": _short_canary("DB")[:18]}
    for field, value in values.items():
        image.header[field] = value.encode()
        canaries.append(value)
    data = image.to_bytes()
    return {"nifti": data, "nifti_gz": gzip.compress(data), "nifti_truncated": data[:400],
            "nifti_gz_truncated": gzip.compress(data)[:200]}


@pytest.fixture(scope="module")
def formats_gateway(model_repository, tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("phi-formats-gw"), "--backend", "embedded", "--log-level", "DEBUG")
    with gw.serving():
        yield gw


def test_no_tiff_png_or_nifti_text_reaches_any_log_line_or_error_detail(formats_gateway):
    canaries: list[str] = []
    files = {**_tiff_files(canaries), **_png_files(canaries), **_nifti_files(canaries)}
    assert len(canaries) == 2 * len(TIFF_TEXT_TAGS) + 1 + 16 + 4
    codes: dict[str, str] = {}
    details: list[str] = []
    with SegmentationClient(formats_gateway.target, timeout=120) as client:
        for name, data in files.items():
            request = pb.SegmentRequest(image=pb.Image(encoded=data), prompts=[pb.Prompt(box=pb.Box(x0=2, y0=2, x1=20, y1=20))])
            try:
                client._stub.Segment(request, timeout=120)
                codes[name] = "OK"
            except grpc.RpcError as exc:
                codes[name] = exc.code().name
                details.append(exc.details() or "")
    ok = {name for name in files if not name.endswith("truncated")}
    assert {name for name, code in codes.items() if code == "OK"} == ok, codes
    assert all(codes[name] == "INVALID_ARGUMENT" for name in files if name not in ok), codes
    formats_gateway.stop()  # flush everything, including shutdown lines
    log = formats_gateway.log()
    audit_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(line["method"] == "Segment" for line in audit_lines) == len(files)
    assert " DEBUG " in log
    leaked = sorted({c for c in canaries if c in log})
    assert not leaked, f"file text in the gateway log: {leaked}"
    leaked = sorted({c for c in canaries if any(c in d for d in details)})
    assert not leaked, f"file text in error details: {leaked}"
