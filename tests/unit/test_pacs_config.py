"""PacsConfig, UID checks and the pieces of service/backends/pacs.py that need no PACS: the
byte estimate (the same count as the volume loader's), the incremental multipart reader and
the STOW-RS failure reasons. The client against a real Orthanc: tests/integration/test_pacs_client.py."""

from __future__ import annotations

import hashlib
import json

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from service.backends.pacs import (_failures, _Malformed, _Parts, PacsConfig, check_uid, instance_voxel_bytes,
                                   uid_ref)
from service.core import errors
from service.core.volume import VolumeSource, estimate_volume_bytes
from service.settings import Settings

URL = "https://pacs.hospital.example/dicom-web"


# --------------------------------------------------------------------------- PacsConfig
def test_from_settings_is_none_without_a_pacs_url():
    assert PacsConfig.from_settings(Settings.from_args([], environ={})) is None


def test_from_settings_takes_every_pacs_flag(tmp_path):
    ca, password = tmp_path / "ca.pem", tmp_path / "password"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    password.write_text("secret\n")
    settings = Settings.from_args(["--pacs-url", URL, "--pacs-ca-file", str(ca), "--pacs-username", "gateway",
                                   "--pacs-password-file", str(password), "--pacs-timeout-s", "7.5"], environ={})
    assert PacsConfig.from_settings(settings) == PacsConfig(url=URL, ca_file=str(ca), username="gateway",
                                                            password_file=str(password), timeout_s=7.5)


def test_from_settings_takes_a_token_file_from_the_environment(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    settings = Settings.from_args([], environ={"MEDSEG_PACS_URL": URL, "MEDSEG_PACS_TOKEN_FILE": str(token)})
    config = PacsConfig.from_settings(settings)
    assert config is not None and config.token_file == str(token) and config.timeout_s == 30.0


@pytest.mark.parametrize("fields", [
    {"url": "ftp://pacs.example/dicom-web"},
    {"url": "pacs.example/dicom-web"},
    {"url": "https://user:secret@pacs.example/dicom-web"},
    {"url": URL + "?studies=1"},
    {"url": URL, "username": "gateway"},  # a username without its password file
    {"url": URL, "password_file": "/run/secrets/p"},  # and the reverse
    {"url": URL, "username": "gateway", "password_file": "/run/secrets/p", "token_file": "/run/secrets/t"},
    {"url": URL, "timeout_s": 0},
    {"url": URL, "ca_file": "/nonexistent/ca.pem"},
])
def test_config_refuses_invalid_combinations(fields):
    with pytest.raises(ValueError) as info:
        PacsConfig(**fields)
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- UIDs
@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "0", "1.2.3", "2." + "9" * 62,
                                 "1.2.826.0.1.3680043.8.498.76508788141323645416177844648030460613"])
def test_check_uid_accepts_dicom_uids(uid):
    assert check_uid(uid, "the series UID") == uid


@pytest.mark.parametrize("uid", ["", "1.2.", ".1.2", "1..2", "1.2.a", "1.2 .3", "1.2/3", "../studies",
                                 "DOE^JOHN", "1." * 32 + "1", "1.2.3\n", "\u0661.\u0662", None, 123])
def test_check_uid_refuses_anything_else_without_echoing_it(uid):
    with pytest.raises(errors.InvalidArgument) as info:
        check_uid(uid, "the series UID")
    assert "the series UID" in str(info.value)
    assert "DOE" not in str(info.value) and "studies" not in str(info.value)


def test_uid_ref_is_a_short_stable_hash():
    uid = "1.2.826.0.1.3680043.8.498.76508788141323645416177844648030460613"
    assert uid_ref(uid) == "sha256:" + hashlib.sha256(uid.encode()).hexdigest()[:12] == uid_ref(uid)
    assert uid not in uid_ref(uid) and uid_ref(uid) != uid_ref(uid + "1")


# --------------------------------------------------------------------------- byte estimate
def _qido(ds: pydicom.Dataset) -> dict:
    """The instance as a QIDO-RS answer would carry it (DICOM JSON of the estimate's attributes)."""
    keep = pydicom.Dataset()
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"):
        if keyword in ds:
            setattr(keep, keyword, ds.data_element(keyword).value)
    return keep.to_json_dict()


def test_estimate_counts_like_the_volume_loader():
    path = get_testdata_file("CT_small.dcm")
    data = open(path, "rb").read()
    expected = estimate_volume_bytes(VolumeSource("dicom_series", files=(data, data, data)))
    assert sum(instance_voxel_bytes(_qido(pydicom.dcmread(path))) for _ in range(3)) == expected


def test_estimate_counts_frames_samples_and_defaults():
    assert instance_voxel_bytes({"00280010": {"vr": "US", "Value": [4]}, "00280011": {"vr": "US", "Value": [5]},
                                 "00280100": {"vr": "US", "Value": [8]}, "00280002": {"vr": "US", "Value": [3]},
                                 "00280008": {"vr": "IS", "Value": ["7"]}}) == 4 * 5 * 3 * 7
    # BitsAllocated not answered: 16 bits assumed; 1-bit frames count a byte per pixel, as the loader does
    assert instance_voxel_bytes({"00280010": {"Value": [4]}, "00280011": {"Value": [5]}}) == 4 * 5 * 2
    assert instance_voxel_bytes({"00280010": {"Value": [4]}, "00280011": {"Value": [5]},
                                 "00280100": {"Value": [1]}}) == 4 * 5
    assert instance_voxel_bytes({"00280010": {"Value": [4]}}) == 0  # no Columns: the stream count bounds it


# --------------------------------------------------------------------------- multipart
def _multipart(bodies: list[bytes], boundary: bytes = b"b0undary", preamble: bytes = b"") -> bytes:
    out = preamble
    for i, body in enumerate(bodies):
        headers = b"Content-Type: application/dicom\r\n" if i % 2 == 0 else b""  # a part may have none
        out += b"--" + boundary + b"  \r\n" + headers + b"\r\n" + body + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue --" + boundary + b"\r\n"


def test_parts_reads_every_body_whatever_the_chunking():
    bodies = [b"first\r\n--b0undar", b"", b"\r\n\r\nthird", b"x" * 50]
    message = _multipart(bodies, preamble=b"preamble\r\n")
    for size in range(1, len(message) + 1):
        parts, out = _Parts(b"b0undary"), []
        for i in range(0, len(message), size):
            out += parts.feed(message[i:i + size])
        assert out == bodies and parts.done, size


def test_parts_without_a_closing_boundary_is_not_done():
    parts = _Parts(b"b")
    assert parts.feed(b"--b\r\n\r\nbody\r\n--b\r\n\r\ncut") == [b"body"]
    assert not parts.done


def test_part_without_headers_is_malformed():
    with pytest.raises(_Malformed):
        _Parts(b"b").feed(b"--b\r\nno blank line\r\n--b--")


# --------------------------------------------------------------------------- STOW-RS answers
def _response(status: int, body: object) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers["Content-Type"] = "application/dicom+json"
    return response


def test_failures_read_reason_codes_only():
    # what Orthanc answers (409) to an instance stored into another study
    body = {"00081198": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
         "00081155": {"vr": "UI", "Value": ["1.2.3.4"]}, "00081197": {"vr": "US", "Value": [272]}},
        {"00081197": {"vr": "US", "Value": [0xA700]}}]}, "00081199": {"vr": "SQ"}}
    assert _failures(_response(409, body)) == (2, [272, 0xA700])
    assert _failures(_response(400, {"00081198": {"vr": "SQ"}})) == (0, [])
    assert _failures(_response(200, {"00081199": {"vr": "SQ", "Value": [{}]}})) == (0, [])
    assert _failures(_response(200, [body])) == (2, [272, 0xA700])
    assert _failures(_response(400, "not DICOM JSON")) == (0, [])
