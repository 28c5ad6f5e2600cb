"""Start a real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) on this machine.

The wheel ships Triton 2.51 with only the python backend; the CPU-target repository entries
(``python -m export ... --target cpu``) run ONNX Runtime inside it. Everything binds to
127.0.0.1 unless ``--host`` says otherwise::

    python -m export.tritonserver --model-repository model_repository \\
        --grpc-port 8001 --http-port 8000 --metrics-port 8002

Pitfalls handled here (../shared/ENVIRONMENT.md): the python stub must link this venv's
``libpython3.11`` (``LD_LIBRARY_PATH``) and see this venv first on ``PATH``, with numpy<2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytriton

WHEEL = Path(pytriton.__file__).resolve().parent / "tritonserver"
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def backend_directory(cache: Path) -> Path:
    """A backend directory whose ``python/`` holds the backend library, utils and the stub."""
    python = cache / "python"
    python.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": WHEEL / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": WHEEL / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": WHEEL / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        dst = python / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return cache


def command(repository: Path, grpc_port: int, http_port: int, metrics_port: int, host: str = "127.0.0.1",
            cache: Path = Path(".cache/triton-backends"), log_verbose: int = 0) -> tuple[list[str], dict[str, str]]:
    """argv and environment for tritonserver serving ``repository`` on the given ports."""
    missing = [p.parent.parent.name for p in Path(repository).glob("*/config.pbtxt")
               if "python" in p.read_text() and not (p.parent / "1" / "model.py").is_file()]
    if missing:
        raise FileNotFoundError(f"no 1/model.py for {missing}: run `python -m export medsam_lite --target cpu`")
    backends = backend_directory(Path(cache).resolve())
    argv = [str(WHEEL / "bin" / "tritonserver"),
            "--model-repository", str(Path(repository).resolve()),
            "--backend-directory", str(backends),
            "--grpc-address", host, "--grpc-port", str(grpc_port),
            "--http-address", host, "--http-port", str(http_port),
            "--metrics-address", host, "--metrics-port", str(metrics_port),
            "--allow-metrics", "true", "--allow-cpu-metrics", "true",
            "--model-control-mode", "none", "--strict-readiness", "true",
            "--exit-timeout-secs", "10", "--log-verbose", str(log_verbose)]
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # The copied stub loses its relative RPATH to the wheel's bundled libraries: name them.
    bundled = str(WHEEL.parent.parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, bundled, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return argv, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.tritonserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(argv)
    cmd, env = command(args.model_repository, args.grpc_port, args.http_port, args.metrics_port, args.host,
                       log_verbose=args.log_verbose)
    os.execve(cmd[0], cmd, env)  # replaces this process: signals reach tritonserver directly


if __name__ == "__main__":
    sys.exit(main())
