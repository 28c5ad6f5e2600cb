"""3-D overlap and surface metrics of binary masks, with the voxel spacing (MONAI).

Dice over the whole volume, and the normalised surface Dice (NSD) at a tolerance in mm as
the CVPR 2025 interactive 3-D challenge scores it: MONAI's ``compute_surface_dice`` on the
mask pair with the voxel spacing. Empty reference and empty prediction: 1.0 (nothing to
find, nothing found); one of them empty: 0.0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice

NSD_TOLERANCE_MM = 2.0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = pred.astype(bool), ref.astype(bool)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def nsd(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice of two bool arrays of the same shape; ``spacing_mm`` per axis."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    # crop to the union's bounding box (+1 voxel) so that the distance transforms stay small
    both = pred | ref
    lo = [max(0, int(np.flatnonzero(both.any(axis=tuple(j for j in range(both.ndim) if j != i)))[0]) - 1)
          for i in range(both.ndim)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(j for j in range(both.ndim) if j != i)))[-1]) + 2
          for i in range(both.ndim)]
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    p = torch.from_numpy(np.ascontiguousarray(pred[window]))[None, None].float()
    r = torch.from_numpy(np.ascontiguousarray(ref[window]))[None, None].float()
    value = compute_surface_dice(p, r, [float(tolerance_mm)], include_background=True,
                                 spacing=[float(s) for s in spacing_mm])
    return float(value.reshape(-1)[0])


def curve_auc(values: Sequence[float]) -> float:
    """Area under a per-interaction score curve (trapezoids, unit steps), normalised by its
    length so that a constant curve at v gives v."""
    values = list(values)
    if len(values) < 2:
        return float(values[0]) if values else 0.0
    return float(np.trapz(values) / (len(values) - 1))
