"""Client-side transport security: TLS / mutual-TLS channel credentials and the loopback rule."""

from __future__ import annotations

from pathlib import Path

import grpc

from medseg_client.loopback import is_loopback


def is_loopback_target(target: str) -> bool:
    """True when ``target`` (``host:port``, ``[v6]:port``, ``ipv4:``/``dns:`` forms) names this machine."""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    if target.startswith("unix:"):
        return True
    if target.startswith("["):
        host = target[1:target.find("]")] if "]" in target else target
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target  # a bare v6 literal or a host without a port
    return is_loopback(host)


def tls_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                    key_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    ``ca_file``: CA bundle the server certificate must chain to (default: the system's trust
    store). ``cert_file`` + ``key_file``: this client's certificate and key, for servers that
    require mutual TLS. Raises :class:`ValueError` when only one of them is given and
    :class:`OSError` when a file cannot be read.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")
    root = Path(ca_file).read_bytes() if ca_file else None
    chain = Path(cert_file).read_bytes() if cert_file else None
    key = Path(key_file).read_bytes() if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
