"""The gateway's DICOMweb client (service/backends/pacs.py) against a real Orthanc PACS.

A module-scoped Orthanc (bench/orthanc.py: loopback, basic auth, random password) holds the
108-file CT series of ``../shared/data/volumes/dicom``. A second one caps its QIDO-RS answers
(``LimitFindInstances``, as real PACSs do): its search under-counts the series, so the bounds
of the streamed WADO-RS retrieve are what refuses it. A few loopback stubs (a socket that never
answers, an HTTP server that redirects or records headers) cover what Orthanc cannot show.

Orthanc missing FAILS these tests (``make dicom-tools`` installs it), they never skip.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from bench.orthanc import OrthancMissing, orthanc_binary
from service.backends import pacs as pacs_module
from service.backends.pacs import CHUNK_BYTES, DicomWebPacs, PacsConfig
from service.core import errors
from tests.harness import OrthancProcess, free_port

CT_FOLDER = ("volumes", "dicom", "promed_ct_0051")
CAPPED_FILES = 12  # instances of the CT stored in the capped PACS
QIDO_CAP = 5  # its LimitFindInstances (Orthanc then answers at most 6)
BIG = 1 << 30


@dataclass
class Series:
    study: str
    series: str
    files: list[Path]
    sop_uids: set[str]
    voxel_bytes: int  # rows x columns x 2 bytes x files: what the QIDO-RS estimate counts


def _require_orthanc() -> None:
    try:
        orthanc_binary()
    except OrthancMissing as exc:
        pytest.fail(f"{exc}. These tests need a real PACS; they fail rather than skip without one.", pytrace=False)


@pytest.fixture(scope="module")
def ct(shared_data) -> Series:
    folder = shared_data.joinpath(*CT_FOLDER)
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 108
    entry = json.loads((folder.parent / "index.json").read_text())["series"][0]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    voxel_bytes = sum(h.Rows * h.Columns * h.BitsAllocated // 8 for h in headers)
    return Series(entry["study_uid"], entry["series_uid"], files, {h.SOPInstanceUID for h in headers}, voxel_bytes)


@pytest.fixture(scope="module")
def orthanc(ct, tmp_path_factory):
    _require_orthanc()
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as pacs:
        assert pacs.stow(ct.files) == len(ct.files)
        yield pacs


@pytest.fixture(scope="module")
def capped_orthanc(ct, tmp_path_factory):
    _require_orthanc()
    with OrthancProcess(tmp_path_factory.mktemp("orthanc-capped"), LimitFindInstances=QIDO_CAP) as pacs:
        assert pacs.stow(ct.files[:CAPPED_FILES]) == CAPPED_FILES
        yield pacs


class Recorder:
    """The on_request callback: (operation, outcome) pairs, seconds checked to be >= 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, operation: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((operation, outcome))


def client(pacs: OrthancProcess, recorder: Recorder | None = None, **overrides) -> DicomWebPacs:
    fields = {"url": pacs.url, "username": pacs.username, "password_file": str(pacs.password_file),
              "timeout_s": 10.0, **overrides}
    return DicomWebPacs(PacsConfig(**fields), on_request=recorder)


@pytest.fixture
def received(monkeypatch) -> list[int]:
    """Sizes of the WADO-RS response chunks the client read (requests' iter_content), counted
    outside the client: what it actually took off the connection for the retrieve."""
    sizes: list[int] = []
    original = requests.models.Response.iter_content

    def counting(self, *args, **kwargs):
        wado = self.request is not None and self.request.headers.get("Accept", "").startswith("multipart/related")
        for chunk in original(self, *args, **kwargs):
            if wado:
                sizes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(requests.models.Response, "iter_content", counting)
    return sizes


def part10(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def sop_uid(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


# --------------------------------------------------------------------------- retrieve
def test_retrieve_series_returns_every_instance_as_part10(orthanc, ct, received):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        instances = pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
    assert len(instances) == 108
    assert all(isinstance(b, bytes) and b[128:132] == b"DICM" for b in instances)
    assert {sop_uid(b) for b in instances} == ct.sop_uids
    assert pydicom.dcmread(io.BytesIO(instances[0])).file_meta.TransferSyntaxUID
    assert recorder.calls == [("search", "ok"), ("retrieve", "ok")]
    assert sum(received) >= sum(map(len, instances))


def test_the_callers_check_stops_the_transfer_between_chunks(orthanc, ct, received):
    """``check`` (the gateway passes its call's deadline/cancel check) runs before each chunk:
    when it raises, the transfer stops there with its error, long before the whole series."""
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise errors.DeadlineExceeded("the call's deadline passed before retrieving the series from the PACS")

    with client(orthanc) as pacs, pytest.raises(errors.DeadlineExceeded):
        pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000, check=check)
    assert len(calls) == 4 and len(received) <= 4   # 3 chunks of 128 KiB of a ~14 MB series


def test_retrieve_unknown_series_is_not_found(orthanc, ct):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        with pytest.raises(errors.SeriesNotFound):
            pacs.retrieve_series(ct.study, generate_uid(), max_bytes=BIG, max_files=1000)
        with pytest.raises(errors.SeriesNotFound):
            pacs.retrieve_series(generate_uid(), ct.series, max_bytes=BIG, max_files=1000)
    assert recorder.calls == [("search", "not_found")] * 2


def test_retrieve_refuses_invalid_uids_before_any_request(orthanc, ct):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        for study, series in (("1.2.3/../..", ct.series), (ct.study, "PATIENT^NAME"), (ct.study, "1." * 40)):
            with pytest.raises(errors.InvalidArgument) as info:
                pacs.retrieve_series(study, series, max_bytes=BIG, max_files=1000)
            assert "PATIENT" not in str(info.value) and "../" not in str(info.value)
    assert recorder.calls == []


# --------------------------------------------------------------------------- bounds
def test_series_over_max_bytes_is_refused_by_the_search_before_any_transfer(orthanc, ct, received):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        with pytest.raises(errors.VolumeTooLarge):
            pacs.retrieve_series(ct.study, ct.series, max_bytes=ct.voxel_bytes - 1, max_files=1000)
    assert recorder.calls == [("search", "too_large")]  # no WADO-RS request at all
    assert received == []


def test_series_over_max_files_is_refused_by_the_search(orthanc, ct, received):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        with pytest.raises(errors.PayloadTooLarge) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=107)
    assert not isinstance(info.value, errors.VolumeTooLarge)
    assert recorder.calls == [("search", "too_large")]
    assert received == []


def test_stream_stops_at_max_bytes_when_the_search_under_counts(capped_orthanc, ct, received):
    """The capped PACS's QIDO-RS lists 6 of the 12 instances: the estimate (6 slices) passes a
    bound of 9 slices, the streamed count refuses the transfer before its end."""
    slice_bytes = ct.voxel_bytes // len(ct.files)
    max_bytes = 9 * slice_bytes
    recorder = Recorder()
    with client(capped_orthanc, recorder) as pacs:
        whole = pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
        total = sum(received)  # what the PACS sends for the whole series
        assert len(whole) == CAPPED_FILES and len(whole[0]) < max_bytes < total
        received.clear()
        with pytest.raises(errors.VolumeTooLarge):
            pacs.retrieve_series(ct.study, ct.series, max_bytes=max_bytes, max_files=1000)
    assert recorder.calls == [("search", "ok"), ("retrieve", "ok"), ("search", "ok"), ("retrieve", "too_large")]
    assert max_bytes < sum(received) <= max_bytes + CHUNK_BYTES < total


def test_stream_stops_at_max_files_when_the_search_under_counts(capped_orthanc, ct):
    recorder = Recorder()
    with client(capped_orthanc, recorder) as pacs:
        with pytest.raises(errors.PayloadTooLarge) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=CAPPED_FILES - 2)
        assert not isinstance(info.value, errors.VolumeTooLarge)
        # within both bounds, the capped PACS still gives the whole series
        assert len(pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=CAPPED_FILES)) == 12
    assert recorder.calls == [("search", "ok"), ("retrieve", "too_large"), ("search", "ok"), ("retrieve", "ok")]


# --------------------------------------------------------------------------- store
def test_store_puts_an_instance_into_its_study(orthanc, ct):
    ds = pydicom.dcmread(ct.files[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        pacs.store(part10(ds))
        back = pacs.retrieve_series(ct.study, ds.SeriesInstanceUID, max_bytes=BIG, max_files=10)
    assert [sop_uid(b) for b in back] == [ds.SOPInstanceUID]
    assert ds.SeriesInstanceUID in {s.SeriesInstanceUID for s in orthanc.qido_series(ct.study)}
    assert recorder.calls == [("store", "ok"), ("search", "ok"), ("retrieve", "ok")]


def test_store_refused_by_the_pacs_is_failed_precondition(orthanc):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        with pytest.raises(errors.PacsRefused) as info:
            pacs.store(b"\0" * 128 + b"not a DICOM file")
    assert "HTTP 400" in str(info.value)
    assert recorder.calls == [("store", "refused")]


# --------------------------------------------------------------------------- PACS trouble
def test_wrong_password_is_unavailable_naming_the_credentials(orthanc, ct, tmp_path):
    wrong = tmp_path / "password"
    wrong.write_text("not-the-password\n")
    recorder = Recorder()
    with client(orthanc, recorder, password_file=str(wrong)) as pacs:
        with pytest.raises(errors.PacsUnavailable) as search:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
        with pytest.raises(errors.PacsUnavailable) as store:
            pacs.store(ct.files[0].read_bytes())
    for info in (search, store):
        assert "credentials" in str(info.value)
        assert "not-the-password" not in str(info.value) and orthanc.password not in str(info.value)
    assert recorder.calls == [("search", "unavailable"), ("store", "unavailable")]


def test_nothing_listening_is_unavailable_at_once(ct):
    recorder = Recorder()
    started = time.monotonic()
    with DicomWebPacs(PacsConfig(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2.0), recorder) as pacs:
        with pytest.raises(errors.PacsUnavailable) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
    assert time.monotonic() - started < 2.0
    assert "cannot be reached" in str(info.value)
    assert recorder.calls == [("search", "unavailable")]


def test_stopped_pacs_is_unavailable(ct, tmp_path):
    _require_orthanc()
    pacs_process = OrthancProcess(tmp_path).start()
    password = tmp_path / "password"
    password.write_bytes(pacs_process.password_file.read_bytes())  # stop() removes the PACS's own copy
    pacs = client(pacs_process, timeout_s=2.0, password_file=str(password))
    pacs_process.stop()
    started = time.monotonic()
    with pacs, pytest.raises(errors.PacsUnavailable):
        pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
    assert time.monotonic() - started < 2.0


def test_pacs_that_does_not_answer_times_out(ct):
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        recorder = Recorder()
        started = time.monotonic()
        with DicomWebPacs(PacsConfig(url, timeout_s=0.5), recorder) as pacs:
            with pytest.raises(errors.PacsUnavailable) as info:
                pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
        assert time.monotonic() - started < 3.0
    assert "did not answer within 0.5 s" in str(info.value)
    assert recorder.calls == [("search", "unavailable")]


# --------------------------------------------------------------------------- credentials
def test_password_rotation_is_picked_up_without_a_new_client(orthanc, ct):
    recorder = Recorder()
    with client(orthanc, recorder) as pacs:
        pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)
        before = orthanc.password_file.read_text()
        old = orthanc.rotate_password()  # Orthanc takes the new password, the file is replaced
        assert orthanc.password_file.read_text() != before
        assert requests.get(orthanc.http_url + "/system", auth=(orthanc.username, old), timeout=5).status_code == 401
        assert len(pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)) == 108
    assert recorder.calls == [("search", "ok"), ("retrieve", "ok")] * 2


class _Recording(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP stub: records each request's path and Authorization header, answers
    ``answer(path) -> (status, headers)``."""

    seen: list[tuple[str, str]]
    answer = staticmethod(lambda path: (200, {"Content-Type": "application/dicom+json"}, b"[]"))

    def do_GET(self):  # noqa: N802
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        self._reply(*self.answer(self.path))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        self._reply(*self.answer(self.path))

    def _reply(self, status, headers, body, stall_s=0.0):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        time.sleep(stall_s)  # then the connection closes: a body shorter than its Content-Length

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    """Start stub HTTP servers on loopback port 0: ``stub(answer)`` -> (url, seen)."""
    servers = []

    def start(answer=None):
        handler = type("Handler", (_Recording,), {"seen": [], **({"answer": staticmethod(answer)} if answer else {})})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler.seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_pacs_that_stalls_during_the_transfer_times_out(stub, ct):
    qido = json.dumps([{"00280010": {"vr": "US", "Value": [2]}, "00280011": {"vr": "US", "Value": [2]}}]).encode()
    start = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 128 + b"DICM"

    def answer(path):
        if path.split("?")[0].endswith("/instances"):
            return 200, {"Content-Type": "application/dicom+json"}, qido
        return 200, {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                     "Content-Length": "100000"}, start, 3.0

    url, _ = stub(answer)
    recorder = Recorder()
    started = time.monotonic()
    with DicomWebPacs(PacsConfig(url, timeout_s=0.5), recorder) as pacs:
        with pytest.raises(errors.PacsUnavailable) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
    assert time.monotonic() - started < 2.5
    assert "did not answer within 0.5 s" in str(info.value)
    assert recorder.calls == [("search", "ok"), ("retrieve", "unavailable")]


def test_token_file_is_sent_as_bearer_and_reread_when_it_changes(stub, ct, tmp_path):
    url, seen = stub()
    token = tmp_path / "token"
    token.write_text("first-token\n")
    with DicomWebPacs(PacsConfig(url, token_file=str(token), timeout_s=5)) as pacs:
        with pytest.raises(errors.SeriesNotFound):  # the stub answers an empty QIDO-RS result
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
        staged = tmp_path / "token.new"
        staged.write_text("second-token")
        staged.replace(token)  # as a Secret update swaps the file
        with pytest.raises(errors.SeriesNotFound):
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
        token.unlink()
        with pytest.raises(errors.PacsUnavailable) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
    assert [auth for _, auth in seen] == ["Bearer first-token", "Bearer second-token"]
    assert "--pacs-token-file" in str(info.value)
    assert "first-token" not in str(info.value) and "second-token" not in str(info.value)


def test_redirect_is_not_followed(stub, ct, tmp_path):
    elsewhere, elsewhere_seen = stub()
    url, seen = stub(lambda path: (302, {"Location": elsewhere + path}, b""))
    secret = tmp_path / "password"
    secret.write_text("s3cret")
    recorder = Recorder()
    with DicomWebPacs(PacsConfig(url, username="u", password_file=str(secret), timeout_s=5), recorder) as pacs:
        with pytest.raises(errors.PacsUnavailable) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
    assert len(seen) == 1 and elsewhere_seen == []  # the other address was never contacted
    assert "redirect" in str(info.value)
    assert recorder.calls == [("search", "error")]


def test_server_error_is_unavailable(stub, ct):
    url, _ = stub(lambda path: (503, {}, b""))
    recorder = Recorder()
    with DicomWebPacs(PacsConfig(url, timeout_s=5), recorder) as pacs:
        with pytest.raises(errors.PacsUnavailable) as info:
            pacs.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=10)
    assert "HTTP 503" in str(info.value)
    assert recorder.calls == [("search", "unavailable")]


def test_store_refusal_carries_the_status_and_reason_codes_only(stub, ct):
    """A 409 shaped as Orthanc sends it for an instance of another study, then a 200 whose
    FailedSOPSequence lists a failure: both are refused, with the numbers and no UID."""
    failed = {"00081198": {"vr": "SQ", "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                                                  "00081155": {"vr": "UI", "Value": [ct.series]},
                                                  "00081197": {"vr": "US", "Value": [272]}}]}}
    answers = iter([409, 200])
    url, seen = stub(lambda path: (next(answers), {"Content-Type": "application/dicom+json"},
                                   json.dumps(failed).encode()))
    instance = ct.files[0].read_bytes()
    recorder = Recorder()
    with DicomWebPacs(PacsConfig(url, timeout_s=5), recorder) as pacs:
        messages = []
        for status in (409, 200):
            with pytest.raises(errors.PacsRefused) as info:
                pacs.store(instance)
            messages.append(str(info.value))
    assert messages == [f"the PACS refused to store the instance (HTTP {s}; failure reason 0x0110)" for s in (409, 200)]
    assert [path for path, _ in seen] == [f"/dicom-web/studies/{ct.study}"] * 2  # into its study
    assert recorder.calls == [("store", "refused")] * 2


# --------------------------------------------------------------------------- no leaks
def test_messages_and_logs_hold_no_credentials_or_uids(orthanc, capped_orthanc, ct, tmp_path, caplog):
    caplog.set_level("DEBUG", logger="service")
    wrong = tmp_path / "password"
    wrong.write_text("wrong-password")
    unknown = generate_uid()
    failures = []
    attempts = [
        (client(orthanc), lambda p: p.retrieve_series(ct.study, unknown, max_bytes=BIG, max_files=1000)),
        (client(orthanc), lambda p: p.retrieve_series(ct.study, ct.series, max_bytes=10, max_files=1000)),
        (client(orthanc), lambda p: p.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=3)),
        (client(capped_orthanc), lambda p: p.retrieve_series(ct.study, ct.series, max_bytes=9 * 131072,
                                                             max_files=1000)),
        (client(orthanc, password_file=str(wrong)), lambda p: p.retrieve_series(ct.study, ct.series, max_bytes=BIG,
                                                                                 max_files=1000)),
        (client(orthanc), lambda p: p.store(b"junk")),
        (client(orthanc, url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=1.0),
         lambda p: p.retrieve_series(ct.study, ct.series, max_bytes=BIG, max_files=1000)),
    ]
    for pacs, attempt in attempts:
        with pacs, pytest.raises(errors.ServiceError) as info:
            attempt(pacs)
        failures.append(str(info.value))
    own_logs = [r.getMessage() for r in caplog.records if r.name.startswith("service")]
    secrets = [orthanc.password, capped_orthanc.password, "wrong-password", ct.study, ct.series, unknown,
               *list(ct.sop_uids)[:5]]
    for text in failures + own_logs:
        assert not any(s in text for s in secrets), text
    # a study or series is named by its hash, which an operator can match
    assert pacs_module.uid_ref(unknown) in failures[0]
    assert hashlib.sha256(unknown.encode()).hexdigest()[:12] in failures[0]
