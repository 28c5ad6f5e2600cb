"""Cases of ``../shared/data`` (one ``.npz`` each: image, mask, meta JSON) for checks and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.core.domain import Box

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Case:
    """One 2-D image. ``image``: native intensities ``(H, W)`` (grey) or ``(H, W, 3)``;
    ``mask``: bool ``(H, W)`` reference (all False when unknown); ``meta``: free metadata."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def structure(self) -> str:
        return str(self.meta.get("structure", "unknown"))

    @property
    def spacing_mm(self) -> tuple[float, float]:
        spacing = self.meta.get("pixel_spacing_mm") or (1.0, 1.0)
        return float(spacing[0]), float(spacing[1])


def load_cases(folder: Path, limit: int | None = None) -> list[Case]:
    """Cases of a folder of ``.npz`` files (``image``, optional ``mask`` and ``meta`` JSON), sorted
    by file name, read with ``allow_pickle=False``; a missing mask is all False."""
    paths = sorted(Path(folder).glob("*.npz"))
    if not paths:
        raise FileNotFoundError(f"no .npz cases in {folder}")
    cases = []
    for path in paths[:limit]:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            mask = z["mask"].astype(bool) if "mask" in z.files else np.zeros(z["image"].shape[:2], bool)
            cases.append(Case(str(meta.get("case_id", path.stem)), z["image"], mask, meta))
    return cases


def reference_box(mask: np.ndarray) -> Box:
    """Tight API box (corner convention) around a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
