"""Simulated correction clicks on one slice: where a user clicks to fix a 2-D mask.

The rule of the CVPR 2025 interactive 3-D segmentation challenge's simulator
(``CVPR25_iter_eval.py`` of JunMa11/CVPR-MedSegFMCompetition), on one slice: take the largest
connected error region and click at its *centre*, the pixel farthest from the region's
boundary (the maximum of the Euclidean distance transform of the region, the image's border
counting as boundary); a positive click where the mask missed the structure (false
negative), a negative one where it covers background (false positive).

Two details differ from the challenge's script, on purpose: false-negative and
false-positive regions are components of their own (the larger of the largest of each
wins; a tie goes to the false negative), so the click's sign always matches the region it
is in; and of several pixels equally far from the boundary the first in raster order is
taken (the challenge draws one with a fixed seed), so that the click is a pure function of
the two masks. Components are 8-connected (the 2-D form of the challenge's 26-connectivity).

The simulated user of the evaluation (bench/evaluate_volumes.py ``--corrections-as clicks``),
so it lives in bench/, not in the gateway: scipy comes from requirements/training.txt, not the
gateway image's runtime (requirements/base.txt).
"""

from __future__ import annotations

import numpy as np

from service.core.domain import Point

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component(region: np.ndarray) -> np.ndarray:
    """bool mask of the largest 8-connected component of ``region`` (ties: the component
    whose first pixel comes first in raster order); all False when ``region`` is empty."""
    from scipy import ndimage

    labels, count = ndimage.label(region, structure=EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(region.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def centre(region: np.ndarray) -> tuple[int, int]:
    """(row, column) of the pixel of non-empty ``region`` farthest from its boundary: the
    maximum of its Euclidean distance transform, pixels outside the image counting as
    outside the region; ties: the first in raster order."""
    if not region.any():
        raise ValueError("an empty region has no centre")
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def correction_click(mask: np.ndarray, reference: np.ndarray) -> Point | None:
    """The click that corrects ``mask`` towards ``reference`` (both bool ``(H, W)``, one
    slice): positive at the centre of the largest false-negative component, or negative at
    the centre of the largest false-positive one, whichever component is larger; at the
    pixel's centre in continuous pixel coordinates (``x = column + 0.5``). None when the
    masks agree."""
    mask, reference = np.asarray(mask, dtype=bool), np.asarray(reference, dtype=bool)
    if mask.shape != reference.shape or mask.ndim != 2:
        raise ValueError(f"two masks of one slice are needed, got {mask.shape} and {reference.shape}")
    missed = largest_component(reference & ~mask)
    extra = largest_component(mask & ~reference)
    n_missed, n_extra = int(missed.sum()), int(extra.sum())
    if n_missed == 0 and n_extra == 0:
        return None
    positive = n_missed >= n_extra
    row, col = centre(missed if positive else extra)
    return Point(col + 0.5, row + 0.5, positive)
