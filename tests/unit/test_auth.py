"""Bearer tokens: static token digests, JWT against a JWKS, allow lists, the exposure rule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from service.core import errors
from service.security.auth import (ANONYMOUS, Authenticator, JwtVerifier, StaticTokens, bearer_token, parse_jwks,
                          parse_tokens, token_digest)
from service.core.errors import StartupError
from service.settings import Settings
from tests.pki import Issuer, tokens_line

TOKEN, OTHER = "tok-pacs-0123456789abcdef", "tok-research-fedcba9876543210"


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# caller allow lists\n"
                    f"{tokens_line(TOKEN, 'pacs-router', 'medsam_lite')}\n\n"
                    f"{tokens_line(OTHER, 'research', '*')}  # every model\n")
    return path


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def verifier(issuer: Issuer, tmp_path: Path) -> JwtVerifier:
    return JwtVerifier(issuer.write_jwks(tmp_path / "jwks.json"), issuer.issuer, issuer.audience, 5.0,
                       "medseg_models")


# --------------------------------------------------------------------------- static tokens
def test_static_token_maps_to_its_caller_and_allow_list(tokens_file):
    auth = Authenticator(StaticTokens(tokens_file))
    pacs = auth.authenticate(_bearer(TOKEN))
    assert pacs.caller == "pacs-router" and pacs.scheme == "token"
    assert pacs.may_use("medsam_lite") and not pacs.may_use("sam_vit_b")
    assert auth.authenticate(_bearer(OTHER)).may_use("anything")


@pytest.mark.parametrize("metadata", [[], [("authorization", "Basic abc")], [("authorization", "Bearer")],
                                      _bearer("not-a-known-token"), _bearer(TOKEN + "x"), _bearer(TOKEN[:-1]),
                                      [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")],
                                      _bearer("x" * 9000), _bearer("tab\tinside")])
def test_missing_or_bad_static_tokens_are_unauthenticated(tokens_file, metadata):
    with pytest.raises(errors.Unauthenticated) as info:
        Authenticator(StaticTokens(tokens_file)).authenticate(metadata)
    assert TOKEN not in info.value.message


def test_bearer_scheme_is_case_insensitive():
    assert bearer_token([("authorization", f"bearer {TOKEN}")]) == TOKEN


def test_authorize_denies_models_outside_the_allow_list(tokens_file):
    auth = Authenticator(StaticTokens(tokens_file))
    principal = auth.authenticate(_bearer(TOKEN))
    auth.authorize(principal, "medsam_lite")
    with pytest.raises(errors.PermissionDenied):
        auth.authorize(principal, "no_such_model")  # unknown models look the same as forbidden ones


@pytest.mark.parametrize("text", ["plaintext-token pacs medsam_lite",            # not a digest
                                  "sha256:" + "0" * 64 + " pacs",                # missing models
                                  "sha256:" + "0" * 64 + " pa cs medsam_lite",   # 4 fields
                                  "sha256:" + "0" * 64 + " bad\x01name m",        # caller charset
                                  "sha256:" + "A" * 64 + " pacs m",              # upper-case hex
                                  ("sha256:" + "0" * 64 + " a m\n") * 2])        # duplicate digest
def test_invalid_tokens_files_are_rejected(text):
    with pytest.raises(ValueError):
        parse_tokens(text)


def test_tokens_file_is_reloaded_and_a_broken_update_keeps_the_old_tokens(tokens_file):
    tokens = StaticTokens(tokens_file)
    tokens.files._min_interval = 0.0
    auth = Authenticator(tokens)
    tokens_file.write_text(tokens_line(OTHER, "research", "*") + "\n")  # TOKEN revoked
    os.utime(tokens_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(errors.Unauthenticated):
        auth.authenticate(_bearer(TOKEN))
    tokens_file.write_text("garbage\n")
    os.utime(tokens_file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert auth.authenticate(_bearer(OTHER)).caller == "research"


def test_token_digest_is_sha256_of_the_utf8_token():
    assert token_digest("abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --------------------------------------------------------------------------- JWT
def test_valid_jwt_gives_subject_and_models(issuer, verifier):
    principal = Authenticator(jwt_verifier=verifier).authenticate(_bearer(issuer.token("dr-viewer")))
    assert (principal.caller, principal.scheme) == ("dr-viewer", "jwt")
    assert principal.may_use("medsam_lite") and not principal.may_use("other")
    rsa = Authenticator(jwt_verifier=verifier).authenticate(_bearer(issuer.token(kid="rsa-1", models="a b")))
    assert rsa.models == frozenset({"a", "b"})
    assert verifier.verify(issuer.token(models=["*"])).models is None
    assert verifier.verify(issuer.token(models=None)).models == frozenset()  # no claim: no model


@pytest.mark.parametrize("overrides", [{"ttl_s": -60}, {"iss": "https://evil.test"}, {"aud": "someone-else"},
                                       {"nbf": int(time.time()) + 3600}, {"sub": None}])
def test_expired_or_misaddressed_jwts_are_unauthenticated(issuer, verifier, overrides):
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(issuer.token(**overrides))


def test_expiry_leeway_tolerates_small_clock_skew(issuer, verifier):
    assert verifier.verify(issuer.token(ttl_s=-2)).caller == "viewer-1"  # leeway is 5 s


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_and_hmac_with_the_public_key_are_refused(issuer, verifier):
    claims = {"iss": issuer.issuer, "aud": issuer.audience, "sub": "x", "exp": int(time.time()) + 60}
    unsigned = f"{_b64({'alg': 'none', 'kid': 'ec-1'})}.{_b64(claims)}."
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(unsigned)
    public_pem = issuer.keys["rsa-1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"})
    body = f"{header}.{_b64(claims)}"
    sig = base64.urlsafe_b64encode(hmac.new(public_pem, body.encode(), hashlib.sha256).digest()).rstrip(b"=")
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(f"{body}.{sig.decode()}")


def test_jwt_signed_by_an_unknown_key_or_with_a_mismatched_kid_is_refused(issuer, verifier):
    stranger = Issuer(issuer.issuer, issuer.audience)
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(stranger.token())
    # the RSA key's kid on an ES256 token: key type does not fit the algorithm
    token = jwt.encode({"iss": issuer.issuer, "aud": issuer.audience, "sub": "x", "exp": int(time.time()) + 60},
                       issuer.keys["ec-1"], algorithm="ES256", headers={"kid": "rsa-1"})
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(token)


def test_odd_subjects_are_replaced_by_a_digest(issuer, verifier):
    assert verifier.verify(issuer.token("Doe^John 1234")).caller.startswith("sub-sha256:")


@pytest.mark.parametrize("doc", ['{"keys": []}', "not json", '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
                                 '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"}]}'])
def test_jwks_without_usable_public_keys_is_rejected(doc):
    with pytest.raises(ValueError):
        parse_jwks(doc)


# --------------------------------------------------------------------------- settings and exposure
def test_no_auth_is_allowed_on_loopback_only(tmp_path):
    assert Authenticator.from_settings(Settings(host="127.0.0.1")).authenticate([]) is ANONYMOUS
    with pytest.raises(StartupError, match="--auth-tokens-file"):
        Authenticator.from_settings(Settings(host="0.0.0.0"))
    assert not Authenticator.from_settings(Settings(host="0.0.0.0", insecure=True)).enabled


def test_missing_or_invalid_auth_files_are_startup_errors(tmp_path):
    with pytest.raises(StartupError, match="does not exist"):
        Authenticator.from_settings(Settings(auth_tokens_file=str(tmp_path / "nope")))
    bad = tmp_path / "tokens"
    bad.write_text("hello world\n")
    with pytest.raises(StartupError, match="line 1"):
        Authenticator.from_settings(Settings(auth_tokens_file=str(bad)))


def test_settings_require_issuer_and_audience_with_a_jwks(tmp_path):
    with pytest.raises(SystemExit):
        Settings.from_args(["--auth-jwks-file", "x.json"], environ={})
    s = Settings.from_args([], environ={"MEDSEG_AUTH_JWKS_FILE": "j", "MEDSEG_AUTH_JWT_ISSUER": "i",
                                        "MEDSEG_AUTH_JWT_AUDIENCE": "a", "MEDSEG_MAX_INFLIGHT": "3"})
    assert (s.auth_jwks_file, s.max_inflight, s.auth_exempt_health) == ("j", 3, True)


def test_new_token_command_prints_a_matching_tokens_line(capsys):
    from service.security.auth import main

    assert main(["new-token", "pacs-router", "medsam_lite"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    (digest, principal), = parse_tokens(out[1].split(": ", 1)[1])
    assert digest == token_digest(token) and principal.caller == "pacs-router"
