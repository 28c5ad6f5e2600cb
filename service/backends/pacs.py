"""The gateway's DICOMweb client of the PACS: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Blocking (``requests``); the caller runs it in a worker thread. One ``requests.Session`` per
client, shared by ``dicomweb_client`` (QIDO-RS) and the streamed WADO-RS / STOW-RS requests
written here, so that the rules below hold for every request:

* only the configured ``--pacs-url`` is contacted: redirects are not followed (a 3xx is an
  error telling the operator to configure the final URL), environment proxies and ``.netrc``
  are ignored, and a URL outside the configured root is refused before it is sent;
* credentials (HTTP basic from ``--pacs-username`` + the password file, or a bearer token
  file) are re-read when their file changes (a Kubernetes Secret rotated without a restart);
* every failure becomes one of the gateway's domain errors in :meth:`DicomWebPacs._boundary`,
  with a message that says what to do and never holds a credential, a UID or a tag value
  (a study or series is named by :func:`uid_ref`, a short hash).

Bounds come before the transfer: the QIDO-RS search of the series' instances (with Rows,
Columns, BitsAllocated, SamplesPerPixel, NumberOfFrames) refuses a series with more than
``max_files`` instances or more voxel bytes than ``max_bytes`` (counted as
:func:`service.core.volume.estimate_volume_bytes` does); the WADO-RS retrieve is then read in
chunks with a running byte count and stopped (the connection closed) as soon as it passes
``max_bytes`` or brings more than ``max_files`` instances.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.exceptions import ReadTimeoutError

from service.core import errors

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

SEARCH, RETRIEVE, STORE = "search", "retrieve", "store"
OUTCOMES = ("ok", "unavailable", "not_found", "refused", "too_large", "error")
CHUNK_BYTES = 128 * 1024
MAX_UID_CHARS = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# QIDO-RS attributes the byte estimate needs (DICOM JSON keys); Orthanc's plugin answers them
_FIELDS = {"Rows": "00280010", "Columns": "00280011", "BitsAllocated": "00280100",
           "SamplesPerPixel": "00280002", "NumberOfFrames": "00280008"}
_WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_FAILED_SOP_SEQUENCE, _FAILURE_REASON = "00081198", "00081197"
_REQUEST = {SEARCH: "QIDO-RS search", RETRIEVE: "WADO-RS retrieve", STORE: "STOW-RS store"}
CREDENTIALS_HINT = "check --pacs-username and --pacs-password-file, or --pacs-token-file"


def uid_ref(uid: str) -> str:
    """How a message or a log line names a study or series: ``sha256:`` and 12 hex digits of
    the UID's SHA-256 (stable, so an operator can match it; not the UID itself)."""
    return "sha256:" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:12]


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it is a DICOM UID (digits and dots, at most 64 characters), else
    :class:`~service.core.errors.InvalidArgument` (the value is not echoed)."""
    if not isinstance(uid, str) or len(uid) > MAX_UID_CHARS or not _UID.fullmatch(uid):
        raise errors.InvalidArgument(f"{what} is not a DICOM UID (digits and dots, at most {MAX_UID_CHARS} "
                                     "characters)")
    return uid


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS's DICOMweb service is and how to authenticate to it.

    ``url``: the DICOMweb root (``http://`` or ``https://``, no credentials in it); ``ca_file``:
    PEM bundle the https certificate must chain to ("" = the system's CAs); ``username`` with
    ``password_file`` (HTTP basic) or ``token_file`` (bearer), not both; ``timeout_s``: connect
    and read timeout of each request. Invalid combinations raise ``ValueError``.
    """

    url: str
    ca_file: str = ""
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the PACS URL must be an http:// or https:// URL of its DICOMweb root")
        if parts.username or parts.password:
            raise ValueError("the PACS URL must not carry credentials: use --pacs-username and "
                             "--pacs-password-file, or --pacs-token-file")
        if parts.query or parts.fragment:
            raise ValueError("the PACS URL must be the DICOMweb root, without a query or fragment")
        if bool(self.username) != bool(self.password_file):
            raise ValueError("HTTP basic authentication to the PACS needs both --pacs-username and "
                             "--pacs-password-file")
        if self.token_file and self.username:
            raise ValueError("give the PACS either basic credentials or a token file, not both")
        if not self.timeout_s > 0:
            raise ValueError("the PACS timeout must be > 0 seconds")
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise ValueError("--pacs-ca-file is not a file")

    @classmethod
    def from_settings(cls, settings: "Settings") -> "PacsConfig | None":
        """The configuration of ``settings.pacs_*``; None when no ``pacs_url`` is set."""
        if not settings.pacs_url:
            return None
        return cls(url=settings.pacs_url, ca_file=settings.pacs_ca_file, username=settings.pacs_username,
                   password_file=settings.pacs_password_file, token_file=settings.pacs_token_file,
                   timeout_s=settings.pacs_timeout_s)


class _Malformed(errors.PacsUnavailable):
    """The PACS answered something the gateway cannot use (outcome "error", not "unavailable")."""


class _SecretFile:
    """A one-line secret re-read when its file changes (device, inode, size, mtime: a Secret's
    ``..data`` symlink swap is seen, as stat follows links); the trailing newline is stripped."""

    def __init__(self, path: str, flag: str) -> None:
        self._path, self._flag = path, flag
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._value = ""

    def value(self) -> str:
        with self._lock:
            try:
                st = os.stat(self._path)
                signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if signature != self._signature:
                    with open(self._path, encoding="utf-8") as f:
                        self._value = f.read().rstrip("\r\n")
                    self._signature = signature
            except (OSError, UnicodeDecodeError) as exc:
                self._signature = None
                log.warning("cannot read the PACS credentials file %s: %s", self._flag, type(exc).__name__)
                raise errors.PacsUnavailable(f"the gateway cannot read its PACS credentials ({self._flag}); the "
                                             "operator must fix the file") from None
            if not self._value:
                raise errors.PacsUnavailable(f"the gateway's PACS credentials file ({self._flag}) is empty; the "
                                             "operator must fix it")
            return self._value


class _FileAuth(AuthBase):
    """Basic or bearer ``Authorization`` from files read at each request (if changed)."""

    def __init__(self, config: PacsConfig) -> None:
        self._username = config.username
        self._password = _SecretFile(config.password_file, "--pacs-password-file") if config.password_file else None
        self._token = _SecretFile(config.token_file, "--pacs-token-file") if config.token_file else None

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token is not None:
            request.headers["Authorization"] = f"Bearer {self._token.value()}"
        elif self._password is not None:
            HTTPBasicAuth(self._username, self._password.value())(request)
        return request


class _PinnedSession(requests.Session):
    """A session that only talks to ``root``: no redirects followed, no proxies or .netrc from
    the environment, and any other URL refused before it is sent."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self._root = root
        self.trust_env = False
        self.max_redirects = 0
        self.hooks["response"].append(self._refuse_redirect)

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        if not (url == self._root or str(url).startswith(self._root + "/")):
            raise _Malformed("the gateway refused to send a PACS request outside --pacs-url")
        kwargs["allow_redirects"] = False
        return super().request(method, url, *args, **kwargs)

    @staticmethod
    def _refuse_redirect(response: requests.Response, *args, **kwargs) -> None:
        if 300 <= response.status_code < 400:
            response.close()
            raise _Malformed(f"the PACS answered with a redirect (HTTP {response.status_code}), which the gateway "
                             "does not follow: set --pacs-url to the DICOMweb root itself")


class _Parts:
    """Incremental reader of a ``multipart/related`` body: :meth:`feed` chunks, get the bodies
    of the parts completed so far. Keeps at most one part and one chunk buffered."""

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # the first boundary line need not follow a CRLF
        self._scan = 0
        self._started = False
        self.done = False

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self.done:
            return out  # the epilogue
        self._buf += chunk
        while True:
            if self._started and self._buf[:2] == b"--":  # the close delimiter
                self.done = True
                self._buf.clear()
                return out
            i = self._buf.find(self._delimiter, self._scan)
            if i < 0:
                self._scan = max(0, len(self._buf) - len(self._delimiter) + 1)
                return out
            if self._started:
                out.append(self._body(memoryview(self._buf)[:i]))
            self._started = True
            del self._buf[:i + len(self._delimiter)]
            self._scan = 0

    @staticmethod
    def _body(segment: memoryview) -> bytes:
        """The body of one part: after the boundary line's end and the part's headers."""
        data = segment.tobytes()
        line_end = data.find(b"\r\n")
        headers_end = data.find(b"\r\n\r\n", max(line_end, 0))
        if line_end < 0 or headers_end < 0:
            raise _Malformed("the PACS sent a WADO-RS part without headers (not a multipart/related message)")
        return data[headers_end + 4:]


def _boundary_of(content_type: str) -> bytes:
    media_type, *params = [p.strip() for p in content_type.split(";")]
    if media_type.lower() != "multipart/related":
        raise _Malformed("the PACS answered the WADO-RS retrieve with a media type other than multipart/related")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    raise _Malformed("the PACS answered the WADO-RS retrieve without a multipart boundary")


def _json_int(item: dict, key: str) -> int | None:
    try:
        return int(str(item[key]["Value"][0]))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def instance_voxel_bytes(item: dict) -> int:
    """Voxel bytes of one instance from its QIDO-RS attributes (DICOM JSON): rows x columns x
    frames x samples x max(1, BitsAllocated // 8), as :func:`service.core.volume.estimate_volume_bytes`
    counts a slice; 0 when Rows or Columns is not given (the streamed byte count bounds it)."""
    rows, cols = _json_int(item, _FIELDS["Rows"]), _json_int(item, _FIELDS["Columns"])
    if not rows or not cols:
        return 0
    bits = _json_int(item, _FIELDS["BitsAllocated"]) or 16
    frames = _json_int(item, _FIELDS["NumberOfFrames"]) or 1
    samples = _json_int(item, _FIELDS["SamplesPerPixel"]) or 1
    return rows * cols * max(1, frames) * max(1, samples) * max(1, bits // 8)


def _failures(response: requests.Response) -> tuple[int, list[int]]:
    """How many items a STOW-RS answer's FailedSOPSequence has, and their FailureReason codes
    (numbers only: the items' UIDs are not read)."""
    try:
        body = response.json() if response.content else {}
    except ValueError:
        return 0, []
    if isinstance(body, list):
        body = body[0] if body and isinstance(body[0], dict) else {}
    if not isinstance(body, dict) or not isinstance(body.get(_FAILED_SOP_SEQUENCE), dict):
        return 0, []
    items = [item for item in body[_FAILED_SOP_SEQUENCE].get("Value") or [] if isinstance(item, dict)]
    reasons = {_json_int(item, _FAILURE_REASON) for item in items}
    return len(items), sorted(r for r in reasons if r is not None)


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, _Malformed):
        return "error"
    if isinstance(exc, errors.PacsUnavailable):
        return "unavailable"
    if isinstance(exc, errors.NotFound):
        return "not_found"
    if isinstance(exc, errors.PacsRefused):
        return "refused"
    if isinstance(exc, errors.ResourceExhausted):
        return "too_large"
    return "error"


class DicomWebPacs:
    """The PACS over DICOMweb. ``on_request(operation, outcome, seconds)`` is called once per
    request: operation in :data:`SEARCH`/:data:`RETRIEVE`/:data:`STORE`, outcome in
    :data:`OUTCOMES`. Thread-safe for concurrent calls."""

    def __init__(self, config: PacsConfig, on_request: Callable[[str, str, float], None] | None = None) -> None:
        self.config = config
        self._root = config.url.rstrip("/")
        self._on_request = on_request
        parts = urlsplit(self._root)
        self._origin = f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        if parts.scheme == "http" and (config.password_file or config.token_file) and \
                parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("PACS credentials go to %s over plain http; use https", self._origin)
        self._timeout = (config.timeout_s, config.timeout_s)
        self._session = _PinnedSession(self._root)
        self._session.auth = _FileAuth(config)
        self._session.verify = config.ca_file or True
        self._qido = DICOMwebClient(self._root, session=self._session, timeout=self._timeout, permissive_uid=True)
        self._qido.set_http_retry_params(retry=False)  # the gateway's client decides about retries

    # ------------------------------------------------------------------ public API
    def retrieve_series(self, study_uid: str, series_uid: str, *, max_bytes: int, max_files: int,
                        check: Callable[[], None] | None = None) -> list[bytes]:
        """Every instance of the series, each as the DICOM Part 10 bytes the PACS sent (with
        file meta), in the order received.

        Refused before the transfer (QIDO-RS) when the series has more than ``max_files``
        instances (:class:`~service.core.errors.PayloadTooLarge`) or more than ``max_bytes``
        voxel bytes (:class:`~service.core.errors.VolumeTooLarge`); stopped during it when more
        than ``max_bytes`` bytes or ``max_files`` instances arrive. No such series:
        :class:`~service.core.errors.SeriesNotFound`. ``check()`` is called before each chunk
        is read: the caller's way to stop a transfer its client no longer waits for (it raises,
        e.g. the call's DeadlineExceeded); each read is bounded by ``timeout_s`` on its own."""
        check_uid(study_uid, "the study UID")
        check_uid(series_uid, "the series UID")
        where = f"series {uid_ref(series_uid)} of study {uid_ref(study_uid)}"
        with self._boundary(SEARCH, where):
            self._check_search(study_uid, series_uid, where, max_bytes, max_files)
        with self._boundary(RETRIEVE, where):
            return self._stream_series(study_uid, series_uid, where, max_bytes, max_files, check)

    def store(self, instance: bytes) -> None:
        """STOW-RS of one DICOM Part 10 instance, into its study (``/studies/{uid}``; into
        ``/studies`` when its StudyInstanceUID cannot be read, for the PACS to judge). A refusal
        is :class:`~service.core.errors.PacsRefused` with the PACS's HTTP status and failure
        reason codes."""
        study, series, sop = _instance_uids(instance)
        url = f"{self._root}/studies/{study}" if study else f"{self._root}/studies"
        boundary = uuid.uuid4().hex
        while boundary.encode() in instance:
            boundary = uuid.uuid4().hex
        body = b"".join((b"--", boundary.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n", instance,
                         b"\r\n--", boundary.encode(), b"--\r\n"))
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        with self._boundary(STORE, "the instance"):
            with self._session.post(url, data=body, headers=headers, timeout=self._timeout) as response:
                if response.status_code in (401, 403, 408, 429) or response.status_code >= 500:
                    raise self._status_error(STORE, response.status_code, "the instance")
                failed, reasons = _failures(response)
                if response.status_code >= 400 or failed:
                    codes = f"; failure reason {', '.join(f'0x{r:04X}' for r in reasons)}" if reasons else ""
                    raise errors.PacsRefused(f"the PACS refused to store the instance (HTTP {response.status_code}"
                                             f"{codes})")
                if response.status_code not in (200, 202):
                    raise _Malformed(f"the PACS answered the STOW-RS store with HTTP {response.status_code}")
            if study and series and sop:
                self._check_stored(study, series, sop)

    def _check_stored(self, study: str, series: str, sop: str) -> None:
        """QIDO-RS for the instance just stored: a PACS may answer a STOW-RS as accepted and
        still drop the instance (Orthanc 1.10 does so for an instance its ReceivedInstanceFilter
        refuses), so "stored" is only said of an instance the PACS then lists (part of the
        store request as ``on_request`` counts it)."""
        found = self._qido.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                search_filters={"SOPInstanceUID": sop}, limit=2)
        if not found:
            raise errors.PacsRefused("the PACS answered the STOW-RS store as accepted but does not list the "
                                     "instance afterwards (QIDO-RS): it dropped it, e.g. by one of its filters")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "DicomWebPacs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the two steps
    def _check_search(self, study_uid: str, series_uid: str, where: str, max_bytes: int, max_files: int) -> None:
        """QIDO-RS of the series' instances (at most ``max_files + 1``): found, and within bounds."""
        found = self._qido.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                fields=list(_FIELDS), limit=max_files + 1)
        if not isinstance(found, list) or not all(isinstance(item, dict) for item in found):
            raise _Malformed("the PACS answered the QIDO-RS search with something other than DICOM JSON")
        if not found:
            raise errors.SeriesNotFound(f"the PACS has no instances of {where}")
        if len(found) > max_files:
            raise errors.PayloadTooLarge(f"the series has more than {max_files} instances; the limit is "
                                         f"{max_files} files per series")
        nbytes = sum(instance_voxel_bytes(item) for item in found)
        if nbytes > max_bytes:
            raise errors.VolumeTooLarge(f"the series holds {nbytes} bytes of voxels in {len(found)} instances; the "
                                        f"limit is {max_bytes} bytes per volume")

    def _stream_series(self, study_uid: str, series_uid: str, where: str, max_bytes: int,
                       max_files: int, check: Callable[[], None] | None = None) -> list[bytes]:
        url = f"{self._root}/studies/{study_uid}/series/{series_uid}"
        headers = {"Accept": _WADO_ACCEPT, "Accept-Encoding": "identity"}  # counted bytes = bytes sent
        with self._session.get(url, headers=headers, stream=True, timeout=self._timeout) as response:
            if response.status_code != 200:
                raise self._status_error(RETRIEVE, response.status_code, where)
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise errors.VolumeTooLarge(f"the series is {declared} bytes; the limit is {max_bytes} bytes per "
                                            "volume")
            parts = _Parts(_boundary_of(response.headers.get("Content-Type", "")))
            instances: list[bytes] = []
            received = 0
            for chunk in response.iter_content(CHUNK_BYTES):
                if check is not None:
                    check()
                received += len(chunk)
                if received > max_bytes:
                    raise errors.VolumeTooLarge(f"the series is over {max_bytes} bytes (the limit per volume); the "
                                                f"transfer was stopped after {len(instances)} instances")
                for part in parts.feed(chunk):
                    if part[128:132] != b"DICM":
                        raise _Malformed("the PACS sent a WADO-RS part that is not a DICOM Part 10 file")
                    instances.append(part)
                    if len(instances) > max_files:
                        raise errors.PayloadTooLarge(f"the series has more than {max_files} instances; the limit "
                                                     f"is {max_files} files per series")
                if parts.done:
                    break
        if not parts.done:
            raise _Malformed("the PACS's WADO-RS answer ended before its closing multipart boundary")
        if not instances:
            raise errors.SeriesNotFound(f"the PACS has no instances of {where}")
        return instances

    # ------------------------------------------------------------------ the error edge
    def _status_error(self, operation: str, status: int, where: str) -> errors.ServiceError:
        """The domain error of an HTTP error status answered to ``operation``."""
        request = _REQUEST[operation]
        if status in (401, 403):
            return errors.PacsUnavailable(f"the PACS refused the gateway's credentials (HTTP {status}) for the "
                                          f"{request}; the operator must {CREDENTIALS_HINT}")
        if status == 404 and operation != STORE:
            return errors.SeriesNotFound(f"the PACS has no {where}")
        if status in (408, 429, 502, 503, 504):
            return errors.PacsUnavailable(f"the PACS is busy or down (HTTP {status} to the {request}); retry later")
        if status >= 500:
            return errors.PacsUnavailable(f"the PACS failed on the {request} (HTTP {status}); retry later, and "
                                          "if it persists the PACS's operator should look at its log")
        if operation == STORE:
            return errors.PacsRefused(f"the PACS refused to store the instance (HTTP {status})")
        return _Malformed(f"the PACS rejected the gateway's {request} (HTTP {status})")

    def _translate(self, exc: Exception, operation: str, where: str) -> errors.ServiceError:
        """One table from ``requests`` failures to the gateway's errors (messages without URLs:
        a request's URL holds UIDs)."""
        timeout = f"{self.config.timeout_s:g} s (--pacs-timeout-s)"
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return self._status_error(operation, exc.response.status_code, where)
        if isinstance(exc, requests.ConnectTimeout):
            return errors.PacsUnavailable(f"the PACS did not accept a connection within {timeout}")
        if isinstance(exc, requests.Timeout) or (  # iter_content reports a read timeout as a ConnectionError
                isinstance(exc, requests.ConnectionError) and exc.args and isinstance(exc.args[0], ReadTimeoutError)):
            return errors.PacsUnavailable(f"the PACS did not answer within {timeout}")
        if isinstance(exc, requests.exceptions.SSLError):
            return errors.PacsUnavailable("the TLS handshake with the PACS failed: its certificate is not trusted "
                                          "(--pacs-ca-file, or the system's CAs) or does not match the host of "
                                          "--pacs-url")
        if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
            return errors.PacsUnavailable(f"the connection to the PACS broke during the {_REQUEST[operation]}; "
                                          "retry later")
        if isinstance(exc, requests.ConnectionError):
            return errors.PacsUnavailable("the PACS cannot be reached at the host and port of --pacs-url "
                                          "(connection refused or reset, or the name does not resolve)")
        if isinstance(exc, OSError):  # e.g. an unreadable --pacs-ca-file
            return errors.PacsUnavailable(f"the gateway cannot make the {_REQUEST[operation]} request "
                                          f"({type(exc).__name__}); check --pacs-ca-file")
        return _Malformed(f"the {_REQUEST[operation]} request to the PACS failed ({type(exc).__name__})")

    @contextlib.contextmanager
    def _boundary(self, operation: str, where: str) -> Iterator[None]:
        """Times one request, maps its failures to domain errors, reports it to ``on_request``."""
        start = time.monotonic()
        outcome = "error"
        try:
            try:
                yield
            except errors.ServiceError:
                raise
            except (requests.RequestException, OSError, ValueError) as exc:
                # ValueError: dicomweb_client's answer to a malformed JSON or multipart body
                raise self._translate(exc, operation, where) from exc
            outcome = "ok"
        except BaseException as exc:
            outcome = _outcome(exc)
            if outcome in ("unavailable", "error"):
                log.warning("PACS %s at %s: %s: %s", operation, self._origin, outcome,
                            exc.message if isinstance(exc, errors.ServiceError) else type(exc).__name__)
            raise
        finally:
            if self._on_request is not None:
                try:
                    self._on_request(operation, outcome, time.monotonic() - start)
                except Exception:  # a metrics hook must not turn a PACS answer into a failure
                    log.exception("the PACS on_request callback failed")


_INSTANCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _instance_uids(instance: bytes) -> tuple[str, str, str]:
    """The instance's (Study, Series, SOP Instance) UIDs, each "" unless its header reads and
    it is a valid UID."""
    try:
        ds = pydicom.dcmread(BytesIO(instance), stop_before_pixels=True, specific_tags=list(_INSTANCE_UIDS))
        uids = [str(ds.get(keyword, "") or "") for keyword in _INSTANCE_UIDS]
    except Exception:  # noqa: BLE001 - not DICOM: the PACS judges (and refuses) it
        return "", "", ""
    study, series, sop = (uid if len(uid) <= MAX_UID_CHARS and _UID.fullmatch(uid) else "" for uid in uids)
    return study, series, sop
