"""Volume pseudo-labels from one box per structure, propagated by the served predictor.

A person draws one box (or a box on 2, 3, 5 *key slices*) per structure; the gateway's own
3-D algorithm (:class:`service.inference.volume_predictor.Segment`: anchors, re-anchoring
between them, propagation beyond them, the same :class:`~service.inference.propagation.Rules`)
turns it into slice masks; this module makes a training label of them:

* **key slices** (:func:`key_slices_of`): one key slice is the reference's slice of largest
  area (where a person draws the box); ``n > 1`` key slices are evenly spaced over the
  reference's slice extent ``[first, last]`` at ``first + (last - first) * (i + 0.5) / n``
  (centred: no box on a one-voxel tip), each moved to the nearest slice with reference pixels;
  ``key_slices=EVERY_SLICE`` (:func:`volume_pseudo_label`) is a box on *every* slice that shows
  the structure: each slice is LiteMedSAM inside its own box (the seeds' box -> SAM pseudo-label),
  nothing is propagated, and the slices beyond the boxed ones are background (the annotator
  said where the structure ends), not uncertain;
* **boxes** (:func:`drawn_box`): the reference's tight box on the key slice, optionally
  jittered by the noisy-box simulator of :mod:`training.weak_labels` (each side moved by
  ``uniform(-jitter, jitter)`` x its side length), seeded per key slice;
* **label**: uint8 ``{0, 1}`` on the input's voxel grid (:meth:`Volume.mask_array`);
* **uncertain** (bool, same grid; ignored by the losses), :func:`uncertain_slices` and
  :func:`edge_band`: every slice whose predicted IoU is below ``min_iou``; at each side where
  propagation stopped, its last kept slice and the slice after it (the mask may end too early
  or too late there; where a side ran to the end of its slice range, only the slice after
  it: no stop rule rejected anything); the slices outside the segment's ``bounds`` (never
  looked at); and on
  every slice a band of ``edge_px`` pixels around the mask edge (in-plane dilation minus
  erosion, 3x3 cross iterated ``edge_px`` times).

All masks in the rule functions are bool ``(Z, H, W)`` in the volume's *model orientation*
(slice ``k`` is ``masks[k]``); only :func:`volume_pseudo_label`'s result is on the input grid.
Files (:func:`save` / :func:`load`): ``NAME_label.nii.gz`` and ``NAME_uncertain.nii.gz``
(uint8, the volume's affine) and ``NAME.json`` (per-slice records, stops, key slices, boxes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from service.core.domain import Box
from service.core.volume import Volume
from service.inference import propagation as prop
from service.inference.predictor import SamPredictor
from service.inference.volume_predictor import Segment, VolumePredictor
from training import qc
from training import weak_labels as wl

KEY_SLICES = (1, 2, 3, 5)
EVERY_SLICE = -1          # key_slices: a box on every slice with reference pixels (no propagation)
RANGE_END = "range end"   # propagation's stop reason where the slice range ended


@dataclass(frozen=True)
class UncertainRules:
    """Which voxels of a volume pseudo-label the losses ignore (see the module doc)."""

    min_iou: float = 0.5       # a slice whose predicted IoU is below this is uncertain
    edge_px: int = 2           # band half-width around the mask edge, in-plane pixels
    stop_slices: bool = True   # the last kept slice and the next one at each stopped side
    # the slices outside the segment's bounds are uncertain (never looked at); False where the
    # bounds are what the annotator said (a box on every slice: beyond them is background)
    outside_bounds: bool = True


@dataclass(frozen=True)
class SliceRecord:
    """One segmented slice. ``source``: "anchor", "between" or "tail below/above";
    ``stop``: why propagation stopped after this slice (its side's last slice), else ""."""

    slice_index: int
    iou: float
    area: int
    source: str
    stop: str = ""


@dataclass(frozen=True)
class Stop:
    """One side of propagation: from anchor ``anchor`` towards ``step`` (-1 / +1), last kept
    slice ``last`` (the anchor itself when no slice was kept), ``reason`` as propagation says."""

    anchor: int
    step: int
    last: int
    reason: str


@dataclass(frozen=True)
class VolumePseudoLabel:
    """``label``: uint8 ``input_shape`` {0, 1}; ``uncertain``: bool ``input_shape``; ``affine``:
    4x4 RAS mm of the input grid. ``key_slices`` and ``boxes`` (XYXY) are in model orientation.
    ``masks``: the bool ``(Z, H, W)`` model-orientation masks (not saved; None after :func:`load`)."""

    name: str
    label: np.ndarray
    uncertain: np.ndarray
    affine: np.ndarray
    records: tuple[SliceRecord, ...]
    stops: tuple[Stop, ...]
    key_slices: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    bounds: tuple[int, int]
    reference_extent: tuple[int, int] | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    masks: np.ndarray | None = None


# --------------------------------------------------------------------------- pure rules
def key_slices_of(areas: np.ndarray, n: int = 1) -> list[int]:
    """Key slices of a reference with per-slice ``areas`` ``(Z,)`` (rules in the module doc)."""
    areas = np.asarray(areas)
    present = np.flatnonzero(areas > 0)
    if present.size == 0:
        raise ValueError("the reference mask is empty: no slice to draw a box on")
    if n < 1:
        raise ValueError(f"key_slices must be at least 1, got {n}")
    if n == 1:
        return [int(np.argmax(areas))]
    first, last = int(present[0]), int(present[-1])
    out: list[int] = []
    for i in range(n):
        target = first + (last - first) * (i + 0.5) / n
        k = int(present[np.argmin(np.abs(present - target))])
        if k not in out:
            out.append(k)
    return sorted(out)


def drawn_box(mask: np.ndarray, jitter: float | None = None, rng: np.random.Generator | None = None) -> Box:
    """The box a person draws around bool ``(H, W)`` ``mask``: its tight box, or with ``jitter``
    the noisy-box simulator's (:func:`training.weak_labels.noisy_boxes`) on that box's region."""
    tight = prop.bounding_box(mask)
    if not jitter:
        return tight
    region = np.zeros(mask.shape, bool)
    region[int(tight.y0):int(tight.y1), int(tight.x0):int(tight.x1)] = True
    x0, y0, x1, y1 = wl.noisy_boxes(region, rng if rng is not None else np.random.default_rng(0), jitter,
                                    min_component=1)[0]
    return Box(float(x0), float(y0), float(x1), float(y1))


def edge_band(masks: np.ndarray, edge_px: int) -> np.ndarray:
    """bool like ``masks`` ``(Z, H, W)``: per slice, dilation minus erosion of the mask by a 3x3
    cross iterated ``edge_px`` times (in-plane only; slices do not mix). ``edge_px`` 0: empty."""
    masks = np.asarray(masks, bool)
    if edge_px <= 0 or not masks.any():
        return np.zeros(masks.shape, bool)
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)
    grown = ndimage.binary_dilation(masks, cross, iterations=edge_px)
    shrunk = ndimage.binary_erosion(masks, cross, iterations=edge_px, border_value=1)
    return grown & ~shrunk


def uncertain_slices(records: Sequence[SliceRecord], stops: Sequence[Stop], depth: int,
                     bounds: tuple[int, int], rules: UncertainRules = UncertainRules()) -> list[int]:
    """Slices that are uncertain as a whole (low predicted IoU, stop slices, outside ``bounds``)."""
    out = {r.slice_index for r in records if r.iou < rules.min_iou}
    if rules.stop_slices:
        for s in stops:
            if s.reason != RANGE_END:   # the caller's range (or the volume) ended: no model stop
                out.add(s.last)
            if 0 <= s.last + s.step < depth:
                out.add(s.last + s.step)
    if rules.outside_bounds:
        out.update(k for k in range(depth) if not bounds[0] <= k <= bounds[1])
    return sorted(k for k in out if 0 <= k < depth)


def uncertain_mask(masks: np.ndarray, records: Sequence[SliceRecord], stops: Sequence[Stop],
                   bounds: tuple[int, int], rules: UncertainRules = UncertainRules()) -> np.ndarray:
    """bool ``(Z, H, W)``: the whole of :func:`uncertain_slices` plus :func:`edge_band`."""
    out = edge_band(masks, rules.edge_px)
    out[uncertain_slices(records, stops, len(masks), bounds, rules)] = True
    return out


def records_of(state: prop.State, results: dict[tuple, prop.PieceResult]) -> tuple[list[SliceRecord], list[Stop]]:
    """Per-slice records (slice order) and the stops of each tail of a segment's ``state``."""
    pieces = prop.plan(state)
    stops = []
    last_of: dict[int, str] = {}
    for piece in pieces:
        if piece.kind != "tail":
            continue
        got = results[piece.key].slices
        last = max(got, key=lambda k: k * piece.step) if got else piece.start[0]
        stops.append(Stop(piece.start[0], piece.step, last, results[piece.key].stop_reason))
        last_of[last] = results[piece.key].stop_reason if not last_of.get(last) else \
            last_of[last] + "; " + results[piece.key].stop_reason
    records = []
    for piece in pieces:
        source = piece.kind if piece.kind != "tail" else f"tail {'below' if piece.step < 0 else 'above'}"
        for k, r in results[piece.key].slices.items():
            records.append(SliceRecord(int(k), float(r.iou), int(r.area), source, last_of.get(k, "")))
    return sorted(records, key=lambda r: r.slice_index), stops


# --------------------------------------------------------------------------- references
def reference_slices(reference: Volume | np.ndarray, volume: Volume) -> np.ndarray:
    """bool ``(Z, H, W)`` in ``volume``'s model orientation: a reference mask loaded as a
    :class:`Volume` from a file on the same grid, or already a model-orientation array."""
    if isinstance(reference, Volume):
        ref = np.stack([reference.mask_to_model(reference.voxels[k] > 0) for k in range(reference.depth)])
    else:
        ref = np.asarray(reference) > 0
    if ref.shape != (volume.depth, *volume.slice_shape):
        raise ValueError(f"reference {ref.shape} does not fit the volume {(volume.depth, *volume.slice_shape)}")
    return ref


def extent(masks: np.ndarray) -> tuple[int, int] | None:
    """(first, last) slice with pixels of bool ``(Z, H, W)``, None when empty."""
    got = np.flatnonzero(np.asarray(masks).reshape(len(masks), -1).any(axis=1))
    return (int(got[0]), int(got[-1])) if got.size else None


# --------------------------------------------------------------------------- the label
def volume_pseudo_label(vp_or_predictor: VolumePredictor | SamPredictor, volume: Volume,
                        reference_or_box: Volume | np.ndarray | tuple[int, Box], *, key_slices: int = 1,
                        keys: Sequence[int] | None = None,
                        jitter: float | None = None, seed: int = 0, bounds: tuple[int, int] | None = None,
                        rules: UncertainRules = UncertainRules(), propagation: prop.Rules = prop.Rules(),
                        name: str = "structure") -> VolumePseudoLabel:
    """One structure's volume pseudo-label.

    ``reference_or_box``: the reference mask (a :class:`Volume` of its NIfTI, or bool
    ``(Z, H, W)`` model orientation), from which the box(es) are simulated; or ``(k, box)``:
    a box a person drew on slice ``k``, XYXY in that slice's *input-convention* pixels (one
    key slice; ``key_slices`` and ``jitter`` then do not apply). ``bounds``: the slice range
    propagation may cover (default the whole volume). ``keys``: explicit key slices (model
    orientation) instead of the rule of :func:`key_slices_of` (``key_slices`` then does not
    apply; :mod:`training.key_slices` chooses them): the reference's box is drawn on each one
    that has reference pixels, and one without gets no box (a person sees nothing there).
    A :class:`SamPredictor` is wrapped in a
    :class:`VolumePredictor` with ``propagation``; a given ``VolumePredictor`` keeps its rules
    (and its cached slice embeddings).
    """
    vp = vp_or_predictor if isinstance(vp_or_predictor, VolumePredictor) else \
        VolumePredictor(vp_or_predictor, volume, propagation)
    if isinstance(reference_or_box, tuple):
        k, box = reference_or_box
        anchors = [(int(k), volume.box_to_model(box))]
        ref_extent = None
    else:
        ref = reference_slices(reference_or_box, volume)
        if keys is None and key_slices == EVERY_SLICE:
            keys = [int(k) for k in np.flatnonzero(ref.reshape(len(ref), -1).any(axis=1))]
            if bounds is None and keys:
                bounds = (keys[0], keys[-1])         # the boxes say where the structure is
            rules = replace(rules, outside_bounds=False)
        elif keys is None:
            keys = key_slices_of(ref.reshape(len(ref), -1).sum(axis=1), key_slices)
        else:
            keys = sorted({int(k) for k in keys})
            if keys and not 0 <= keys[0] <= keys[-1] < len(ref):
                raise ValueError(f"key slices {keys} outside the volume's {len(ref)} slices")
            keys = [k for k in keys if ref[k].any()]
        anchors = [(k, drawn_box(ref[k], jitter, wl.case_rng(seed, f"{name}:{k}"))) for k in keys]
        ref_extent = extent(ref)
    lo, hi = bounds if bounds is not None else (0, volume.depth - 1)
    start = time.perf_counter()
    if key_slices == EVERY_SLICE and not isinstance(reference_or_box, tuple):
        # every boxed slice is an anchor; a slice between them the annotator left unboxed (no
        # reference pixels) is erased: nothing is propagated, one pass over the whole state
        boxed = {k for k, _ in anchors}
        state = prop.State(tuple(sorted(anchors)), frozenset(k for k in range(lo, hi + 1) if k not in boxed), (lo, hi))
        results = vp.run(state)
        masks = vp.masks(results)
        records, stops = records_of(state, results)
    else:
        segment = Segment(vp, (lo, hi))
        masks = np.zeros((volume.depth, *volume.slice_shape), bool)
        for k, box in anchors:
            masks = segment.apply(prop.Interaction(k, box))
        records, stops = records_of(segment.state, segment.results)
    seconds = time.perf_counter() - start
    unc = uncertain_mask(masks, records, stops, (lo, hi), rules)
    label = volume.mask_array({k: masks[k] for k in range(volume.depth) if masks[k].any()})
    uncertain = volume.mask_array({k: unc[k] for k in range(volume.depth) if unc[k].any()}).astype(bool)
    return VolumePseudoLabel(
        name, label, uncertain, np.asarray(volume.affine, np.float64), tuple(records), tuple(stops),
        tuple(k for k, _ in anchors), tuple((b.x0, b.y0, b.x1, b.y1) for _, b in anchors), (lo, hi), ref_extent,
        {"key_slices": len(anchors), "jitter": jitter, "seed": seed, **asdict(rules)}, seconds, masks)


# --------------------------------------------------------------------------- quality control
def drift_flags(pl: VolumePseudoLabel, depth: int, t: qc.DriftThresholds = qc.DriftThresholds()) -> list[qc.Flag]:
    """:func:`training.qc.check_propagation` of ``pl``'s records (its reference extent when known)."""
    return qc.check_propagation(pl.name, pl.records, depth, pl.reference_extent, t)


def write_qc(pl: VolumePseudoLabel, volume: Volume, folder: Path,
             t: qc.DriftThresholds = qc.DriftThresholds()) -> tuple[list[qc.Flag], Path]:
    """Drift flags and their report (:func:`training.qc.write_volume_report`): pictures of the
    key slices and of every flagged slice (model orientation; the nearest key slice's box in red,
    the pseudo-label in green). Needs ``pl.masks`` (a label just made, not a loaded one)."""
    if pl.masks is None:
        raise ValueError("the report needs the label's model-orientation masks: make it, do not load it")
    flags = drift_flags(pl, volume.depth, t)
    pictures = {}
    for k in sorted(set(pl.key_slices) | {f.index for f in flags}):
        nearest = int(np.argmin([abs(k - a) for a in pl.key_slices]))
        pictures[k] = qc.overlay(volume.slice_pixels(k), np.asarray(pl.boxes[nearest]), pl.masks[k], None)
    return flags, qc.write_volume_report(pl.name, flags, Path(folder), pictures, pl.key_slices, t)


# --------------------------------------------------------------------------- files
def save(pl: VolumePseudoLabel, folder: Path) -> Path:
    """``folder/NAME_label.nii.gz``, ``NAME_uncertain.nii.gz`` and ``NAME.json``; returns the JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, data in (("label", pl.label), ("uncertain", pl.uncertain)):
        image = nib.Nifti1Image(np.asarray(data, np.uint8), pl.affine)
        image.header.set_data_dtype(np.uint8)
        image.header.set_xyzt_units("mm")
        nib.save(image, folder / f"{pl.name}_{suffix}.nii.gz")
    meta = {"name": pl.name, "bounds": list(pl.bounds), "key_slices": list(pl.key_slices),
            "boxes_model_xyxy": [list(b) for b in pl.boxes],
            "reference_extent": list(pl.reference_extent) if pl.reference_extent else None,
            "settings": pl.settings, "seconds": pl.seconds,
            "stops": [asdict(s) for s in pl.stops], "slices": [asdict(r) for r in pl.records]}
    path = folder / f"{pl.name}.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def load(folder: Path, name: str) -> VolumePseudoLabel:
    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text())
    label = nib.load(folder / f"{name}_label.nii.gz")
    uncertain = nib.load(folder / f"{name}_uncertain.nii.gz")
    return VolumePseudoLabel(
        name, np.asarray(label.dataobj, np.uint8), np.asarray(uncertain.dataobj) > 0,
        np.asarray(label.affine, np.float64), tuple(SliceRecord(**r) for r in meta["slices"]),
        tuple(Stop(**s) for s in meta["stops"]), tuple(meta["key_slices"]),
        tuple(tuple(b) for b in meta["boxes_model_xyxy"]), tuple(meta["bounds"]),
        tuple(meta["reference_extent"]) if meta["reference_extent"] else None, meta["settings"], meta["seconds"])
