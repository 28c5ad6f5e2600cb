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
