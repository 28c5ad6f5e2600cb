"""Real processes for benchmarks and integration tests: the gateway (``python -m service``)
and tritonserver, started on ephemeral loopback ports, readiness polled (never slept for),
stopped by PID.

It lives in ``bench`` because the benchmarks need it and bench never imports ``tests``;
``tests/harness.py`` re-exports it for the tests.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["MODEL_REPOSITORY", "REPO", "GatewayProcess", "MetricMissing", "TritonProcess", "ensure_models",
           "free_port", "free_ports", "metric_value", "wait_for"]

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


FP32_ENTRIES = ("medsam_lite_encoder", "medsam_lite_decoder")


def fp32_repository(tmp: Path, repository: Path = MODEL_REPOSITORY) -> Path:
    """A repository of links to the fp32 LiteMedSAM entries only, for runs about the serving
    path rather than the variants (a Triton server then loads 2 entries, not every variant:
    it starts, restarts and warms up faster). Pass it to both TritonProcess and the gateway
    (``--model-repository``)."""
    out = Path(tmp) / "fp32-repository"
    out.mkdir(parents=True, exist_ok=True)
    for name in FP32_ENTRIES:
        if not (out / name).exists():
            (out / name).symlink_to((repository / name).resolve(), target_is_directory=True)
    return out


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
        """Start the process and read its ports back; a start that fails (exit, timeout) kills
        what it started before raising, so no gateway outlives a failed start."""
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", *self.args], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)

        def ports():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            return self.port_file.is_file() and json.loads(self.port_file.read_text())

        try:
            info = wait_for(ports, timeout, "the gateway's port file")
        except BaseException:
            self.kill()
            raise
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

    @contextlib.contextmanager
    def serving(self, timeout: float = 120.0):
        """Start, wait for SERVING and yield this process; it is stopped on the way out, also
        when the start or the wait fails (no process outlives a failed fixture)."""
        self.start()
        try:
            self.wait_serving(timeout)
            yield self
        finally:
            self.stop()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL by PID (a start that failed, a stop that timed out) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


class MetricMissing(KeyError):
    """A metric (or the labelled sample asked for) is not in the exposition at all."""


class _BindFailed(Exception):
    """tritonserver exited because one of its ports was already in use."""


_RAISE = object()
_SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created", "_info")


def _families(text: str) -> set[str]:
    """Names declared by ``# TYPE`` lines (a labelled metric with no sample yet has one)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ") and len(line.split()) > 2}


def _declared(text: str, name: str) -> bool:
    families = _families(text)
    return any(name == family + suffix for family in families for suffix in _SUFFIXES)


def metric_value(text: str, name: str, *, default: float | object = _RAISE, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``.

    No matching sample raises :class:`MetricMissing`, so that a renamed metric or label fails
    the check instead of reading as 0 (an upper bound such as ``<= limit`` would then pass).
    ``default`` (e.g. ``0.0`` for a counter read *before* its first increment) is returned
    for a missing sample only while the metric itself is declared (its ``# TYPE`` line is
    there); a metric absent from the exposition raises even then."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
            found = True
    if found:
        return total
    if default is not _RAISE and _declared(text, name):
        return float(default)  # type: ignore[arg-type]
    what = f"{name}{{{', '.join(f'{k}={v!r}' for k, v in labels.items())}}}" if labels else name
    declared = "declared but no such sample" if _declared(text, name) else "not declared"
    raise MetricMissing(f"metric {what} is not in the scrape ({declared})")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes and Threads of process ``pid``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def free_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A currently free loopback port not in ``avoid`` (for servers, like tritonserver, that
    cannot bind port 0). Another process may still take it before the server binds it:
    :meth:`TritonProcess.start` retries with fresh ports when a bind fails."""
    import socket

    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free loopback port")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports."""
    ports: list[int] = []
    for _ in range(count):
        ports.append(free_port(set(ports)))
    return ports


class TritonProcess:
    """A real ``tritonserver`` from the nvidia-pytriton wheel, on loopback ports, stopped by PID."""

    def __init__(self, tmp: Path, repository: Path = MODEL_REPOSITORY) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.repository = repository
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.log_path = self.tmp / "tritonserver.log"
        self.proc: subprocess.Popen | None = None
        self._ports_in_use = False  # once it has served, restarts keep its ports (clients know them)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0, bind_attempts: int = 3) -> "TritonProcess":
        """Start tritonserver and wait for readiness. The three ports are picked free but not
        held (tritonserver cannot bind port 0), so another process may take one first: when the
        server exits because a port is already in use, the first start retries on fresh ports
        (``bind_attempts`` in all). A start that fails kills what it started before raising."""
        for attempt in range(1, bind_attempts + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._start_once(timeout)
            except _BindFailed:
                if self._ports_in_use or attempt == bind_attempts:
                    raise RuntimeError(f"tritonserver could not bind its ports {self.grpc_port}, {self.http_port}, "
                                       f"{self.metrics_port} (attempt {attempt}):\n{self.log()[offset:][-4000:]}")
                self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
                continue
            self._ports_in_use = True
            return self
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        from export.tritonserver import command

        argv, env = command(self.repository, self.grpc_port, self.http_port, self.metrics_port,
                            cache=REPO / ".cache" / "triton-backends")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                this_start = self.log()[offset:]
                if "already in use" in this_start.lower():
                    raise _BindFailed()
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{this_start[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout, "tritonserver readiness", interval=0.2)
        except BaseException:
            self.kill()
            raise

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
