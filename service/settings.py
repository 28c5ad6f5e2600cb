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
CACHE_SCOPES = ("caller", "tenant", "shared")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    backend: str = "embedded"
    model_repository: Path = Path("model_repository")
    triton_url: str = "127.0.0.1:8001"
    # The model a call naming none gets: a model name, or "auto": the fastest LiteMedSAM variant
    # present that this CPU runs natively, measured at start-up (service/inference/model_choice.py).
    default_model: str = "auto"
    # Encoder runs of each candidate timed at start-up for --default-model auto (0: no timing,
    # the documented preference BF16 > INT8 > fp32 among the candidates decides).
    default_model_runs: int = 2
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
    # Memory budget of the calls running at once: each is charged its estimate (request,
    # decode, masks, answer: service/core/request_memory.py) and the charges never sum above
    # this; a call that alone needs more is refused with RESOURCE_EXHAUSTED. Size the pod's
    # memory limit as baseline RSS + --cache-bytes + this + request buffers. 0 = no budget.
    memory_budget_bytes: int = 2 * 1024 * 1024 * 1024
    # The most one call may be charged (0: the budget).
    max_request_memory_bytes: int = 0
    # Memory the gateway may use: start-up refuses models whose measured needs (medseg.memory_bytes,
    # written at export) do not fit what is left of it (service/inference/memory_fit.py).
    # 0 = the container's cgroup limit, or without one the machine's RAM.
    memory_limit_bytes: int = 0
    # Calls whose client gave up (deadline, cancel) while their thread still runs keep their
    # slot until it ends; while this many are still running, new calls are refused at once.
    max_abandoned: int = 2
    # Per caller (the token's caller; "anonymous" without authentication): calls running or
    # waiting at once, and calls per second with bursts of --burst-per-caller. 0 = no bound.
    max_inflight_per_caller: int = 0
    rate_per_caller: float = 0.0
    burst_per_caller: int = 0

    # --- slow or stalled clients (service/edge/intake.py) ------------------------------
    # A unary request message must arrive within this many seconds of its call's start
    # (DEADLINE_EXCEEDED otherwise); size it by --max-request-bytes over the slowest link.
    request_receive_timeout_s: float = 15.0
    # Segmentation calls one connection may have open at once (health and reflection aside);
    # beyond it RESOURCE_EXHAUSTED at once. HTTP/2 streams per connection: this + 8.
    max_rpcs_per_connection: int = 16
    # Connections without a call for this long are closed (GOAWAY); 0 = never.
    max_connection_idle_s: float = 300.0
    # Every connection is closed after this long (GOAWAY; clients reconnect); 0 = never.
    max_connection_age_s: float = 1800.0

    # --- tenant isolation of the image cache (service/inference/cache.py) ---------------
    # Whose cached images and image_ids a call sees: "caller" (its own), "tenant" (callers
    # named "tenant/name" share), "shared" (everyone). Without authentication: shared.
    cache_scope: str = "caller"

    # --- volumes (service/inference/volumes.py, protos/medseg/v1/volumes.proto) ----------
    # Bytes one uploaded volume may hold (its voxels as stored, and its upload stream), the
    # voxels of all stored volumes together, and those of one caller's; over a bound, the
    # upload is refused with RESOURCE_EXHAUSTED. A volume unused for --volume-ttl-s expires
    # (its id then answers NOT_FOUND: upload again) and its memory is freed.
    max_volume_bytes: int = 768 * 1024 * 1024
    max_volumes_bytes: int = 1536 * 1024 * 1024
    max_caller_volumes_bytes: int = 1024 * 1024 * 1024
    volume_ttl_s: float = 1800.0
    # Files one DICOM series upload may hold, and slices one volume may have.
    max_series_files: int = 4096
    max_volume_slices: int = 4096
    # Slice embeddings kept for propagation and refinements, all volumes and models together
    # (bytes, LRU; an evicted one is recomputed when needed again).
    volume_embedding_bytes: int = 768 * 1024 * 1024

    # --- the PACS (DICOMweb: service/backends/pacs.py; SegmentStudy in volumes.proto) -----
    # Base URL of the PACS's DICOMweb service (QIDO-RS, WADO-RS, STOW-RS), e.g.
    # https://pacs.hospital.example/dicom-web; empty: SegmentStudy answers FAILED_PRECONDITION.
    pacs_url: str = ""
    # CA bundle (PEM) the PACS's https certificate must chain to (empty: the system's CAs).
    pacs_ca_file: str = ""
    # Credentials, read from files (a Kubernetes Secret) at start-up and when they change:
    # HTTP basic (--pacs-username and the password file) or a bearer token file; not both.
    pacs_username: str = ""
    pacs_password_file: str = ""
    pacs_token_file: str = ""
    # Seconds one PACS request may take (connect and each read); a PACS that does not answer in
    # time is UNAVAILABLE.
    pacs_timeout_s: float = 30.0

    # --- DICOM SEG objects the gateway writes (service/core/dicom_seg.py) ----------------
    # SeriesDescription of a SEG when the request names none, and its ContentCreatorName
    # (a DICOM person name, e.g. "MEDSEG^GATEWAY"; empty: none).
    seg_series_description: str = "medseg segmentation"
    seg_content_creator: str = ""

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
            if f.name == "cache_scope":
                extra = {"choices": CACHE_SCOPES}
            parser.add_argument(flag, type=kind, default=value, help=f"env {env} (default {default})", **extra)
        args = parser.parse_args(argv)
        settings = cls(**vars(args))
        if settings.backend not in BACKENDS:
            parser.error(f"--backend must be one of {BACKENDS}")
        if settings.default_model_runs < 0:
            parser.error("--default-model-runs must be >= 0")
        if settings.request_receive_timeout_s <= 0 or settings.max_rpcs_per_connection < 1:
            parser.error("--request-receive-timeout-s must be > 0 and --max-rpcs-per-connection >= 1")
        if settings.max_inflight < 1 or settings.max_queue < 0:
            parser.error("--max-inflight must be >= 1 and --max-queue >= 0")
        if min(settings.memory_budget_bytes, settings.max_request_memory_bytes, settings.max_abandoned,
               settings.max_inflight_per_caller, settings.burst_per_caller,
               settings.memory_limit_bytes) < 0 or settings.rate_per_caller < 0:
            parser.error("--memory-budget-bytes, --max-request-memory-bytes, --memory-limit-bytes, --max-abandoned, "
                         "--max-inflight-per-caller, --rate-per-caller and --burst-per-caller must be >= 0")
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            parser.error("--tls-cert-file and --tls-key-file go together")
        if settings.tls_client_ca_file and not settings.tls_cert_file:
            parser.error("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
        if settings.auth_jwks_file and not (settings.auth_jwt_issuer and settings.auth_jwt_audience):
            parser.error("--auth-jwks-file needs --auth-jwt-issuer and --auth-jwt-audience")
        if settings.pacs_password_file and not settings.pacs_username:
            parser.error("--pacs-password-file needs --pacs-username (HTTP basic authentication)")
        if settings.pacs_token_file and (settings.pacs_username or settings.pacs_password_file):
            parser.error("give the PACS either basic credentials (--pacs-username, --pacs-password-file) or "
                         "--pacs-token-file, not both")
        if settings.pacs_timeout_s <= 0:
            parser.error("--pacs-timeout-s must be > 0")
        if settings.pacs_url and not settings.pacs_url.startswith(("http://", "https://")):
            parser.error("--pacs-url must be an http:// or https:// URL of the PACS's DICOMweb root")
        return settings
