"""Client SDK and CLI security options: TLS, mutual TLS, bearer tokens, the plaintext rule."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client import SegmentationClient, tls_credentials
from medseg_client.__main__ import main
from medseg_client.security import is_loopback_target
from tests.pki import CertificateAuthority


class Recorder(pb_grpc.SegmentationServicer):
    def __init__(self) -> None:
        self.metadata: list[dict] = []

    def ListModels(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="medsam_lite", version="1", input_size=256)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    server = ca.issue("gw.test", server=True)
    client = ca.issue("pacs01", server=False)
    stranger = CertificateAuthority("someone else").issue("intruder", server=False)
    files = {"ca": ca.write(folder / "ca.crt")}
    files["server_crt"], files["server_key"] = server.write(folder, "server")
    files["client_crt"], files["client_key"] = client.write(folder, "client")
    files["stranger_crt"], files["stranger_key"] = stranger.write(folder, "stranger")
    return ca, server, files


def _start(credentials: grpc.ServerCredentials | None):
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SegmentationServicer_to_server(recorder, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, f"127.0.0.1:{port}", recorder


@pytest.fixture
def mtls_server(pki):
    ca, server_cert, _ = pki
    creds = grpc.ssl_server_credentials([(server_cert.key, server_cert.cert)], root_certificates=ca.pem,
                                        require_client_auth=True)
    server, target, recorder = _start(creds)
    yield target, recorder
    server.stop(None)


@pytest.fixture
def plain_server():
    server, target, recorder = _start(None)
    yield target, recorder
    server.stop(None)


def test_token_is_sent_as_bearer_metadata_on_every_call(plain_server):
    target, recorder = plain_server
    with SegmentationClient(target, token="abc.def") as client:
        client.list_models()
        client.list_models()
    assert [m["authorization"] for m in recorder.metadata] == ["Bearer abc.def"] * 2


def test_mutual_tls_with_a_client_certificate_and_token(pki, mtls_server):
    _, _, files = pki
    target, recorder = mtls_server
    creds = tls_credentials(files["ca"], files["client_crt"], files["client_key"])
    with SegmentationClient(target, credentials=creds, token="t0k", timeout=10) as client:
        assert client.secure and client.list_models()[0].name == "medsam_lite"
    assert recorder.metadata[-1]["authorization"] == "Bearer t0k"


@pytest.mark.parametrize("client_cert", [None, "stranger"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(pki, mtls_server, client_cert):
    _, _, files = pki
    target, _ = mtls_server
    creds = (tls_credentials(files["ca"]) if client_cert is None
             else tls_credentials(files["ca"], files["stranger_crt"], files["stranger_key"]))
    with SegmentationClient(target, credentials=creds, timeout=5) as client, pytest.raises(grpc.RpcError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_only_for_loopback_or_when_insecure_is_explicit():
    assert not SegmentationClient("127.0.0.1:1").secure
    assert not SegmentationClient("localhost:1").secure
    assert SegmentationClient("seg.hospital.example:443").secure          # TLS with system roots
    assert not SegmentationClient("10.0.0.5:50051", insecure=True).secure


LOOPBACK_TARGETS = ["127.0.0.1:50051", "localhost:50051", "localhost", "[::1]:50051", "::1", "127.0.0.9:1",
                    "dns:localhost:50051", "dns:///localhost:50051", "dns:///[::1]:50051", "ipv4:127.0.0.1:50051",
                    "ipv4:127.0.0.1:50051,127.0.0.2:50052", "ipv6:[::1]:50051", "ipv6:[::1]:50051,[::1]:50052",
                    "ipv6:::1", "unix:/run/medseg.sock", "unix:///run/medseg.sock", "unix-abstract:medseg"]
REMOTE_TARGETS = [
    "ipv6:[::1]:50051,[2001:db8::1]:443",            # the issue's case: the second address is remote
    "ipv4:127.0.0.1:50051,10.0.0.5:50051", "ipv4:10.0.0.5:50051,127.0.0.1:50051",
    "ipv4:127.0.0.1:50051, 192.0.2.7:443", "ipv4:127.0.0.1:50051,", "ipv4:",
    "ipv6:%5B::1%5D:1%2C%5B2001:db8::1%5D:443",      # percent-encoded comma: gRPC decodes it
    "ipv4:127.0.0.1%3A1%2C10.0.0.5%3A1",
    "dns://8.8.8.8/localhost:50051",                  # a DNS server of the client's choosing
    "dns:localhost:1,10.0.0.5:1", "localhost:1,10.0.0.5:1",
    "seg.hospital.example:443", "10.0.0.5:50051", "[2001:db8::1]:443", "2001:db8::1",
    "localhost.evil.example:1", "127.0.0.1.nip.io:1", "[::1]x:1", "[::1", "",
    "xds:///medseg", "vsock:2:50051", "passthrough:///10.0.0.5:1",
]


@pytest.mark.parametrize("target", LOOPBACK_TARGETS)
def test_loopback_targets_are_recognised_in_every_grpc_form(target):
    assert is_loopback_target(target)


@pytest.mark.parametrize("target", REMOTE_TARGETS)
def test_a_target_is_loopback_only_when_every_address_is(target):
    assert not is_loopback_target(target)
    with SegmentationClient(target, token="t0k") as client:
        assert client.secure  # TLS, so the token never goes out in plaintext


def test_tls_credentials_need_both_halves_of_a_client_certificate(pki):
    with pytest.raises(ValueError):
        tls_credentials(pki[2]["ca"], cert_file=pki[2]["client_crt"])


@pytest.mark.parametrize("token", ["", "two words"])
def test_malformed_tokens_are_refused_before_sending(token):
    with pytest.raises(ValueError):
        SegmentationClient("127.0.0.1:1", token=token)


def test_cli_models_over_mutual_tls_with_a_token_file(pki, mtls_server, tmp_path, capsys):
    _, _, files = pki
    target, recorder = mtls_server
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    rc = main(["models", "--server", target, "--ca-file", str(files["ca"]), "--cert-file", str(files["client_crt"]),
               "--key-file", str(files["client_key"]), "--token-file", str(token_file)])
    assert rc == 0 and "medsam_lite" in capsys.readouterr().out
    assert recorder.metadata[-1]["authorization"] == "Bearer from-a-file"


def test_cli_takes_the_token_from_the_environment(plain_server, monkeypatch, capsys):
    target, recorder = plain_server
    monkeypatch.setenv("MEDSEG_TOKEN", "from-env")
    assert main(["models", "--server", target]) == 0
    assert recorder.metadata[-1]["authorization"] == "Bearer from-env"


def test_cli_rejects_contradictory_security_flags(pki, capsys):
    files = pki[2]
    assert main(["models", "--server", "127.0.0.1:1", "--insecure", "--ca-file", str(files["ca"])]) == 2
    assert main(["models", "--server", "127.0.0.1:1", "--cert-file", str(files["client_crt"])]) == 2
    assert main(["models", "--server", "127.0.0.1:1", "--ca-file", str(Path("/nonexistent/ca.pem"))]) == 2
    assert "error:" in capsys.readouterr().err
