"""A real gateway process with TLS, mutual TLS, static and JWT bearer tokens, a plaintext
health-only port, certificate rotation without a restart, and the start-up refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medseg_client import SegmentationClient, image_from_array, image_from_file, tls_credentials
from medseg_client.__main__ import main as cli
from tests.harness import REPO, GatewayProcess, wait_for
from tests.pki import CertificateAuthority, Issuer, tokens_line

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN, OTHER_MODEL_TOKEN = "pacs-token-5b1e0c6f9d", "limited-token-77aa01"
IMAGE = image_from_array(np.random.default_rng(4).integers(0, 255, (64, 72), dtype=np.uint8))
BOX = [(8, 8, 50, 40)]


class SecureGateway(GatewayProcess):
    """A gateway whose gRPC port speaks TLS: health is read on its plaintext health port."""

    health_port = 0

    def start(self, timeout: float = 60.0) -> "SecureGateway":
        super().start(timeout)
        self.health_port = json.loads(self.port_file.read_text())["health"]
        return self

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return health_pb2.HealthCheckResponse.UNKNOWN


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    first, second = CertificateAuthority("server CA 1"), CertificateAuthority("server CA 2")
    clients = CertificateAuthority("client CA")
    files = {"ca1": first.write(folder / "ca1.crt"), "ca2": second.write(folder / "ca2.crt"),
             "client_ca": clients.write(folder / "client-ca.crt"), "folder": folder}
    (folder / "both.crt").write_bytes(first.pem + second.pem)
    files["both"] = folder / "both.crt"
    files["server_crt"], files["server_key"] = first.issue("gw.test", server=True).write(folder / "live", "tls")
    files["next"] = second.issue("gw.test", server=True)
    files["client_crt"], files["client_key"] = clients.issue("pacs01", server=False).write(folder, "client")
    issuer = Issuer()
    files["jwks"] = issuer.write_jwks(folder / "jwks.json")
    tokens = folder / "tokens"
    tokens.write_text(f"{tokens_line(TOKEN, 'pacs-router', '*')}\n"
                      f"{tokens_line(OTHER_MODEL_TOKEN, 'limited', 'some_other_model')}\n")
    files["tokens"] = tokens
    return files, issuer


@pytest.fixture(scope="module")
def secure_gateway(model_repository, pki, tmp_path_factory):
    files, issuer = pki
    gw = SecureGateway(tmp_path_factory.mktemp("secure-gw"), "--backend", "embedded",
                       "--tls-cert-file", str(files["server_crt"]), "--tls-key-file", str(files["server_key"]),
                       "--tls-client-ca-file", str(files["client_ca"]),
                       "--auth-tokens-file", str(files["tokens"]), "--auth-jwks-file", str(files["jwks"]),
                       "--auth-jwt-issuer", issuer.issuer, "--auth-jwt-audience", issuer.audience,
                       "--health-port", "0", "--default-model", "medsam_lite")  # a JWT below allows only it
    gw.start().wait_serving()
    yield gw
    gw.stop()


def _client(gw, files, *, ca="both", client_cert=True, token=TOKEN) -> SegmentationClient:
    creds = tls_credentials(files[ca], files["client_crt"] if client_cert else None,
                            files["client_key"] if client_cert else None)
    return SegmentationClient(gw.target, credentials=creds, token=token, timeout=60)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_segment_over_mutual_tls_with_a_static_token(secure_gateway, pki, shared_data):
    files, _ = pki
    with _client(secure_gateway, files) as client:
        result = client.segment(image=image_from_file(shared_data / "dicom" / "CT_small.dcm"),
                                boxes=[(30, 30, 100, 100)])
    assert result.masks[0].shape == (128, 128) and result.masks[0].any()


def test_segment_with_a_jwt_and_expired_or_missing_tokens_fail(secure_gateway, pki):
    files, issuer = pki
    with _client(secure_gateway, files, token=issuer.token("dr-viewer", ["medsam_lite"])) as client:
        assert len(client.segment(image=IMAGE, boxes=BOX).masks) == 1
    with _client(secure_gateway, files, token=issuer.token("dr-viewer", ttl_s=-600)) as client:
        assert _code(lambda: client.segment(image=IMAGE, boxes=BOX)) == grpc.StatusCode.UNAUTHENTICATED
    with _client(secure_gateway, files, token=None) as client:
        assert _code(lambda: client.list_models()) == grpc.StatusCode.UNAUTHENTICATED
    with _client(secure_gateway, files, token=OTHER_MODEL_TOKEN) as client:
        assert _code(lambda: client.segment(image=IMAGE, boxes=BOX)) == grpc.StatusCode.PERMISSION_DENIED
        assert client.list_models() == []
    log = secure_gateway.log()
    assert '"caller": "dr-viewer", "auth": "jwt", "client_cert": "pacs01"' in log
    assert '"status": "PERMISSION_DENIED"' in log
    assert TOKEN not in log and OTHER_MODEL_TOKEN not in log and "eyJ" not in log  # no token, no JWT


def test_clients_without_a_valid_client_certificate_or_tls_are_refused(secure_gateway, pki):
    files, _ = pki
    with _client(secure_gateway, files, client_cert=False) as client:
        assert _code(lambda: client.list_models()) == grpc.StatusCode.UNAVAILABLE
    with SegmentationClient(secure_gateway.target, token=TOKEN, timeout=5) as plaintext:
        assert _code(lambda: plaintext.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_health_is_plaintext_on_the_health_port_and_tokenless_on_the_tls_port(secure_gateway, pki):
    files, _ = pki
    assert secure_gateway.health() == SERVING and secure_gateway.health("medseg.v1.Segmentation") == SERVING
    creds = tls_credentials(files["both"], files["client_crt"], files["client_key"])
    with grpc.secure_channel(secure_gateway.target, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == SERVING
    with grpc.insecure_channel(f"127.0.0.1:{secure_gateway.health_port}") as channel:
        segment = channel.unary_unary("/medseg.v1.Segmentation/ListModels")
        with pytest.raises(grpc.RpcError) as info:
            segment(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the health port serves nothing else


def test_cached_images_and_their_ids_belong_to_the_caller_that_sent_them(secure_gateway, pki):
    """Tenant isolation (issue 14, finding 9): the same image from two callers. B learns nothing
    from A's upload (cached = false), cannot use A's image_id (NOT_FOUND), and A's own
    follow-ups still hit A's entry."""
    files, issuer = pki
    image = image_from_array(np.random.default_rng(14).integers(0, 255, (56, 60), dtype=np.uint8))
    model = "medsam_lite"
    with _client(secure_gateway, files) as a, \
            _client(secure_gateway, files, token=issuer.token("dr-viewer", [model])) as b:
        first = a.embed(image, model=model)
        again = a.embed(image, model=model)
        by_b = b.embed(image, model=model)
        assert not first.cached and again.cached and again.image_id == first.image_id
        assert not by_b.cached and by_b.image_id != first.image_id
        assert _code(lambda: b.segment(image_id=first.image_id, boxes=BOX, model=model)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: a.segment(image_id=by_b.image_id, boxes=BOX, model=model)) == grpc.StatusCode.NOT_FOUND
        follow_up = a.segment(image_id=first.image_id, boxes=BOX, model=model)  # A's own id: a cache hit
        assert follow_up.image_id == first.image_id and follow_up.masks[0].shape == (56, 60)
        assert a.segment(image=image, boxes=BOX, model=model).image_id == first.image_id  # same id again
    assert len(first.image_id) == 32


def test_cli_segments_over_mutual_tls_with_a_token_file(secure_gateway, pki, tmp_path, shared_data, capsys):
    files, _ = pki
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    rc = cli(["segment", "--server", secure_gateway.target, "--ca-file", str(files["both"]),
              "--cert-file", str(files["client_crt"]), "--key-file", str(files["client_key"]),
              "--token-file", str(token_file), "--image", str(shared_data / "dicom" / "MR_small.dcm"),
              "--box", "10", "10", "50", "50", "--out", str(tmp_path / "mask.png")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "mask.png").is_file()


def test_server_certificate_is_rotated_without_a_restart(secure_gateway, pki):
    """Last in this module: swaps the served certificate from CA 1's to CA 2's."""
    files, _ = pki
    pid = secure_gateway.proc.pid
    with _client(secure_gateway, files, ca="ca2") as only_ca2:
        assert _code(lambda: only_ca2.list_models()) == grpc.StatusCode.UNAVAILABLE
    # a broken update is noticed (on a new handshake) and ignored: CA 1's certificate stays in force
    Path(files["server_crt"]).write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")

    def broken_update_rejected_and_ca1_still_served() -> bool:
        with _client(secure_gateway, files, ca="ca1") as only_ca1:
            assert _code(lambda: only_ca1.list_models()) == grpc.StatusCode.OK
        return "cannot be used; still serving the previous certificate" in secure_gateway.log()

    wait_for(broken_update_rejected_and_ca1_still_served, 15, "the broken update to be rejected", interval=0.3)
    files["next"].write(Path(files["server_crt"]).parent, "tls")

    def ca2_accepted() -> bool:
        with _client(secure_gateway, files, ca="ca2") as client:
            return _code(lambda: client.list_models()) == grpc.StatusCode.OK

    wait_for(ca2_accepted, 15, "the rotated certificate to be served", interval=0.3)
    with _client(secure_gateway, files, ca="ca1") as only_ca1:
        assert _code(lambda: only_ca1.list_models()) == grpc.StatusCode.UNAVAILABLE
    assert secure_gateway.proc.pid == pid and secure_gateway.proc.poll() is None
    assert "TLS certificate reloaded" in secure_gateway.log()


@pytest.mark.parametrize("extra,message", [
    ([], "refusing plaintext gRPC on 0.0.0.0"),
    (["--tls-cert-file", "/nonexistent/tls.crt", "--tls-key-file", "/nonexistent/tls.key"], "does not exist"),
])
def test_unsafe_or_broken_security_settings_are_clear_startup_errors(model_repository, extra, message):
    done = subprocess.run([sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0",
                           "--model-repository", str(model_repository), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_unauthenticated_access_off_loopback_is_refused_even_with_tls(model_repository, pki):
    files, _ = pki
    done = subprocess.run([sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0",
                           "--model-repository", str(model_repository), "--tls-cert-file", str(files["server_crt"]),
                           "--tls-key-file", str(files["server_key"])],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing unauthenticated gRPC" in done.stderr, done.stderr
