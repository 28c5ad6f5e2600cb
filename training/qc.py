"""Quality control of weak annotations: flag those that disagree with the image.

Checks (thresholds in :class:`QCThresholds`, all documented in docs/TRAINING.md):

* ``empty_pseudo_mask``: LiteMedSAM finds nothing inside a box;
* ``box_mismatch``: the bounding box of LiteMedSAM's mask inside a box has IoU below
  ``min_box_iou`` with that box (a tight box should be filled edge to edge);
* ``low_predicted_iou``: LiteMedSAM's own IoU prediction is below ``min_predicted_iou``;
* ``scribble_crosses_edge``: strong image edges (Sobel magnitude above the image's
  ``edge_quantile``) cut a foreground stroke into parts of clearly different intensity
  (medians differ by more than ``min_contrast`` of the normalised range): a stroke drawn
  across the structure's border into another tissue;

A flagged box is not trusted for pseudo-labels: its inside becomes "uncertain" (ignored).

:func:`write_report` writes ``qc.json`` (machine-readable) and ``qc.md`` (a table for a
human reviewer) plus one PNG overlay per flagged case (image, box in red, LiteMedSAM mask
in green, scribbles in yellow/blue).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from service.core.imageio import normalise
from training.pseudo_labels import PseudoLabel, box_region


@dataclass(frozen=True)
class QCThresholds:
    min_box_iou: float = 0.5
    min_predicted_iou: float = 0.5
    edge_quantile: float = 0.97
    min_contrast: float = 0.25


@dataclass(frozen=True)
class Flag:
    case_id: str
    check: str
    index: int  # box or stroke number
    value: float
    threshold: float
    detail: str = ""


@dataclass
class CaseQC:
    case_id: str
    flags: list[Flag] = field(default_factory=list)

    @property
    def rejected_boxes(self) -> np.ndarray:
        return np.array(sorted({f.index for f in self.flags if f.check != "scribble_crosses_edge"}), dtype=int)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """float ``(4,)`` tight XYXY API box of a bool mask, None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two XYXY boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def check_boxes(case_id: str, boxes: np.ndarray, pseudo: PseudoLabel,
                t: QCThresholds = QCThresholds()) -> list[Flag]:
    """Flags for each XYXY box (``(K, 4)``) against LiteMedSAM's answer to it."""
    flags = []
    for k, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        mask = pseudo.box_masks[k]
        found = mask_box(mask)
        if found is None:
            flags.append(Flag(case_id, "empty_pseudo_mask", k, 0.0, 1.0, f"box {box.round(1).tolist()}"))
            continue
        overlap = box_iou(found, box)
        if overlap < t.min_box_iou:
            flags.append(Flag(case_id, "box_mismatch", k, overlap, t.min_box_iou,
                              f"box {box.round(1).tolist()} vs mask extent {found.tolist()}"))
        if float(pseudo.ious[k]) < t.min_predicted_iou:
            flags.append(Flag(case_id, "low_predicted_iou", k, float(pseudo.ious[k]), t.min_predicted_iou))
    return flags


def edge_map(image: np.ndarray, quantile: float) -> np.ndarray:
    """bool ``(H, W)``: strong edges, Sobel magnitude of the normalised, lightly smoothed image
    above its ``quantile``."""
    pixels = normalise(np.asarray(image), None)
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    smooth = ndimage.gaussian_filter(pixels, 1.0)
    magnitude = np.hypot(ndimage.sobel(smooth, axis=0), ndimage.sobel(smooth, axis=1))
    if not magnitude.any():
        return np.zeros(magnitude.shape, bool)
    return (magnitude >= np.quantile(magnitude, quantile)) & (magnitude > 0)


def check_scribbles(case_id: str, image: np.ndarray, scribbles: np.ndarray,
                    t: QCThresholds = QCThresholds()) -> list[Flag]:
    """Flags for foreground strokes (8-connected parts of ``scribbles == 1``) that cross a
    strong edge: strong-edge pixels cut the stroke into pieces (>= 3 pixels each) whose
    median normalised intensities differ by more than ``min_contrast``."""
    pixels = normalise(np.asarray(image), None)
    pixels = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    edges = edge_map(image, t.edge_quantile)
    eight = np.ones((3, 3), bool)
    strokes, n = ndimage.label(np.asarray(scribbles) == 1, structure=eight)
    flags = []
    for i in range(1, n + 1):
        stroke = strokes == i
        pieces, m = ndimage.label(stroke & ~edges, structure=eight)
        medians = [float(np.median(pixels[pieces == j])) for j in range(1, m + 1) if (pieces == j).sum() >= 3]
        if len(medians) < 2:
            continue
        contrast = max(medians) - min(medians)
        if contrast > t.min_contrast:
            flags.append(Flag(case_id, "scribble_crosses_edge", i - 1, contrast, t.min_contrast,
                              f"{int(stroke.sum())} px stroke cut by edges into {len(medians)} parts"))
    return flags


def overlay(image: np.ndarray, boxes: np.ndarray | None, mask: np.ndarray | None,
            scribbles: np.ndarray | None) -> np.ndarray:
    """uint8 ``(H, W, 3)`` review picture: grey image, mask green, boxes red, scribbles
    yellow (fg) / blue (bg)."""
    grey = normalise(np.asarray(image), None)
    grey = grey.mean(axis=2) if grey.ndim == 3 else grey
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None:
        rgb[mask] = (0.5 * rgb[mask] + 0.5 * np.array([0, 255, 0])).astype(np.uint8)
    if scribbles is not None:
        rgb[scribbles == 1] = (255, 255, 0)
        rgb[scribbles == 0] = (0, 128, 255)
    for box in [] if boxes is None else np.asarray(boxes).reshape(-1, 4):
        inside = box_region(box, grey.shape)
        edge = inside & ~ndimage.binary_erosion(inside)
        rgb[edge] = (255, 0, 0)
    return rgb


def write_report(results: list[CaseQC], folder: Path, pictures: dict[str, np.ndarray] | None = None,
                 t: QCThresholds = QCThresholds()) -> Path:
    """``folder/qc.json``, ``folder/qc.md`` and ``folder/CASE.png`` for flagged cases; returns qc.md."""
    folder.mkdir(parents=True, exist_ok=True)
    flagged = [r for r in results if r.flags]
    (folder / "qc.json").write_text(json.dumps({
        "thresholds": asdict(t), "cases": len(results), "flagged_cases": len(flagged),
        "flags": [asdict(f) for r in flagged for f in r.flags]}, indent=1))
    lines = ["# Weak-annotation quality control", "",
             f"{len(flagged)} of {len(results)} cases flagged. Thresholds: "
             + ", ".join(f"{k}={v}" for k, v in asdict(t).items()) + ".", "",
             "| case | check | box/stroke | value | threshold | detail | picture |", "|---|---|---|---|---|---|---|"]
    for r in flagged:
        for f in r.flags:
            pic = f"[{r.case_id}.png]({r.case_id}.png)" if pictures and r.case_id in pictures else ""
            lines.append(f"| {f.case_id} | {f.check} | {f.index} | {f.value:.3f} | {f.threshold} | {f.detail} | {pic} |")
    if pictures:
        from PIL import Image

        for case_id, rgb in pictures.items():
            picture = Image.fromarray(rgb)
            zoom = max(1, 512 // max(picture.size))  # small slices are hard to review at 1:1
            picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST).save(
                folder / f"{case_id}.png")
    path = folder / "qc.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- volume propagation drift
@dataclass(frozen=True)
class DriftThresholds:
    """Propagation drift checks of a volume pseudo-label (:func:`check_propagation`)."""

    max_area_ratio: float = 2.0    # neighbouring slices' mask areas differ by more than this factor
    min_iou: float = 0.5           # a slice's predicted IoU below this
    extent_margin: int = 0         # slices the mask may run past the reference's slice extent


def check_propagation(case_id: str, records: Sequence, depth: int, extent: tuple[int, int] | None = None,
                      t: DriftThresholds = DriftThresholds()) -> list[Flag]:
    """Drift flags of one structure's propagated masks. ``records``: per-slice objects with
    ``slice_index``, ``iou`` and ``area`` (:class:`training.volume_pseudo_labels.SliceRecord`);
    ``depth``: the volume's slice count; ``extent``: the reference structure's (first, last)
    slice when known. ``Flag.index`` is the slice index.

    * ``area_jump``: two neighbouring slices (indices k, k+1, both with a mask) whose areas
      differ by more than ``max_area_ratio`` (value: the ratio; index: the smaller-area slice
      of the two);
    * ``iou_collapse``: predicted IoU below ``min_iou``;
    * ``beyond_extent``: the mask reaches more than ``extent_margin`` slices past ``extent``
      (one flag per side; value: how many slices; index: the outermost slice);
    * ``runs_to_volume_end``: a mask on the first or last slice of the volume.
    """
    by_slice = {int(r.slice_index): r for r in records if int(r.area) > 0}
    flags = []
    for k in sorted(by_slice):
        r = by_slice[k]
        if float(r.iou) < t.min_iou:
            flags.append(Flag(case_id, "iou_collapse", k, float(r.iou), t.min_iou))
        nxt = by_slice.get(k + 1)
        if nxt is not None:
            small, big = sorted((int(r.area), int(nxt.area)))
            ratio = big / small
            if ratio > t.max_area_ratio:
                at = k if int(r.area) == small else k + 1
                flags.append(Flag(case_id, "area_jump", at, ratio, t.max_area_ratio,
                                  f"slices {k}-{k + 1}: {int(r.area)} -> {int(nxt.area)} px"))
    if by_slice and extent is not None:
        first, last = min(by_slice), max(by_slice)
        if first < extent[0] - t.extent_margin:
            flags.append(Flag(case_id, "beyond_extent", first, float(extent[0] - first), float(t.extent_margin),
                              f"mask from slice {first}, reference from {extent[0]}"))
        if last > extent[1] + t.extent_margin:
            flags.append(Flag(case_id, "beyond_extent", last, float(last - extent[1]), float(t.extent_margin),
                              f"mask up to slice {last}, reference up to {extent[1]}"))
    for end in sorted({0, depth - 1}):
        if end in by_slice:
            flags.append(Flag(case_id, "runs_to_volume_end", end, 1.0, 0.0, f"mask on slice {end} of {depth}"))
    return flags


def write_volume_report(case_id: str, flags: list[Flag], folder: Path, pictures: dict[int, np.ndarray],
                        key_slices: Sequence[int] = (), t: DriftThresholds = DriftThresholds()) -> Path:
    """:func:`write_report` of one structure's drift ``flags``, one "case" per flagged slice
    (``CASE_zKKK``), and ``pictures`` (slice index -> :func:`overlay` RGB) as ``CASE_zKKK.png``;
    the key slices' pictures are listed below the table. Returns qc.md."""
    def cid(k: int) -> str:
        return f"{case_id}_z{int(k):03d}"

    slices = sorted({f.index for f in flags})
    results = [CaseQC(cid(k), [replace(f, case_id=cid(k)) for f in flags if f.index == k]) for k in slices]
    path = write_report(results, folder, {cid(k): rgb for k, rgb in pictures.items()}, t)  # type: ignore[arg-type]
    keys = [k for k in key_slices if k in pictures]
    if keys:
        with path.open("a") as out:
            out.write("\nKey slices (box red, pseudo-label green): "
                      + ", ".join(f"[{k}]({cid(k)}.png)" for k in keys) + "\n")
    return path
