"""Choosing which slices to annotate: a budget of ``k`` boxes per structure (issue 15, item 5).

A person draws a box on each of ``k`` *key slices* of a structure; the served predictor
(:class:`service.inference.volume_predictor.Segment`, as in :mod:`training.volume_pseudo_labels`)
turns the boxes into a 3-D pseudo-label. A *strategy* decides which slices the person is asked
to box; the **simulated annotator** (:func:`annotator`) then draws the reference's box on each
picked slice, as a person would see the structure there (the same box
:func:`training.volume_pseudo_labels.drawn_box` draws, jittered the same way when asked). A
picked slice where the reference is empty yields **no box** (the person sees nothing there)
and still counts as a spent annotation. The reference is used for nothing else.

Strategies (:func:`choose`); each returns the picked slices in the order they were picked (for
``random`` and ``uncertainty`` a smaller budget's picks are the first ones of a larger budget's:
the budget curve adds boxes):

* ``even``: today's rule, :func:`training.volume_pseudo_labels.key_slices_of`: ``k = 1`` the
  slice of largest reference area; ``k > 1`` evenly spaced over the reference's slice extent
  (centred), each moved to the nearest slice with reference pixels. Not nested: the even
  picks of ``k`` and ``k + 1`` differ;
* ``random``: a seeded uniform permutation of the reference's slice extent ``[first, last]``
  (:func:`random_slices`, :func:`training.weak_labels.case_rng` of the seed and the structure's
  name), its first ``k``: distinct slices, nested over budgets;
* ``uncertainty``: sequential and reference-free apart from the boxes (:func:`uncertainty_picks`):

  1. the first box goes on the slice of largest reference area (the one-box rule: where a
     person sees the structure largest);
  2. propagate; from what the predictor returned, each slice ``j`` gets an uncertainty
     ``u(j)`` (:func:`slice_uncertainty`):

     * a slice with a kept mask: ``1 − predicted IoU``;
     * a slice strictly between the first and last boxed key slice without a kept mask: 1;
     * the first slice beyond each side of the result where a stop rule fired (not where the
       slice range ended): the area of that side's last kept mask divided by the largest kept
       area. A mask still large where propagation stopped suggests it stopped early and the
       structure goes on; a small tip suggests it ended;
     * every other slice: 0;
  3. the next key slice (:func:`next_slice`) is the slice of largest ``u(j) × d(j)``, where
     ``d(j)`` is the distance in slices to the nearest slice already picked (boxed or not; a
     picked slice has ``d = 0`` and is never picked again). Ties go to the lowest slice. When
     every score is 0 nothing is picked and the rest of the budget is not spent;
  4. the annotator boxes it (or not), propagate again, repeat until ``k`` slices are picked.

  It sees over-segmentation (a mask running past the structure's end) only through a low
  predicted IoU; and a wrongly stopped side only through the stop's area.

:func:`pseudo_label` makes the :class:`~training.volume_pseudo_labels.VolumePseudoLabel` of a
strategy's picks (``keys=`` of :func:`~training.volume_pseudo_labels.volume_pseudo_label`).
All slice indices, boxes and masks are in the volume's model orientation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from service.core.domain import Box
from service.core.volume import Volume
from service.inference import propagation as prop
from service.inference.volume_predictor import Segment, VolumePredictor
from training import volume_pseudo_labels as vpl
from training import weak_labels as wl

STRATEGIES = ("even", "random", "uncertainty")

Annotate = Callable[[int], "Box | None"]                  # slice -> the person's box there, or none
Propagate = Callable[[int, Box], tuple[Sequence[vpl.SliceRecord], Sequence[vpl.Stop]]]


# --------------------------------------------------------------------------- pure rules
def reference_extent(areas: np.ndarray) -> tuple[int, int]:
    """(first, last) slice with reference pixels of per-slice ``areas`` ``(Z,)``."""
    present = np.flatnonzero(np.asarray(areas) > 0)
    if present.size == 0:
        raise ValueError("the reference mask is empty: no slice to draw a box on")
    return int(present[0]), int(present[-1])


def even_slices(areas: np.ndarray, k: int) -> list[int]:
    """Today's rule (:func:`training.volume_pseudo_labels.key_slices_of`), sorted."""
    return vpl.key_slices_of(areas, k)


def random_slices(areas: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """The first ``k`` of a uniform permutation of the reference's slice extent (pick order;
    all of it when the extent is shorter than ``k``)."""
    if k < 1:
        raise ValueError(f"the budget must be at least 1, got {k}")
    first, last = reference_extent(areas)
    return [int(j) for j in rng.permutation(np.arange(first, last + 1))[:k]]


def per_slice(records: Sequence[vpl.SliceRecord], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(iou, area)``, each ``(depth,)``: the predicted IoU (NaN where no mask was kept) and
    the area (0 there) of each slice of a result's ``records``."""
    iou = np.full(depth, np.nan)
    area = np.zeros(depth, np.int64)
    for r in records:
        iou[r.slice_index], area[r.slice_index] = r.iou, r.area
    return iou, area


def slice_uncertainty(iou: np.ndarray, area: np.ndarray, stops: Sequence[vpl.Stop],
                      boxed: Sequence[int]) -> np.ndarray:
    """``u(j)`` ``(Z,)`` in [0, 1] of a result (the rule in the module doc, step 2): ``iou`` NaN
    and ``area`` 0 where no mask was kept, ``stops`` the result's sides, ``boxed`` the key
    slices that got a box."""
    iou, area = np.asarray(iou, float), np.asarray(area, float)
    kept = ~np.isnan(iou)
    u = np.where(kept, 1.0 - np.clip(np.nan_to_num(iou), 0.0, 1.0), 0.0)
    if len(boxed):
        inside = np.arange(len(u))
        gap = (inside > min(boxed)) & (inside < max(boxed)) & ~kept
        u[gap] = 1.0
    largest = float(area.max()) if area.size else 0.0
    for s in stops:
        beyond = s.last + s.step
        if s.reason == vpl.RANGE_END or not 0 <= beyond < len(u) or kept[beyond] or largest <= 0:
            continue
        u[beyond] = max(u[beyond], float(area[s.last]) / largest)
    return u


def next_slice(uncertainty: np.ndarray, picked: Sequence[int]) -> int | None:
    """The slice of largest ``uncertainty × distance to the nearest picked slice`` (ties: the
    lowest slice); None when every score is 0 (or nothing was picked yet)."""
    u = np.asarray(uncertainty, float)
    if not len(picked):
        return None
    j = np.arange(len(u))
    d = np.min(np.abs(j[:, None] - np.asarray(picked)[None, :]), axis=1)
    score = u * d
    best = int(np.argmax(score))
    return best if score[best] > 0 else None


# --------------------------------------------------------------------------- the loop
def uncertainty_picks(first: int, budget: int, annotate: Annotate, propagate: Propagate, depth: int) -> list[int]:
    """The ``uncertainty`` strategy's picks (module doc): ``first`` the first key slice,
    ``annotate(k)`` the person's box on slice ``k`` (None: nothing seen there), ``propagate(k,
    box)`` adds the box and returns the current result's records and stops. Fewer than
    ``budget`` slices when :func:`next_slice` finds nothing left to ask."""
    if budget < 1:
        raise ValueError(f"the budget must be at least 1, got {budget}")
    picked, boxed = [], []
    records: Sequence[vpl.SliceRecord] = ()
    stops: Sequence[vpl.Stop] = ()
    k: int | None = int(first)
    while k is not None and len(picked) < budget:
        picked.append(k)
        box = annotate(k)
        if box is not None:
            boxed.append(k)
            records, stops = propagate(k, box)
        if len(picked) == budget:
            break
        iou, area = per_slice(records, depth)
        k = next_slice(slice_uncertainty(iou, area, stops, boxed), picked)
    return picked


def annotator(reference: np.ndarray, jitter: float | None = None, seed: int = 0, name: str = "structure") -> Annotate:
    """The simulated person: the box :func:`training.volume_pseudo_labels.volume_pseudo_label`
    draws on slice ``k`` of bool ``(Z, H, W)`` ``reference`` (same jitter and seed), None where
    the reference is empty."""
    def annotate(k: int) -> Box | None:
        if not reference[k].any():
            return None
        return vpl.drawn_box(reference[k], jitter, wl.case_rng(seed, f"{name}:{k}"))
    return annotate


def propagator(vp: VolumePredictor, bounds: tuple[int, int] | None = None) -> Propagate:
    """``propagate(k, box)`` on one :class:`Segment` of ``vp`` (its pieces and ``vp``'s slice
    embeddings are reused from box to box)."""
    segment = Segment(vp, bounds)

    def propagate(k: int, box: Box) -> tuple[list[vpl.SliceRecord], list[vpl.Stop]]:
        segment.apply(prop.Interaction(int(k), box))
        return vpl.records_of(segment.state, segment.results)
    return propagate


def choose(strategy: str, vp: VolumePredictor, reference: np.ndarray, k: int, *, seed: int = 0,
           jitter: float | None = None, bounds: tuple[int, int] | None = None, name: str = "structure") -> list[int]:
    """The ``k`` slices ``strategy`` picks for bool ``(Z, H, W)`` ``reference`` (pick order)."""
    areas = np.asarray(reference).reshape(len(reference), -1).sum(axis=1)
    if strategy == "even":
        return even_slices(areas, k)
    if strategy == "random":
        return random_slices(areas, k, wl.case_rng(seed, f"{name}:random"))
    if strategy == "uncertainty":
        return uncertainty_picks(int(np.argmax(areas)), k, annotator(reference, jitter, seed, name),
                                 propagator(vp, bounds), len(reference))
    raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")


def pseudo_label(vp: VolumePredictor, volume: Volume, reference: Volume | np.ndarray, strategy: str, k: int, *,
                 seed: int = 0, jitter: float | None = None, bounds: tuple[int, int] | None = None,
                 rules: vpl.UncertainRules = vpl.UncertainRules(), name: str = "structure") -> vpl.VolumePseudoLabel:
    """The volume pseudo-label of ``strategy``'s ``k`` picks (``settings["picked"]``: all of
    them in pick order; ``key_slices``: those that got a box)."""
    ref = vpl.reference_slices(reference, volume)
    picks = choose(strategy, vp, ref, k, seed=seed, jitter=jitter, bounds=bounds, name=name)
    pl = vpl.volume_pseudo_label(vp, volume, ref, keys=picks, jitter=jitter, seed=seed, bounds=bounds,
                                 rules=rules, name=name)
    pl.settings.update(strategy=strategy, budget=k, picked=list(picks))
    return pl
