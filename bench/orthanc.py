"""A real PACS for tests and people: Orthanc with its DICOMweb plugin (Debian's ``orthanc``
and ``orthanc-dicomweb``, installed by ``make dicom-tools``), started on a free loopback
port with a configuration generated in a temporary directory, readiness polled (never
slept for), stopped by PID.

The configuration is locked down the way a PACS the gateway talks to should be: HTTP basic
authentication on (one user, a random password, no default credentials), remote access off
(Orthanc then answers loopback clients only; it has no bind-address option), the DICOM
server, WebDAV, Orthanc Explorer and WADO-URI off, DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at
``/dicom-web/``. Storage, index, log and the password file live in the temporary directory,
which :meth:`OrthancProcess.stop` removes.

``tests/harness.py`` re-exports :class:`OrthancProcess`; ``scripts/pacs.py`` (``make pacs``)
runs one in the foreground.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Iterable

from bench.harness import free_ports, wait_for

__all__ = ["DICOMWEB_PLUGIN", "SETUP_HINT", "OrthancMissing", "OrthancProcess", "orthanc_binary"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SETUP_HINT = ("run `make dicom-tools` (scripts/bootstrap_dicom_tools.sh: Debian's orthanc and orthanc-dicomweb "
              "with apt-get, as root)")


class OrthancMissing(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed."""


def orthanc_binary() -> str:
    """Path of the ``Orthanc`` binary; :class:`OrthancMissing` when it or the plugin is missing."""
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                              if os.access(p, os.X_OK)), None)
    if binary is None:
        raise OrthancMissing(f"Orthanc is not installed: {SETUP_HINT}")
    if not DICOMWEB_PLUGIN.is_file():
        raise OrthancMissing(f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed: {SETUP_HINT}")
    return binary


class OrthancProcess:
    """``Orthanc CONFIG.json`` on 127.0.0.1, DICOMweb at :attr:`url`, basic auth required.

    Attributes once started: :attr:`url` (the DICOMweb root, ``http://127.0.0.1:PORT/dicom-web``,
    what ``--pacs-url`` takes), :attr:`http_url` (Orthanc's REST root), :attr:`username`,
    :attr:`password`, :attr:`password_file` (mode 0600, for ``--pacs-password-file``),
    :attr:`pid`. A context manager: ``with OrthancProcess() as pacs: ...`` starts and stops it.
    """

    def __init__(self, parent: Path | None = None, username: str = "medseg", http_port: int = 0,
                 **options: object) -> None:
        """``parent``: where the temporary directory goes (default: the system's); ``http_port``:
        0 picks a free one; ``options``: more Orthanc configuration options (e.g.
        ``LimitFindInstances=5``), over the defaults."""
        self.options = dict(options)
        self._fixed_port = http_port
        self.tmp = Path(tempfile.mkdtemp(prefix="orthanc-", dir=parent))  # mode 0700
        self.username = username
        self.password = secrets.token_urlsafe(24)
        self.password_file = self.tmp / "pacs-password"
        self.config_path = self.tmp / "orthanc.json"
        self.log_dir = self.tmp / "log"
        self.log_dir.mkdir()
        self.http_port = 0
        self.proc: subprocess.Popen | None = None
        self._write_password_file()

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        """The DICOMweb root (no trailing slash), as ``--pacs-url`` takes it."""
        return f"{self.http_url}/dicom-web"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("Orthanc is not started")
        return self.proc.pid

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict:
        return {
            "Name": "medseg-test-pacs",
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomServerEnabled": False,
            "WebDavEnabled": False,
            "OrthancExplorerEnabled": False,
            "HttpDescribeErrors": True,
            "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            **self.options,
        }

    def _write_config(self) -> None:
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(), f, indent=2)

    def _write_password_file(self) -> None:
        """Replace the password file atomically (as a Kubernetes Secret update does), mode 0600,
        with a trailing newline as ``echo`` or an editor leaves it (the gateway strips it)."""
        staged = self.password_file.with_suffix(".new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        os.replace(staged, self.password_file)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0, bind_attempts: int = 3) -> "OrthancProcess":
        """Start Orthanc and wait until ``/system`` answers with the credentials and refuses
        without them. A port taken by another process first (it is picked free, not held)
        gets fresh ports, ``bind_attempts`` in all; a failed start kills what it started."""
        binary = orthanc_binary()
        attempts = 1 if self._fixed_port else bind_attempts
        for attempt in range(1, attempts + 1):
            (self.http_port,) = (self._fixed_port,) if self._fixed_port else free_ports(1)
            self._write_config()
            log_file = self.log_dir / f"orthanc-{attempt}.log"
            with (self.log_dir / "stderr.log").open("ab") as err:
                self.proc = subprocess.Popen([binary, f"--logfile={log_file}", str(self.config_path)], cwd=self.tmp,
                                             stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: self._answers(log_file), timeout, "Orthanc's /system", interval=0.1)
            except _BindFailed:
                if attempt == attempts:
                    raise RuntimeError(f"Orthanc could not bind port {self.http_port} (attempt {attempt}): it is "
                                       f"in use\n{self.log()}") from None
                continue
            except BaseException:
                self.kill()
                raise
            return self
        raise AssertionError("unreachable")

    def _answers(self, log_file: Path) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            if "already in use" in text:  # "The TCP port of the HTTP server is privileged or already in use"
                raise _BindFailed()
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
        if self._status("/system", auth=True) != 200:
            return False
        status = self._status("/system", auth=False)
        if status != 401:
            self.kill()
            raise RuntimeError(f"Orthanc answered {status} to /system without credentials (expected 401): "
                               "authentication is not enforced")
        return True

    def _status(self, path: str, auth: bool, method: str = "GET") -> int:
        request = urllib.request.Request(self.http_url + path, method=method)
        if auth:
            request.add_header("Authorization", self.basic_auth_header())
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def basic_auth_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def rotate_password(self, timeout: float = 30.0) -> str:
        """A new random password for the one user: Orthanc reloads its configuration (POST
        ``/tools/reset``, same port, same data), then the password file is replaced. Returns
        the old password (now refused)."""
        old = self.password
        old_header = self.basic_auth_header()
        self.password = secrets.token_urlsafe(24)
        self._write_config()
        request = urllib.request.Request(self.http_url + "/tools/reset", method="POST", data=b"")
        request.add_header("Authorization", old_header)
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except OSError:
            pass  # the reset may drop the connection that asked for it
        wait_for(lambda: self._status("/system", auth=True) == 200, timeout, "Orthanc back after /tools/reset",
                 interval=0.1)
        self._write_password_file()
        return old

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log"))]
        return "\n".join(parts)[-4000:]

    def kill(self) -> None:
        """SIGKILL by PID and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM by PID, SIGKILL after ``timeout`` s; then the temporary directory goes."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "OrthancProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ DICOMweb helpers
    @contextlib.contextmanager
    def dicomweb_client(self):
        """A ``dicomweb_client.DICOMwebClient`` on :attr:`url` with a ``requests`` session
        carrying basic auth (no retries, no proxies from the environment); closed on exit."""
        import requests
        from dicomweb_client import DICOMwebClient

        with requests.Session() as session:
            session.trust_env = False
            session.auth = (self.username, self.password)
            client = DICOMwebClient(self.url, session=session, timeout=(10, 60))
            client.set_http_retry_params(retry=False)
            yield client

    def stow(self, instances: Iterable[Path | str | bytes]) -> int:
        """STOW-RS the DICOM files (paths, or Part 10 bytes) into the PACS; returns how many
        it stored. Raises ``RuntimeError`` when the PACS reports a failed instance."""
        import pydicom

        datasets = []
        for item in instances:
            data = item if isinstance(item, (bytes, bytearray)) else Path(item).read_bytes()
            datasets.append(pydicom.dcmread(BytesIO(data)))
        if not datasets:
            return 0
        with self.dicomweb_client() as client:
            reply = client.store_instances(datasets)
        failed = reply.get("FailedSOPSequence", [])
        if failed:
            reasons = sorted({int(item.get("FailureReason", 0)) for item in failed})
            raise RuntimeError(f"Orthanc refused {len(failed)} of {len(datasets)} instances (reasons {reasons})")
        return len(reply.get("ReferencedSOPSequence", []))

    def qido_series(self, study_uid: str) -> list:
        """QIDO-RS: the series of ``study_uid`` as ``pydicom.Dataset`` s (SeriesInstanceUID,
        Modality, SeriesDescription, NumberOfSeriesRelatedInstances, ...); [] for none."""
        import pydicom
        import requests

        with self.dicomweb_client() as client:
            try:
                found = client.search_for_series(study_instance_uid=study_uid)
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code == 404:
                    return []
                raise
        return [pydicom.Dataset.from_json(item) for item in found]


class _BindFailed(Exception):
    """Orthanc exited because its port was already in use."""
