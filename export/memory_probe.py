"""How much memory one repository entry takes loaded and run once, measured in a child process.

``python -m export.memory_probe FOLDER [--version N]`` opens the entry's ONNX file as the gateway
does (:func:`service.inference.predictor.open_entry`: its runtime, precision, batch axis), runs
it once on zeros of its input shapes (a 2-prompt batch for a prompt decoder) and prints the
peak resident set size it added over the interpreter with the runtime imported (bytes). The
child starts fresh, so the export's own peak (PyTorch, the tracer) is not counted. The exporter
writes the figure as ``medseg.memory_bytes``; the gateway's start-up check
(:mod:`service.inference.memory_fit`) compares the models' figures with its memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    """This process's peak resident set (VmHWM: per address space, so it starts afresh at exec,
    unlike ``ru_maxrss``, which a child inherits from the exporter that spawned it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _feeds(entry) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in entry.inputs:
        dims = [1] + list(spec.dims) if entry.max_batch_size > 0 else list(spec.dims)
        if spec.name == "point_coords":
            dims = [2, 3, 2]
        elif spec.name == "point_labels":
            dims = [2, 3]
        elif dims and dims[0] == -1:
            dims[0] = 2
        dims = [d if d > 0 else 1 for d in dims]
        feeds[spec.name] = np.zeros(dims, dtype=spec.numpy_dtype)
    if "point_labels" in feeds:
        feeds["point_labels"][:] = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    return feeds


def probe(folder: Path, version: int = 1) -> int:
    from service.backends.repository import RepositoryEntry
    from service.inference.predictor import open_entry

    entry = RepositoryEntry.read(folder)
    import onnxruntime  # noqa: F401 - counted in the baseline, as it is in the gateway before models load

    if entry.runtime.runtime == "openvino":
        import openvino  # noqa: F401
    base = _rss_bytes()
    session = open_entry(entry, version=version)
    session.run(entry.output_names, _feeds(entry))
    return max(0, _peak_bytes() - base)


def measure_entry(entry, version: int = 1, timeout_s: float = 900.0) -> int:
    """Peak bytes ``entry`` (placed in its repository folder) adds, measured in a child process."""
    out = subprocess.run([sys.executable, "-m", "export.memory_probe", str(entry.path), "--version", str(version)],
                         capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the memory of {entry.name} failed: {tail}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["bytes"])


def write_measured_config(repository: Path, entry, target: str, version: int = 1) -> Path:
    """Write ``entry``'s config.pbtxt with ``medseg.memory_bytes`` measured on its ONNX file (the
    probe reads the entry as the gateway will, so it is written once before it runs)."""
    from dataclasses import replace

    from export.triton_config import write_config

    write_config(repository, entry, "cpu", version=version)
    memory = measure_entry(replace(entry, path=Path(repository) / entry.name), version)
    log.info("%s: %.0f MiB loaded and run once (measured in a child process)", entry.name, memory / 2**20)
    return write_config(repository, replace(entry, gateway=replace(entry.gateway, memory_bytes=memory)), target,
                        version=version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.memory_probe", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps({"bytes": probe(args.folder, args.version)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
