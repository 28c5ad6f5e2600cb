"""Start-up check: do the models fit the memory the gateway may use?

A model that does not fit would get the gateway killed by the kernel (or the pod's cgroup) in
the middle of loading it, or later, on its first large image. Instead the gateway refuses to
start with a message naming the models and the figures.

What an entry needs is ``medseg.memory_bytes`` in its config.pbtxt: the peak resident set it
added when loaded and run once, measured in a child process at export
(:mod:`export.memory_probe`); an entry without it (LiteMedSAM's committed configs, which must not
depend on the machine that exported them, or an older export) is estimated at
:data:`UNMEASURED_FACTOR` times its ONNX file. What the gateway may use is
``--memory-limit-bytes``, or by default the container's cgroup limit (``memory.max``, v2, or
``memory.limit_in_bytes``, v1), or without one the machine's RAM; what is left is that minus
the process's resident set before the models load.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from service.backends.repository import RepositoryEntry

# An unmeasured entry: its ONNX file times this (weights, arena, activations: LiteMedSAM's encoder
# measured 9.3x its file, its decoder 5.8x).
UNMEASURED_FACTOR = 10
_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class Need:
    name: str
    bytes: int
    measured: bool


def entry_need(entry: RepositoryEntry) -> Need:
    if entry.gateway.memory_bytes > 0:
        return Need(entry.name, entry.gateway.memory_bytes, True)
    path = entry.onnx_path() if entry.path is not None else None
    size = path.stat().st_size if path is not None and path.is_file() else 0
    return Need(entry.name, UNMEASURED_FACTOR * size, False)


def memory_limit(configured: int = 0) -> tuple[int, str]:
    """(bytes, where the figure comes from)."""
    if configured > 0:
        return configured, "--memory-limit-bytes"
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):  # "max" or a huge v1 figure: no limit
            return int(text), f"the container's cgroup limit ({path})"
    pages, size = _sysconf("SC_PHYS_PAGES"), _sysconf("SC_PAGE_SIZE")
    return pages * size, "the machine's RAM"


def _sysconf(name: str) -> int:
    import os

    return int(os.sysconf(name))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check(entries: Iterable[RepositoryEntry], configured_limit: int = 0, resident: int | None = None) -> str:
    """A line saying what the models need and what is left, or ``ValueError`` saying which do not fit."""
    needs = [entry_need(e) for e in entries]
    limit, source = memory_limit(configured_limit)
    resident = resident_bytes() if resident is None else resident
    left = limit - resident
    total = sum(n.bytes for n in needs)
    summary = ", ".join(f"{n.name} {mib(n.bytes)}{'' if n.measured else ' (estimated from its file)'}"
                        for n in sorted(needs, key=lambda n: -n.bytes)[:4])
    if total > left:
        raise ValueError(
            f"the models need about {mib(total)} loaded ({summary}{', ...' if len(needs) > 4 else ''}; measured at "
            f"export, medseg.memory_bytes) but {mib(max(left, 0))} of the {mib(limit)} memory limit ({source}) are "
            f"left after the gateway's own {mib(resident)}: remove the largest model from the repository, serve it "
            "on a node with more memory, or raise the limit (--memory-limit-bytes, the pod's memory limit)")
    return f"models need about {mib(total)} of the {mib(left)} left under {mib(limit)} ({source})"
