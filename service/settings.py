"""The gateway's configuration: one frozen object built once in ``main()``.

Every flag has an environment variable (``MEDSEG_`` + the flag name in upper case with
underscores); a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from service.domain import ImageLimits

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
    # After binding, write {"grpc": port, "metrics": port, "pid": pid} here (for tests and supervisors).
    port_file: str = ""

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
        return settings
