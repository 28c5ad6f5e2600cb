"""Real processes for benchmarks and integration tests: the gateway (``python -m service``)
and tritonserver, started on ephemeral loopback ports, readiness polled (never slept for),
stopped by PID.

It lives in ``bench`` because the benchmarks need it and bench never imports ``tests``;
``tests/harness.py`` re-exports it for the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["MODEL_REPOSITORY", "REPO", "GatewayProcess", "TritonProcess", "ensure_models", "free_port",
           "metric_value", "wait_for"]

REPO = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO / "model_repository"


def ensure_models() -> Path:
    """Export LiteMedSAM if its ONNX files are missing (``make test`` has normally done it)."""
    needed = [MODEL_REPOSITORY / m / "1" / f for m in ("medsam_lite_encoder", "medsam_lite_decoder")
              for f in ("model.onnx", "model.py", "medseg_runtimes.py")]
    if not all(p.is_file() for p in needed):
        subprocess.run([sys.executable, "-m", "export", "medsam_lite", "--check-cases", "0",
                        "--repository", str(MODEL_REPOSITORY)], cwd=REPO, check=True)
    return MODEL_REPOSITORY


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class GatewayProcess:
    """``python -m service`` on 127.0.0.1 with port 0; ports read back from --port-file."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port_file = self.tmp / "ports.json"
        self.log_path = self.tmp / "gateway.log"
        self.args = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                     "--port-file", str(self.port_file), "--model-repository", str(MODEL_REPOSITORY), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.grpc_port = self.metrics_port = 0

    def start(self, timeout: float = 60.0) -> "GatewayProcess":
        self.port_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", *self.args], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)

        def ports():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            return self.port_file.is_file() and json.loads(self.port_file.read_text())

        info = wait_for(ports, timeout, "the gateway's port file")
        self.grpc_port, self.metrics_port = info["grpc"], info["metrics"]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2)
                return reply.status
            except grpc.RpcError:
                return health_pb2.HealthCheckResponse.UNKNOWN

    def wait_serving(self, timeout: float = 120.0) -> "GatewayProcess":
        wait_for(lambda: self.health() == health_pb2.HealthCheckResponse.SERVING, timeout, "health SERVING")
        return self

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def free_port() -> int:
    """A currently free loopback port (for servers, like tritonserver, that cannot bind port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonProcess:
    """A real ``tritonserver`` from the nvidia-pytriton wheel, on loopback ports, stopped by PID."""

    def __init__(self, tmp: Path, repository: Path = MODEL_REPOSITORY) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.repository = repository
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = self.tmp / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> "TritonProcess":
        from export.tritonserver import command

        argv, env = command(self.repository, self.grpc_port, self.http_port, self.metrics_port,
                            cache=REPO / ".cache" / "triton-backends")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, timeout, "tritonserver readiness", interval=0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def kill(self) -> None:
        """A crash: SIGKILL by PID, no chance to drain."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
