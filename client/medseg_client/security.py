"""Client-side transport security: TLS / mutual-TLS channel credentials and the loopback rule."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import grpc

from medseg_client.loopback import is_loopback

# gRPC name-resolver schemes this rule understands; any other scheme (xds:, vsock:, a custom
# resolver...) is not known to stay on this machine, so it never counts as loopback.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_LOCAL_SOCKET_SCHEMES = ("unix", "unix-abstract")
_ADDRESS_LIST_SCHEMES = ("ipv4", "ipv6")


def _host(address: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare v6 literal is a
    host); ``""`` (never loopback) when the brackets are malformed."""
    if address.startswith("["):
        end = address.find("]")
        tail = address[end + 1:] if end > 0 else "?"
        return address[1:end] if tail == "" or tail.startswith(":") else ""
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def target_addresses(target: str) -> list[str] | None:
    """The hosts a gRPC channel ``target`` may connect to, as gRPC reads it, or ``None`` for a
    local socket (``unix:``, ``unix-abstract:``).

    Forms: ``host[:port]``, ``[v6][:port]``, ``dns:[//authority/]host[:port]``,
    ``ipv4:addr[:port][,addr[:port]...]``, ``ipv6:[addr][:port][,...]``. Like gRPC, the
    address part is percent-decoded and the ``ipv4:``/``ipv6:`` lists are split at commas. A
    form it does not understand yields ``[""]`` (a host that is never loopback)."""
    target = target.strip()
    match = _SCHEME.match(target)
    scheme = match.group(1).lower() if match else ""
    if scheme in _LOCAL_SOCKET_SCHEMES:
        return None
    if scheme in _ADDRESS_LIST_SCHEMES:
        rest = unquote(match.group(2))
        return [_host(part.strip()) for part in rest.split(",")]
    if scheme == "dns":
        rest = match.group(2)
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if authority or not slash:  # a DNS server of the client's choosing may say anything
                return [""]
        rest = unquote(rest)
        return [_host(rest)] if "," not in rest else [""]
    if match and not _looks_like_host_port(target):
        return [""]  # another resolver scheme (xds:, vsock:, ...): not known to be local
    # no scheme: gRPC resolves it as dns:///target
    return [_host(unquote(target))] if "," not in target else [""]


def _looks_like_host_port(target: str) -> bool:
    """``localhost:50051``, ``127.0.0.1:1``, ``::1``: a host and a port, not ``scheme:rest``."""
    port = target.partition(":")[2]
    return port.isdigit() or target.count(":") > 1 and "/" not in target


def is_loopback_target(target: str) -> bool:
    """True only when every address ``target`` can reach is on this machine (see
    :func:`target_addresses`): a list such as ``ipv6:[::1]:50051,[2001:db8::1]:443`` is not
    loopback, because gRPC may connect to its second address in plaintext."""
    hosts = target_addresses(target)
    if hosts is None:
        return True
    return bool(hosts) and all(host and is_loopback(host) for host in hosts)


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
