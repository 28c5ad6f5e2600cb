"""Weak annotations: the container, seeded simulators from full masks, and their files.

Coordinates are the gateway's API convention (continuous input-image pixels, origin at the
top-left *corner*: pixel (row i, column j) covers [j, j+1) x [i, i+1); see
:mod:`service.core.geometry`).

Simulators (each draws from ``numpy.random.default_rng([seed, crc32(case_id)])``, so a case's
annotation depends only on the seed and its id, never on the order of cases):

* **tight boxes**: one box per connected component of the mask (8-connectivity) with at
  least ``min_component`` pixels (all components when none is that big): the exact extent.
* **noisy boxes**: each side of a tight box moved by ``uniform(-r, r) * side length`` with
  ``r = noise`` (default 0.1), clipped to the image, at least one pixel wide.
* **scribbles**: foreground strokes are the skeleton (``skimage.morphology.skeletonize``) of
  each component eroded by ``margin`` pixels (the plain skeleton where erosion empties it),
  cut to the part within geodesic distance ``fraction * length`` of a random skeleton pixel;
  background strokes are the same cut of the ring at ``bg_distance`` pixels outside the mask
  (contour of the dilated mask), so background scribbles surround the structure, and of
  the skeleton of the far background (farther than ``2 * bg_distance`` from the mask,
  eroded by ``margin``), so they also reach the rest of the image. Stroke
  values: 1 foreground, 0 background, -1 unlabelled. Foreground strokes lie inside the
  mask, background strokes outside it, by construction.
* **points**: ``n_positive`` pixel centres drawn uniformly from the mask eroded by ``margin``
  (the mask itself where that is empty) and ``n_negative`` from the background band
  between ``margin`` and ``band`` pixels outside the mask (the whole background if empty).
* **image-level presence**: ``mask.any()``.
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

KINDS = ("boxes", "noisy_boxes", "scribbles", "points", "presence")
DEFAULT_KINDS = ("boxes", "scribbles", "points", "presence")  # noisy_boxes replaces boxes


@dataclass(frozen=True)
class WeakLabels:
    """Weak annotation of one case (any subset of the fields may be present).

    ``boxes``: float32 ``(K, 4)`` XYXY, API convention. ``scribbles``: int8 ``(H, W)``,
    1 foreground, 0 background, -1 unlabelled. ``points``: float32 ``(N, 2)`` (x, y), API
    convention (a pixel centre is ``(j + 0.5, i + 0.5)``); ``point_labels``: int8 ``(N,)``
    1 positive / 0 negative. ``present``: image-level label (structure visible or not).
    """

    case_id: str
    shape: tuple[int, int]
    boxes: np.ndarray | None = None
    scribbles: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    present: bool | None = None


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The generator for one case: depends on ``seed`` and ``case_id`` only."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def _components(mask: np.ndarray, min_component: int) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    comps = [labels == i for i in range(1, n + 1)]
    big = [c for c in comps if c.sum() >= min_component]
    return big or comps


def tight_boxes(mask: np.ndarray, min_component: int = 20) -> np.ndarray:
    """float32 ``(K, 4)``: one tight XYXY box per component (empty ``(0, 4)`` for an empty mask)."""
    boxes = []
    for comp in _components(np.asarray(mask, bool), min_component):
        rows, cols = np.flatnonzero(comp.any(axis=1)), np.flatnonzero(comp.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def noisy_boxes(mask: np.ndarray, rng: np.random.Generator, noise: float = 0.1,
                min_component: int = 20) -> np.ndarray:
    """Tight boxes with each side moved by ``uniform(-noise, noise) * side length`` (clipped)."""
    h, w = mask.shape
    out = []
    for x0, y0, x1, y1 in tight_boxes(mask, min_component):
        bw, bh = x1 - x0, y1 - y0
        d = rng.uniform(-noise, noise, size=4) * np.array([bw, bh, bw, bh])
        nx0, ny0 = np.clip(x0 + d[0], 0, w - 1), np.clip(y0 + d[1], 0, h - 1)
        nx1, ny1 = np.clip(x1 + d[2], nx0 + 1, w), np.clip(y1 + d[3], ny0 + 1, h)
        out.append([nx0, ny0, nx1, ny1])
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def _geodesic_cut(pixels: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """bool like ``pixels``: the 8-connected part within ``fraction * count`` steps of a random pixel."""
    coords = np.argwhere(pixels)
    if len(coords) == 0 or fraction >= 1.0:
        return pixels.copy()
    start = tuple(coords[rng.integers(len(coords))])
    limit = max(1, int(round(fraction * len(coords))))
    keep = np.zeros_like(pixels)
    keep[start] = True
    queue, seen = deque([(start, 0)]), {start}
    kept = 1
    while queue and kept < limit:
        (r, c), dist = queue.popleft()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                nb = (r + dr, c + dc)
                if nb in seen or not (0 <= nb[0] < pixels.shape[0] and 0 <= nb[1] < pixels.shape[1]):
                    continue
                if pixels[nb] and kept < limit:
                    seen.add(nb)
                    keep[nb] = True
                    kept += 1
                    queue.append((nb, dist + 1))
    return keep


def scribbles(mask: np.ndarray, rng: np.random.Generator, margin: int = 2, fraction: float = 0.7,
              bg_distance: int = 6, min_component: int = 20) -> np.ndarray:
    """int8 ``(H, W)`` scribble map (1 fg, 0 bg, -1 unlabelled); see module doc."""
    from skimage.morphology import skeletonize

    mask = np.asarray(mask, bool)
    out = np.full(mask.shape, -1, dtype=np.int8)
    if not mask.any():
        out[_geodesic_cut(_border_ring(mask.shape), rng, fraction)] = 0
        return out
    for comp in _components(mask, min_component):
        eroded = ndimage.binary_erosion(comp, iterations=margin, border_value=0)
        skeleton = skeletonize(eroded if eroded.any() else comp)
        out[_geodesic_cut(skeleton, rng, fraction) & comp] = 1
    dilated = ndimage.binary_dilation(mask, iterations=bg_distance)
    ring = dilated & ~ndimage.binary_erosion(dilated, border_value=1)
    ring &= ~mask
    if not ring.any():
        ring = _border_ring(mask.shape) & ~mask
    labels, n = ndimage.label(ring, structure=np.ones((3, 3), bool))
    for i in range(1, n + 1):
        out[_geodesic_cut(labels == i, rng, fraction)] = 0
    far = ndimage.binary_erosion(~ndimage.binary_dilation(mask, iterations=2 * bg_distance), iterations=margin,
                                 border_value=0)
    labels, n = ndimage.label(skeletonize(far), structure=np.ones((3, 3), bool))
    for i in range(1, n + 1):
        out[_geodesic_cut(labels == i, rng, fraction) & ~mask] = 0
    return out


def _border_ring(shape: tuple[int, int]) -> np.ndarray:
    ring = np.zeros(shape, bool)
    ring[[0, -1], :] = True
    ring[:, [0, -1]] = True
    return ring


def points(mask: np.ndarray, rng: np.random.Generator, n_positive: int = 3, n_negative: int = 3,
           margin: int = 2, band: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """(float32 ``(N, 2)`` pixel-centre (x, y), int8 ``(N,)`` labels 1/0); see module doc."""
    mask = np.asarray(mask, bool)
    coords, labels = [], []
    if mask.any():
        inner = ndimage.binary_erosion(mask, iterations=margin, border_value=0)
        pool = np.argwhere(inner if inner.any() else mask)
        for idx in rng.choice(len(pool), size=min(n_positive, len(pool)), replace=False):
            coords.append(pool[idx][::-1] + 0.5)
            labels.append(1)
        near = ndimage.binary_dilation(mask, iterations=band) & ~ndimage.binary_dilation(mask, iterations=margin)
    else:
        near = np.zeros_like(mask)
    pool = np.argwhere(near if near.any() else ~mask)
    for idx in rng.choice(len(pool), size=min(n_negative, len(pool)), replace=False):
        coords.append(pool[idx][::-1] + 0.5)
        labels.append(0)
    return np.asarray(coords, dtype=np.float32).reshape(-1, 2), np.asarray(labels, dtype=np.int8)


def simulate(case_id: str, mask: np.ndarray, kinds: tuple[str, ...] = DEFAULT_KINDS, seed: int = 0,
             box_noise: float = 0.1) -> WeakLabels:
    """All requested weak annotations of one case from its full mask (``kinds`` from :data:`KINDS`;
    ``noisy_boxes`` fills ``boxes`` with noisy boxes instead of tight ones). ``present`` is always set."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown weak-label kinds {sorted(unknown)}; choose from {KINDS}")
    rng = case_rng(seed, case_id)
    mask = np.asarray(mask, bool)
    labels = WeakLabels(case_id, (int(mask.shape[0]), int(mask.shape[1])), present=bool(mask.any()))
    # Each kind draws from its own child generator, so adding a kind never changes another.
    children = dict(zip(KINDS, rng.spawn(len(KINDS))))
    if "boxes" in kinds:
        labels = replace(labels, boxes=tight_boxes(mask))
    if "noisy_boxes" in kinds:
        labels = replace(labels, boxes=noisy_boxes(mask, children["noisy_boxes"], box_noise))
    if "scribbles" in kinds:
        labels = replace(labels, scribbles=scribbles(mask, children["scribbles"]))
    if "points" in kinds:
        pts, lab = points(mask, children["points"])
        labels = replace(labels, points=pts, point_labels=lab)
    return labels


# --------------------------------------------------------------------------- files
def save(labels: WeakLabels, folder: Path) -> Path:
    """Write ``folder/CASE_ID.npz`` (absent fields are not written)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"shape": np.asarray(labels.shape, np.int64)}
    for name in ("boxes", "scribbles", "points", "point_labels"):
        value = getattr(labels, name)
        if value is not None:
            arrays[name] = value
    if labels.present is not None:
        arrays["present"] = np.asarray(labels.present)
    path = folder / f"{labels.case_id}.npz"
    np.savez_compressed(path, **arrays)
    return path


def load(folder: Path, case_id: str) -> WeakLabels:
    """Read what :func:`save` wrote."""
    with np.load(Path(folder) / f"{case_id}.npz", allow_pickle=False) as z:
        get = {k: z[k] for k in z.files}
    present = bool(get["present"]) if "present" in get else None
    return WeakLabels(case_id, tuple(int(s) for s in get["shape"]), get.get("boxes"), get.get("scribbles"),
                      get.get("points"), get.get("point_labels"), present)


def load_coco(path: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, WeakLabels]:
    """Boxes and points from a COCO-style JSON, keyed by case id (image ``file_name`` stem).

    ``images``: ``{"id", "file_name", "height", "width"}``; ``annotations``: ``{"image_id",
    "bbox": [x, y, w, h]}`` (COCO: continuous pixels, top-left corner) and/or ``"keypoints":
    [x, y, v, ...]`` (``v > 0``: positive point) and/or the extension ``"points": [[x, y,
    label], ...]`` (label 1 positive, 0 negative). Images absent from ``shapes`` use their
    own ``height``/``width``.
    """
    doc = json.loads(Path(path).read_text())
    by_id = {}
    for image in doc.get("images", []):
        stem = Path(str(image["file_name"])).name
        for suffix in (".nii.gz", ".nii", ".png", ".npz", ".jpg", ".tif"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        shape = shapes.get(stem, (int(image.get("height", 0)), int(image.get("width", 0))))
        by_id[image["id"]] = (stem, shape)
    boxes: dict[str, list] = {}
    pts: dict[str, list] = {}
    for ann in doc.get("annotations", []):
        if ann["image_id"] not in by_id:
            raise ValueError(f"annotation {ann.get('id')} refers to unknown image_id {ann['image_id']}")
        stem = by_id[ann["image_id"]][0]
        if "bbox" in ann:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.setdefault(stem, []).append([x, y, x + w, y + h])
        kp = ann.get("keypoints") or []
        for i in range(0, len(kp) - 2, 3):
            if kp[i + 2] > 0:
                pts.setdefault(stem, []).append([kp[i], kp[i + 1], 1])
        for x, y, label in ann.get("points", []):
            pts.setdefault(stem, []).append([x, y, int(label)])
    out = {}
    for stem, shape in by_id.values():
        p = np.asarray(pts.get(stem, []), dtype=np.float32).reshape(-1, 3)
        out[stem] = WeakLabels(stem, shape, np.asarray(boxes.get(stem, []), np.float32).reshape(-1, 4),
                               None, p[:, :2].copy(), p[:, 2].astype(np.int8),
                               present=bool(stem in boxes or (p[:, 2] > 0).any()))
    return out


def load_scribble_png(path: Path) -> np.ndarray:
    """int8 ``(H, W)`` scribble map from a label PNG: 0 unlabelled, 1 background, 2 foreground."""
    from PIL import Image

    with Image.open(path) as im:
        values = np.asarray(im.convert("L"))
    out = np.full(values.shape, -1, dtype=np.int8)
    out[values == 1] = 0
    out[values == 2] = 1
    return out
