"""Throw-away certificates, keys, JWKS and tokens for the security tests.

Everything is generated at test time with ``cryptography`` (no private key is committed):
a CA, server certificates for ``localhost``/``127.0.0.1``, client certificates, EC/RSA
signing keys with their public JWKS, and signed JWTs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.security.auth import token_digest

UTC = dt.timezone.utc


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    cert: bytes  # PEM
    key: bytes   # PEM (PKCS#8, unencrypted)
    name: str

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        key.chmod(0o600)
        return cert, key


class CertificateAuthority:
    def __init__(self, name: str = "medseg test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(UTC)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return _pem_cert(self.cert)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def issue(self, common_name: str, *, server: bool, valid_days: float = 1.0,
              not_before: dt.datetime | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(UTC)
        start = not_before or now - dt.timedelta(minutes=5)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + dt.timedelta(days=valid_days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.DNSName(common_name),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(_pem_cert(cert), _pem_key(key), common_name)


# --------------------------------------------------------------------------- tokens
def tokens_line(token: str, caller: str, models: str) -> str:
    return f"sha256:{token_digest(token).hex()} {caller} {models}"


class Issuer:
    """A JWT issuer with one EC (ES256) and one RSA (RS256) signing key."""

    def __init__(self, issuer: str = "https://idp.test", audience: str = "medseg") -> None:
        self.issuer, self.audience = issuer, audience
        self.keys = {"ec-1": ec.generate_private_key(ec.SECP256R1()),
                     "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}

    def jwks(self) -> dict:
        keys = []
        for kid, key in self.keys.items():
            alg = "ES256" if kid.startswith("ec") else "RS256"
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        return {"keys": keys}

    def write_jwks(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, sub: str = "viewer-1", models: list[str] | str | None = ("medsam_lite",), *,
              kid: str = "ec-1", ttl_s: float = 300.0, **overrides) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": sub, "iat": now, "exp": now + int(ttl_s)}
        if models is not None:
            claims["medseg_models"] = list(models) if not isinstance(models, str) else models
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        alg = "ES256" if kid.startswith("ec") else "RS256"
        return jwt.encode(claims, self.keys[kid], algorithm=alg, headers={"kid": kid})
