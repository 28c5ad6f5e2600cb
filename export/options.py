"""Options shared by every exporter (``python -m export VARIANT ...``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportOptions:
    repository: Path
    target: str = "cpu"
    cache_dir: Path = Path(".cache")
    version: int = 1
    force: bool = False
    guard_cases: int | None = None  # dev cases for a variant's Dice guard (None: all)
    data_dir: Path | None = None  # dev cases of the checks (None: ../shared/data/dev; none there: shipped images)
    check_cases: int | None = 8  # images of the PyTorch parity check (None: all; 0: skip)
    # ``python -m export sam``: a site's checkpoint, its architecture, the served name, the preprocessing
    checkpoint: Path | None = None
    sam_variant: str = "vit_b"
    name: str = ""
    preprocessing: str = ""
