"""The gateway's configuration: one frozen object built once in ``main()``.

Every flag has an environment variable (``MEDSEG_`` + the flag name in upper case with
underscores); a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from service.core.domain import ImageLimits

BACKENDS = ("embedded", "triton")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    backend: str = "embedded"
    model_repository: Path = Path("model_repository")
    triton_url: str = "127.0.0.1:8001"
    default_model: str = "medsam_lite"
    cache_bytes: int = 512 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_prompts: int = 32
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000
    ort_threads: int = 0
    backend_workers: int = 2
    backend_timeout_s: float = 30.0
    grace_s: float = 10.0
    # Wait this long before loading models (exercises probes and clients during start-up).
    startup_delay_s: float = 0.0
    log_level: str = "INFO"
    # After binding, write {"grpc": port, "metrics": port, "health": port, "pid": pid} here
    # (for tests and supervisors).
    port_file: str = ""

    # --- transport security (service/tls.py) -----------------------------------------
    # Server certificate chain and key (PEM). Both set: TLS on the gRPC port; both files are
    # re-read when they change (certificate rotation without a restart).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA bundle (PEM) that client certificates must chain to; set: mutual TLS is required.
    tls_client_ca_file: str = ""
    # Explicitly allow plaintext gRPC and no authentication on a non-loopback address
    # (local development only). Without it such a listener needs TLS and credentials.
    insecure: bool = False
    # A plaintext port serving only grpc.health.v1 (kubelet gRPC probes cannot do TLS or
    # send tokens); -1 disables it, 0 picks a free port.
    health_host: str = "127.0.0.1"
    health_port: int = -1

    # --- authentication and authorisation (service/auth.py) ---------------------------
    # Static bearer tokens: one "sha256:<hex of the token> <caller> <model,model|*>" per line.
    auth_tokens_file: str = ""
    # JWT bearer tokens: a JWKS file (public keys), the required issuer and audience.
    auth_jwks_file: str = ""
    auth_jwt_issuer: str = ""
    auth_jwt_audience: str = ""
    auth_jwt_leeway_s: float = 30.0
    # Claim holding the models a JWT caller may use (list or space-separated; "*" = all).
    auth_jwt_models_claim: str = "medseg_models"
    # grpc.health.v1 and server reflection answer without a token (probes cannot send one).
    auth_exempt_health: bool = True
    auth_exempt_reflection: bool = True

    # --- overload control (service/admission.py) --------------------------------------
    # Segment/EmbedImage calls running at once, and calls waiting for a slot; beyond both,
    # RESOURCE_EXHAUSTED at once. A waiting call gives up at its own deadline.
    max_inflight: int = 4
    max_queue: int = 16

    # --- audit (service/audit.py) -----------------------------------------------------
    # Where the one-JSON-line-per-RPC audit log goes: "-" = stderr, else a file (appended).
    audit_log: str = "-"

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_side=self.max_image_side, max_pixels=self.max_image_pixels,
                           max_encoded_bytes=self.max_request_bytes)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> "Settings":
        environ = dict(os.environ if environ is None else environ)
        parser = argparse.ArgumentParser(prog="python -m service",
                                         description="Medical image segmentation gateway (gRPC).")
        defaults = cls()
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = "MEDSEG_" + f.name.upper()
            default = getattr(defaults, f.name)
            raw_env = environ.get(env)
            kind = type(default)
            if kind is bool:
                value = default if raw_env is None else raw_env.strip().lower() in ("1", "true", "yes", "on")
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"env {env}")
                continue
            value = default if raw_env is None else kind(raw_env)
            extra = {"choices": BACKENDS} if f.name == "backend" else {}
            parser.add_argument(flag, type=kind, default=value, help=f"env {env} (default {default})", **extra)
        args = parser.parse_args(argv)
        settings = cls(**vars(args))
        if settings.backend not in BACKENDS:
            parser.error(f"--backend must be one of {BACKENDS}")
        if settings.max_inflight < 1 or settings.max_queue < 0:
            parser.error("--max-inflight must be >= 1 and --max-queue >= 0")
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            parser.error("--tls-cert-file and --tls-key-file go together")
        if settings.tls_client_ca_file and not settings.tls_cert_file:
            parser.error("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
        if settings.auth_jwks_file and not (settings.auth_jwt_issuer and settings.auth_jwt_audience):
            parser.error("--auth-jwks-file needs --auth-jwt-issuer and --auth-jwt-audience")
        return settings
