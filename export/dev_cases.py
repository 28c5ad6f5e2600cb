"""Cases of ``../shared/data`` (one ``.npz`` each: image, mask, meta JSON) for checks and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.domain import Box

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Case:
    case_id: str
    image: np.ndarray  # native intensities, uint8 or int16 (H, W)
    mask: np.ndarray   # bool (H, W)
    meta: dict

    @property
    def structure(self) -> str:
        return str(self.meta.get("structure", "unknown"))


def load_cases(folder: Path, limit: int | None = None) -> list[Case]:
    paths = sorted(Path(folder).glob("*.npz"))
    if not paths:
        raise FileNotFoundError(f"no .npz cases in {folder}")
    cases = []
    for path in paths[:limit]:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            cases.append(Case(meta.get("case_id", path.stem), z["image"], z["mask"].astype(bool), meta))
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
