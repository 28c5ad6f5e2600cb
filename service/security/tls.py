"""Transport security of the gateway's gRPC port: TLS, mutual TLS, certificate reload.

Policy (checked at start-up by :func:`check_exposure`): a listener on a non-loopback
address serves TLS, unless ``--insecure`` explicitly asks for plaintext (local development).
Plaintext on 127.0.0.1 / ::1 / localhost is allowed without the flag (the quick start and
the tests), with a warning in the log.

Certificates are PEM files (``--tls-cert-file`` chain, ``--tls-key-file``); a
``--tls-client-ca-file`` turns on mutual TLS (a client certificate chaining to that CA is
required). gRPC calls our certificate fetcher on every TLS handshake; it re-reads the files
when they change (at most once a second), checks them and swaps them in, so a rotated
certificate (cert-manager, a Kubernetes Secret update) is served without a restart. A broken
or expired replacement is logged and ignored: the previous certificate stays in force.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from service.core.errors import StartupError
from medseg_client.loopback import is_loopback
from service.settings import Settings
from service.security.watched_file import WatchedFiles

log = logging.getLogger(__name__)
EXPIRY_WARNING = dt.timedelta(days=14)


def tls_enabled(settings: Settings) -> bool:
    return bool(settings.tls_cert_file and settings.tls_key_file)


def check_exposure(settings: Settings) -> None:
    """Refuse to serve plaintext on a non-loopback address unless ``--insecure`` says so."""
    if tls_enabled(settings):
        return
    if is_loopback(settings.host):
        log.warning("gRPC on %s is plaintext (loopback only); set MEDSEG_TLS_CERT_FILE and "
                    "MEDSEG_TLS_KEY_FILE to serve TLS", settings.host)
        return
    if not settings.insecure:
        raise StartupError(f"refusing plaintext gRPC on {settings.host}: set --tls-cert-file and --tls-key-file "
                           "(MEDSEG_TLS_CERT_FILE, MEDSEG_TLS_KEY_FILE), or pass --insecure for local development")
    log.warning("INSECURE: plaintext gRPC on %s (--insecure); never use this on a hospital network", settings.host)


@dataclass(frozen=True)
class TlsMaterial:
    """Checked PEM bytes: ``chain`` (leaf first), ``key`` matching the leaf, optional ``client_ca``."""

    chain: bytes
    key: bytes
    client_ca: bytes | None
    subject: str
    not_after: dt.datetime

    def server_config(self):
        return grpc.ssl_server_certificate_configuration([(self.key, self.chain)], root_certificates=self.client_ca)


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_material(contents: list[bytes], now: dt.datetime | None = None) -> TlsMaterial:
    """Check ``[chain, key]`` or ``[chain, key, client_ca]`` PEM bytes; ``ValueError`` says what is wrong."""
    chain_pem, key_pem = contents[0], contents[1]
    client_ca = contents[2] if len(contents) > 2 else None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ValueError("the TLS certificate file holds no valid PEM certificate") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise ValueError("the TLS key file holds no valid unencrypted PEM private key") from exc
    leaf = chain[0]
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise ValueError("the TLS key does not belong to the certificate (first certificate of the chain)")
    now = now or dt.datetime.now(dt.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ValueError(f"the TLS certificate expired on {leaf.not_valid_after_utc.isoformat()}")
    if leaf.not_valid_before_utc > now:
        raise ValueError(f"the TLS certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    if client_ca is not None:
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as exc:
            raise ValueError("the client CA file holds no valid PEM certificate") from exc
    return TlsMaterial(chain_pem, key_pem, client_ca, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)


def _describe(material: TlsMaterial) -> str:
    left = material.not_after - dt.datetime.now(dt.timezone.utc)
    if left < EXPIRY_WARNING:
        log.warning("the TLS certificate %s expires in %s", material.subject, left)
    return f"{material.subject}, valid until {material.not_after:%Y-%m-%d %H:%M} UTC"


class ReloadingCredentials:
    """``grpc.ServerCredentials`` whose certificate (and client CA) follow the files."""

    def __init__(self, settings: Settings) -> None:
        paths = [Path(settings.tls_cert_file), Path(settings.tls_key_file)]
        if settings.tls_client_ca_file:
            paths.append(Path(settings.tls_client_ca_file))
        for path in paths:
            if not path.is_file():
                raise StartupError(f"TLS file {path} does not exist or is not a file")
        self.mutual = bool(settings.tls_client_ca_file)
        try:
            self.files = WatchedFiles(paths, parse_material, on_error=self._rejected)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot use the TLS files ({', '.join(map(str, paths))}): {exc}") from exc
        log.info("TLS on the gRPC port%s: %s", " with client certificates required (mutual TLS)" if self.mutual else "",
                 _describe(self.files.value))
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self.files.value.server_config(), self._fetch, require_client_authentication=self.mutual)

    @staticmethod
    def _rejected(exc: Exception) -> None:
        log.error("the TLS files changed but cannot be used; still serving the previous certificate: %s", exc)

    def _fetch(self):
        """gRPC's certificate fetcher (runs on every handshake, in a gRPC thread): None = unchanged."""
        try:
            if self.files.refresh():
                log.info("TLS certificate reloaded: %s", _describe(self.files.value))
                return self.files.value.server_config()
        except Exception:  # noqa: BLE001 - a fetcher that raises would fail the handshake
            log.exception("TLS certificate check failed; keeping the current certificate")
        return None


def peer_common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's common name under mutual TLS, else ``None``."""
    try:
        values = (context.auth_context() or {}).get("x509_common_name")
    except Exception:  # noqa: BLE001 - auth context is best-effort metadata for the audit line
        return None
    if not values:
        return None
    return values[0].decode("utf-8", "replace")[:128]
