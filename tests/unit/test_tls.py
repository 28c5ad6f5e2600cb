"""TLS material checks, the plaintext exposure rule, and reloading files."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from medseg_client.security import is_loopback_target
from service.core.errors import StartupError
from service.settings import Settings
from service.security.tls import ReloadingCredentials, check_exposure, is_loopback, parse_material
from service.security.watched_file import WatchedFiles
from tests.pki import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def test_matching_chain_and_key_parse(ca):
    server = ca.issue("gw.test", server=True)
    material = parse_material([server.cert, server.key, ca.pem])
    assert "gw.test" in material.subject and material.client_ca == ca.pem


def test_key_of_another_certificate_is_rejected(ca):
    a, b = ca.issue("a", server=True), ca.issue("b", server=True)
    with pytest.raises(ValueError, match="does not belong"):
        parse_material([a.cert, b.key])


def test_expired_and_not_yet_valid_certificates_are_rejected(ca):
    old = ca.issue("old", server=True, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    with pytest.raises(ValueError, match="expired"):
        parse_material([old.cert, old.key])
    future = ca.issue("future", server=True, not_before=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    with pytest.raises(ValueError, match="not valid before"):
        parse_material([future.cert, future.key])


@pytest.mark.parametrize("which", [0, 1, 2])
def test_garbage_pem_is_rejected_with_the_file_named(ca, which):
    server = ca.issue("gw", server=True)
    contents = [server.cert, server.key, ca.pem]
    contents[which] = b"-----BEGIN NOTHING-----\nxx\n"
    with pytest.raises(ValueError, match=("certificate file", "key file", "client CA")[which]):
        parse_material(contents)


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("10.0.0.1", False), ("gateway.example", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("target,loopback", [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:5", True),
                                             ("ipv4:127.0.0.1:9", True), ("dns:///localhost:9", True),
                                             ("10.1.1.1:443", False), ("seg.hospital.example:443", False),
                                             ("[2001:db8::1]:443", False)])
def test_client_loopback_targets(target, loopback):
    assert is_loopback_target(target) is loopback


def test_plaintext_is_refused_off_loopback_unless_insecure():
    check_exposure(Settings(host="127.0.0.1"))
    with pytest.raises(StartupError, match="--insecure"):
        check_exposure(Settings(host="0.0.0.0"))
    check_exposure(Settings(host="0.0.0.0", insecure=True))
    check_exposure(Settings(host="0.0.0.0", tls_cert_file="c", tls_key_file="k"))


def test_settings_reject_half_a_tls_configuration():
    for argv in (["--tls-cert-file", "c"], ["--tls-key-file", "k"], ["--tls-client-ca-file", "ca"]):
        with pytest.raises(SystemExit):
            Settings.from_args(argv, environ={})


def test_missing_tls_files_are_startup_errors(tmp_path, ca):
    server = ca.issue("gw", server=True)
    cert, key = server.write(tmp_path, "server")
    with pytest.raises(StartupError, match="does not exist"):
        ReloadingCredentials(Settings(tls_cert_file=str(cert), tls_key_file=str(tmp_path / "missing.key")))
    other = ca.issue("other", server=True)
    _, wrong_key = other.write(tmp_path, "other")
    with pytest.raises(StartupError, match="does not belong"):
        ReloadingCredentials(Settings(tls_cert_file=str(cert), tls_key_file=str(wrong_key)))
    creds = ReloadingCredentials(Settings(tls_cert_file=str(cert), tls_key_file=str(key),
                                          tls_client_ca_file=str(ca.write(tmp_path / "ca.crt"))))
    assert creds.mutual and creds.credentials is not None


def _touch_later(path: Path, seconds: int) -> None:
    later = time.time_ns() + seconds * 10**9
    os.utime(path, ns=(later, later))


def test_watched_files_reload_on_change_and_keep_the_last_good_value(tmp_path):
    path = tmp_path / "value"
    path.write_text("1")
    errors: list[Exception] = []

    def parse(contents: list[bytes]) -> int:
        return int(contents[0])  # ValueError for non-numbers

    watched = WatchedFiles([path], parse, on_error=errors.append, min_interval_s=0.0)
    assert watched.get() == 1 and not watched.refresh()
    path.write_text("22")
    _touch_later(path, 1)
    assert watched.get() == 22 and watched.generation == 1
    path.write_text("not a number")
    _touch_later(path, 2)
    assert watched.get() == 22 and len(errors) == 1
    assert watched.get() == 22 and len(errors) == 1  # a bad version is reported once
    path.unlink()
    assert watched.get() == 22  # a file gone for a moment keeps the value
    path.write_text("3")
    _touch_later(path, 3)
    assert watched.get() == 3


def test_watched_files_check_at_most_once_per_interval(tmp_path):
    path = tmp_path / "value"
    path.write_text("1")
    now = [0.0]
    watched = WatchedFiles([path], lambda c: int(c[0]), clock=lambda: now[0], min_interval_s=1.0)
    path.write_text("2")
    _touch_later(path, 1)
    now[0] = 0.5
    assert watched.get() == 1
    now[0] = 1.5
    assert watched.get() == 2
