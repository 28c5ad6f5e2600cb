"""A real Prometheus server for tests: 127.0.0.1 only, a free port, a generated scrape
config, readiness polled on /-/ready, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.harness import wait_for


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusProcess:
    """``prometheus`` scraping ``jobs`` ({job name: "127.0.0.1:port"}) every second, with
    ``rule_files`` loaded, no Alertmanager, no remote write: it contacts only the targets."""

    def __init__(self, binary: str, tmp: Path, jobs: dict[str, str], rule_files: list[Path] = ()) -> None:
        for target in jobs.values():
            if not target.startswith("127.0.0.1:"):
                raise ValueError(f"tests scrape loopback targets only, not {target}")
        self.binary, self.tmp = binary, Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.config = self.tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in jobs.items()],
        }))
        self.log_path = self.tmp / "prometheus.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusProcess":
        for _ in range(3):  # the free port can be taken between probing and binding: retry
            self.port = free_port()
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
            try:
                wait_for(self._ready, timeout, "Prometheus /-/ready")
                return self
            except RuntimeError:  # it exited
                if "address already in use" not in self.log():
                    raise
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"Prometheus could not bind a port:\n{self.log()}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as reply:
            body = json.load(reply)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant vector result of ``promql`` (a list of {metric, value})."""
        return self.api("query", query=promql)["result"]

    def scalar(self, promql: str) -> float | None:
        """The single value of ``promql``, or None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_value(self, promql: str, predicate, timeout: float, what: str) -> float:
        """Poll ``promql`` until its single value satisfies ``predicate``; return that value."""
        seen: list[float] = []

        def check() -> bool:
            value = self.scalar(promql)
            if value is not None and predicate(value):
                seen.append(value)
                return True
            return False

        wait_for(check, timeout, what, interval=0.25)
        return seen[-1]

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
