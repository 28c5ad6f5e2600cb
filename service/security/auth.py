"""Who is calling, and may they use this model: bearer tokens on every RPC.

Two kinds of bearer token, in the ``authorization: Bearer <token>`` metadata of each call:

* **Static tokens** (``--auth-tokens-file``, small sites). One line per caller::

      # sha256 of the token                                                   caller       models
      sha256:3f0c9c1e...(64 hex digits)                                        pacs-router  medsam_lite
      sha256:9a1b...                                                           research     *

  The file holds only SHA-256 digests, never tokens; ``python -m service.auth new-token
  CALLER MODELS`` prints a fresh token and its line. The presented token is hashed and
  compared with every line in constant time (``hmac.compare_digest``, no early exit).
* **JWT** (``--auth-jwks-file``, sites with an identity provider). Signature checked against
  the public keys of a JWKS file (asymmetric algorithms only: RS/PS/ES/EdDSA; ``none`` and
  HMAC are refused), ``iss`` and ``aud`` must match, ``exp`` is required, ``nbf``/``iat``
  are honoured, with ``--auth-jwt-leeway-s`` of clock skew. The caller is ``sub``; the models
  it may use are the ``--auth-jwt-models-claim`` claim (a list, or a space-separated string;
  ``*`` = all).

Both files are re-read when they change (revoking a token or rotating keys needs no restart).
Missing or bad credentials raise :class:`errors.Unauthenticated` (UNAUTHENTICATED); a model
outside the caller's allow list raises :class:`errors.PermissionDenied` (PERMISSION_DENIED),
also for model names that do not exist, so the allow list does not reveal what is served.
Tokens are never logged and never appear in error messages.

With neither file configured, authentication is off: allowed on a loopback address (the
quick start), refused at start-up elsewhere unless ``--insecure``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import jwt

from service.core import errors
from service.core.errors import StartupError
from service.settings import Settings
from medseg_client.loopback import is_loopback
from service.security.watched_file import WatchedFiles

log = logging.getLogger(__name__)
MAX_TOKEN_CHARS = 8192
_CALLER = re.compile(r"^[A-Za-z0-9._@:/+-]{1,128}$")
_MODEL = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")
# Asymmetric only: HMAC with a published key, or "none", would let anyone mint tokens.
JWT_ALGORITHMS = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
                  "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP"}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``models``: the model names it may use, ``None`` = all."""

    caller: str
    models: frozenset[str] | None
    scheme: str  # "token", "jwt", or "none" when authentication is off

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", None, "none")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _models(spec: Iterable[str]) -> frozenset[str] | None:
    names = [m for m in spec if m]
    if "*" in names:
        return None
    bad = [m for m in names if not _MODEL.match(m)]
    if bad:
        raise ValueError(f"invalid model name(s) {bad}")
    return frozenset(names)


# --------------------------------------------------------------------------- static tokens
def parse_tokens(text: str) -> list[tuple[bytes, Principal]]:
    """Lines ``sha256:<hex> <caller> <model,model|*>``; ``#`` starts a comment."""
    entries: list[tuple[bytes, Principal]] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"line {number}: expected 'sha256:<hex> <caller> <models>', got {len(parts)} fields")
        match = _DIGEST.match(parts[0])
        if not match:
            raise ValueError(f"line {number}: the first field must be sha256: and 64 lower-case hex digits "
                             "(the file holds token digests, never tokens)")
        if not _CALLER.match(parts[1]):
            raise ValueError(f"line {number}: caller names use letters, digits and ._@:/+- (1-128 characters)")
        digest = bytes.fromhex(match.group(1))
        if digest in seen:
            raise ValueError(f"line {number}: the same token digest appears twice")
        seen.add(digest)
        try:
            models = _models(parts[2].split(","))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from exc
        entries.append((digest, Principal(parts[1], models, "token")))
    return entries


class StaticTokens:
    def __init__(self, path: Path) -> None:
        self.files = WatchedFiles([path], lambda c: parse_tokens(c[0].decode("utf-8")),
                                  on_error=lambda exc: log.error("auth tokens file changed but is invalid; "
                                                                 "keeping the previous tokens: %s", exc))
        log.info("static bearer tokens: %d caller(s) from %s", len(self.files.value), path)

    def verify(self, token: str) -> Principal | None:
        """The caller whose digest matches ``token``, compared in constant time over all lines."""
        digest = token_digest(token)
        found = None
        for candidate, principal in self.files.get():
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found


# --------------------------------------------------------------------------- JWT
@dataclass(frozen=True)
class VerificationKey:
    jwk: jwt.PyJWK
    kty: str
    alg: str | None  # the JWK's own "alg" pin, if any


def parse_jwks(text: str) -> dict[str | None, VerificationKey]:
    """Public keys of a JWKS document by ``kid``; refuses symmetric and private keys."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JWKS file is not JSON (line {exc.lineno})") from exc
    raw_keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw_keys, list) or not raw_keys:
        raise ValueError('the JWKS file needs a non-empty "keys" list')
    keys: dict[str | None, VerificationKey] = {}
    for index, data in enumerate(raw_keys):
        if not isinstance(data, dict):
            raise ValueError(f"JWKS key {index} is not an object")
        if data.get("kty") not in ("RSA", "EC", "OKP"):
            raise ValueError(f"JWKS key {index}: kty must be RSA, EC or OKP (no symmetric keys)")
        if any(field in data for field in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ValueError(f"JWKS key {index} holds private key material; publish public keys only")
        if data.get("use", "sig") != "sig":
            continue
        alg = data.get("alg")
        if alg is not None and JWT_ALGORITHMS.get(alg) != data["kty"]:
            raise ValueError(f"JWKS key {index}: alg {alg!r} is not an allowed algorithm for kty {data['kty']}")
        try:
            key = jwt.PyJWK(data)
        except jwt.PyJWTError as exc:
            raise ValueError(f"JWKS key {index} cannot be used: {type(exc).__name__}") from exc
        kid = data.get("kid")
        if kid in keys:
            raise ValueError(f"JWKS key id {kid!r} appears twice")
        keys[kid] = VerificationKey(key, data["kty"], alg)
    if not keys:
        raise ValueError("the JWKS file has no signing keys")
    return keys


def _caller_from_subject(subject: object) -> str:
    text = str(subject)
    if _CALLER.match(text):
        return text
    return "sub-sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


class JwtVerifier:
    def __init__(self, path: Path, issuer: str, audience: str, leeway_s: float, models_claim: str) -> None:
        self.files = WatchedFiles([path], lambda c: parse_jwks(c[0].decode("utf-8")),
                                  on_error=lambda exc: log.error("JWKS file changed but is invalid; keeping the "
                                                                 "previous keys: %s", exc))
        self.issuer, self.audience, self.leeway, self.models_claim = issuer, audience, leeway_s, models_claim
        log.info("JWT bearer tokens: %d key(s) from %s, issuer %s, audience %s", len(self.files.value), path,
                 issuer, audience)

    def _key(self, header: dict) -> tuple[VerificationKey, str]:
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in JWT_ALGORITHMS:
            raise errors.Unauthenticated("bearer token is signed with an algorithm this gateway does not accept")
        keys = self.files.get()
        key = keys.get(kid) if kid is not None else (next(iter(keys.values())) if len(keys) == 1 else None)
        if key is None or key.kty != JWT_ALGORITHMS[alg] or key.alg not in (None, alg):
            raise errors.Unauthenticated("bearer token is signed by an unknown key")
        return key, alg

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated("bearer token is not a valid token") from exc
        key, alg = self._key(header)
        try:
            claims = jwt.decode(token, key.jwk.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as exc:
            raise errors.Unauthenticated("bearer token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise errors.Unauthenticated("bearer token is not valid yet") from exc
        except jwt.PyJWTError as exc:
            log.info("JWT rejected: %s", type(exc).__name__)
            raise errors.Unauthenticated("bearer token was rejected (signature, issuer or audience)") from exc
        granted = claims.get(self.models_claim, ())
        if isinstance(granted, str):
            granted = granted.split()
        if not isinstance(granted, (list, tuple)) or not all(isinstance(m, str) for m in granted):
            granted = ()
        try:
            models = _models(granted)
        except ValueError:
            models = frozenset()
        return Principal(_caller_from_subject(claims["sub"]), models, "jwt")


# --------------------------------------------------------------------------- the gate
def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the single ``authorization: Bearer <token>`` entry; raises Unauthenticated."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise errors.Unauthenticated("this call needs an 'authorization: Bearer <token>' header")
    if len(values) > 1 or not isinstance(values[0], str):
        raise errors.Unauthenticated("send exactly one authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise errors.Unauthenticated("the authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_CHARS.match(token):
        raise errors.Unauthenticated("bearer token is not a valid token")
    return token


class Authenticator:
    """Checks bearer tokens (static and/or JWT) and per-caller model allow lists."""

    def __init__(self, tokens: StaticTokens | None = None, jwt_verifier: JwtVerifier | None = None) -> None:
        self.tokens, self.jwt = tokens, jwt_verifier

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.jwt is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Authenticator":
        """Load the configured token sources; StartupError on a missing or invalid file, or when
        a non-loopback listener would accept unauthenticated calls without ``--insecure``."""
        tokens = verifier = None
        try:
            if settings.auth_tokens_file:
                tokens = StaticTokens(_existing(settings.auth_tokens_file, "auth tokens"))
            if settings.auth_jwks_file:
                verifier = JwtVerifier(_existing(settings.auth_jwks_file, "JWKS"), settings.auth_jwt_issuer,
                                       settings.auth_jwt_audience, settings.auth_jwt_leeway_s,
                                       settings.auth_jwt_models_claim)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise StartupError(f"cannot load authentication settings: {exc}") from exc
        auth = cls(tokens, verifier)
        if not auth.enabled:
            if is_loopback(settings.host):
                log.warning("authentication is off (loopback only); set MEDSEG_AUTH_TOKENS_FILE or "
                            "MEDSEG_AUTH_JWKS_FILE to require bearer tokens")
            elif not settings.insecure:
                raise StartupError(f"refusing unauthenticated gRPC on {settings.host}: set --auth-tokens-file or "
                                   "--auth-jwks-file (MEDSEG_AUTH_TOKENS_FILE, MEDSEG_AUTH_JWKS_FILE), or pass "
                                   "--insecure for local development")
            else:
                log.warning("INSECURE: no authentication on %s (--insecure)", settings.host)
        return auth

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(metadata)
        if self.tokens is not None:
            principal = self.tokens.verify(token)
            if principal is not None:
                return principal
        if self.jwt is not None and token.count(".") == 2:
            return self.jwt.verify(token)
        raise errors.Unauthenticated("bearer token is not recognised")

    @staticmethod
    def authorize(principal: Principal, model: str) -> None:
        if not principal.may_use(model):
            raise errors.PermissionDenied(f"caller {errors.shorten(principal.caller)} may not use model "
                                         f"{errors.shorten(model)}")


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {p} does not exist or is not a file")
    return p


def main(argv: list[str]) -> int:
    """``python -m service.auth new-token CALLER MODELS``: a fresh token and its tokens-file line."""
    if len(argv) != 3 or argv[0] != "new-token" or not _CALLER.match(argv[1]):
        sys.stderr.write("usage: python -m service.auth new-token CALLER MODEL[,MODEL...]|'*'\n")
        return 2
    try:
        _models(argv[2].split(","))
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    token = secrets.token_urlsafe(32)
    sys.stdout.write(f"token (give it to the caller, store it nowhere else): {token}\n"
                     f"tokens-file line: sha256:{token_digest(token).hex()} {argv[1]} {argv[2]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
