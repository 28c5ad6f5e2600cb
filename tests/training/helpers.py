"""Small synthetic cases for the training tests."""

from __future__ import annotations

import numpy as np

from training.data import Case


def two_blobs(h: int = 64, w: int = 80) -> np.ndarray:
    """bool (h, w): a disk and a rectangle, apart."""
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 20) ** 2 + (xx - 20) ** 2 <= 10 ** 2
    rect = (yy >= 30) & (yy < 52) & (xx >= 45) & (xx < 70)
    return disk | rect


def synthetic_case(case_id: str = "synth_000", seed: int = 0) -> Case:
    """Bright structures on a darker noisy background (uint8)."""
    mask = two_blobs()
    rng = np.random.default_rng(seed)
    image = np.where(mask, 180, 60) + rng.normal(0, 8, mask.shape)
    return Case(case_id, np.clip(image, 0, 255).astype(np.uint8), mask,
                {"case_id": case_id, "structure": "blob", "pixel_spacing_mm": [1.0, 1.0]})
