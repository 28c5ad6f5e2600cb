"""Choosing which slices to annotate (training/key_slices.py): the pure rules on hand-computed
arrays, the sequential uncertainty loop with a fake propagation, and the whole strategy on a
tiny synthetic volume through the real propagation with a fake model (no model files)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the training extra (requirements/training.txt) is not installed")

from service.core.domain import Box, Window  # noqa: E402
from service.core.volume import VolumeSource, load_volume  # noqa: E402
from service.inference.predictor import Embedding  # noqa: E402
from service.inference.volume_predictor import VolumePredictor  # noqa: E402
from training import key_slices as ks  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

LEFT = "mask left the structure (feature similarity 0.60 < 0.7)"


def rec(k: int, iou: float, area: int) -> vpl.SliceRecord:
    return vpl.SliceRecord(k, iou, area, "tail above")


# --------------------------------------------------------------------------- pure rules
def test_even_is_todays_rule_and_random_is_a_seeded_permutation_of_the_extent():
    areas = np.zeros(40)
    areas[10:30] = np.arange(20) + 1
    assert ks.even_slices(areas, 1) == [29]          # largest area
    assert ks.even_slices(areas, 3) == [13, 19, 26]  # 10 + 19 (i + 0.5) / 3 = 13.17, 19.5, 25.83
    five = ks.random_slices(areas, 5, np.random.default_rng(4))
    assert len(set(five)) == 5 and all(10 <= k <= 29 for k in five)
    assert ks.random_slices(areas, 2, np.random.default_rng(4)) == five[:2]   # budgets are nested
    assert ks.random_slices(areas, 5, np.random.default_rng(5)) != five
    assert sorted(ks.random_slices(areas, 50, np.random.default_rng(0))) == list(range(10, 30))
    assert ks.reference_extent(areas) == (10, 29)
    with pytest.raises(ValueError):
        ks.random_slices(np.zeros(5), 1, np.random.default_rng(0))


def test_per_slice_iou_is_nan_and_area_zero_where_no_mask_was_kept():
    iou, area = ks.per_slice([rec(2, 0.8, 30), rec(3, 0.6, 10)], 5)
    assert np.isnan(iou[[0, 1, 4]]).all() and iou[2] == pytest.approx(0.8) and iou[3] == pytest.approx(0.6)
    assert area.tolist() == [0, 0, 30, 10, 0]


def test_uncertainty_is_one_minus_iou_on_kept_slices_and_the_stop_area_beyond_a_stop():
    depth = 12
    records = [rec(3, 0.9, 20), rec(4, 0.8, 60), rec(5, 0.95, 80), rec(6, 0.7, 40), rec(7, 0.6, 40), rec(8, 0.5, 10)]
    stops = [vpl.Stop(5, -1, 3, LEFT),           # a model stop: slice 2 gets area(3) / max = 20 / 80
             vpl.Stop(5, 1, 8, vpl.RANGE_END)]   # the range ended: nothing beyond 8
    iou, area = ks.per_slice(records, depth)
    u = ks.slice_uncertainty(iou, area, stops, boxed=[5])
    expected = np.zeros(depth)
    expected[2] = 0.25
    expected[3:9] = [0.1, 0.2, 0.05, 0.3, 0.4, 0.5]
    np.testing.assert_allclose(u, expected)


def test_uncertainty_is_one_on_a_slice_between_boxes_without_a_mask():
    records = [rec(2, 0.9, 50), rec(3, 0.9, 50), rec(4, 0.9, 50), rec(6, 0.9, 50), rec(7, 0.9, 50)]
    stops = [vpl.Stop(2, -1, 2, "mask vanished"), vpl.Stop(7, 1, 7, vpl.RANGE_END)]
    iou, area = ks.per_slice(records, 9)
    u = ks.slice_uncertainty(iou, area, stops, boxed=[2, 7])
    np.testing.assert_allclose(u, [0, 1.0, 0.1, 0.1, 0.1, 1.0, 0.1, 0.1, 0])   # 1: beyond the stop, area 50/50


def test_next_slice_weights_uncertainty_by_distance_to_the_nearest_pick():
    u = np.array([0, 0, 0.25, 0.1, 0.2, 0.05, 0.1, 0.3, 0.1, 0])
    # d from 5: 5 4 3 2 1 0 1 2 3 4 -> scores 0 0 .75 .2 .2 0 .1 .6 .3 0
    assert ks.next_slice(u, [5]) == 2
    # d from {2, 5}: 2 1 0 1 1 0 1 2 3 4 -> .1 .2 ... slice 7: .6, slice 8: .3
    assert ks.next_slice(u, [5, 2]) == 7
    assert ks.next_slice(np.array([0, 0.5, 0, 0.5, 0]), [2]) == 1              # a tie: the lowest slice
    assert ks.next_slice(np.array([0, 0, 0.7, 0]), [2]) is None                # only the pick is uncertain
    assert ks.next_slice(np.zeros(4), [1]) is None and ks.next_slice(np.ones(4), []) is None


# --------------------------------------------------------------------------- the loop, fake propagation
def test_uncertainty_loop_follows_the_stops_and_spends_a_pick_on_an_empty_slice():
    """The fake: each box keeps its slice +- 2 (IoU 0.9, area 50), both outer sides stop by a
    model rule. Reference present on slices 4-15."""
    boxes: dict[int, Box] = {}

    def annotate(k):
        return Box(1.0, 1.0, 5.0, 5.0) if 4 <= k <= 15 else None

    def propagate(k, box):
        boxes[k] = box
        kept = sorted({j for a in boxes for j in range(a - 2, a + 3)})
        records = [rec(j, 0.9, 50) for j in kept]
        return records, [vpl.Stop(min(boxes), -1, kept[0], LEFT), vpl.Stop(max(boxes), 1, kept[-1], LEFT)]

    # 10 -> kept 8-12, beyond: 7 and 13 (u 1, d 3, tie: 7) -> kept 5-12, beyond 4 and 13 (d 3, tie: 4)
    # -> kept 2-12, beyond 1 (d 3) and 13 (d 3): 1, no box there (spent) -> 13 (1 has d 0 now)
    assert ks.uncertainty_picks(10, 5, annotate, propagate, 20) == [10, 7, 4, 1, 13]
    assert sorted(boxes) == [4, 7, 10, 13]
    boxes.clear()
    assert ks.uncertainty_picks(10, 2, annotate, propagate, 20) == [10, 7]


def test_uncertainty_loop_stops_early_when_nothing_is_uncertain():
    def propagate(k, box):
        return [rec(j, 1.0, 50) for j in range(3, 8)], [vpl.Stop(5, -1, 3, vpl.RANGE_END),
                                                        vpl.Stop(5, 1, 7, vpl.RANGE_END)]
    assert ks.uncertainty_picks(5, 3, lambda k: Box(0.0, 0.0, 2.0, 2.0), propagate, 10) == [5]


# --------------------------------------------------------------------------- real propagation, fake model
class BrightInBox:
    """A fake LiteMedSAM: the "embedding" is the slice itself; a box prompt's mask is the bright
    pixels (> 0.5) inside the box, its predicted IoU the fraction of the slice's bright pixels
    inside it; the mask's feature is constant (the similarity rule never stops)."""

    def __init__(self) -> None:
        self.embedded = 0

    def embed(self, pixels: np.ndarray) -> Embedding:
        self.embedded += 1
        return Embedding(np.asarray(pixels, np.float32)[None, None], None)

    def predict(self, embedding: Embedding, prompts):
        px = embedding.tensor[0, 0]
        b = prompts[0].box
        inside = np.zeros(px.shape, bool)
        inside[math.floor(b.y0):math.ceil(b.y1), math.floor(b.x0):math.ceil(b.x1)] = True
        bright = px > 0.5
        mask = bright & inside
        iou = mask.sum() / bright.sum() if bright.any() else 0.0
        return (np.where(mask, 1.0, -1.0).astype(np.float32)[None], np.array([iou], np.float32))

    def masks(self, logits: np.ndarray, frame) -> list[np.ndarray]:
        return [logits[0] > 0]


def moving_square() -> np.ndarray:
    """bool (30, 32, 40): on slices 5-24 a 6x6 square at columns j..j+5 of slice j (it moves one
    column a slice), rows 10-15; 8 rows (10-17) on slice 14, the slice of largest area."""
    truth = np.zeros((30, 32, 40), bool)
    for j in range(5, 25):
        truth[j, 10:16, j:j + 6] = True
    truth[14, 10:18, 14:20] = True
    return truth


@pytest.fixture()
def synthetic():
    truth = moving_square()
    volume = load_volume(VolumeSource("raw", data=truth.astype(np.float32).tobytes(), dtype="float32",
                                      shape=truth.shape, spacing_mm=(1.0, 1.0, 1.0), window=Window(0.5, 1.0)))
    model = BrightInBox()
    return truth, volume, model, VolumePredictor(model, volume)


def test_uncertainty_on_a_moving_square_with_the_real_propagation(synthetic):
    truth, volume, model, vp = synthetic
    # Box on 14 (columns 14-19): slice 14 +- d keeps (6 - d) / 6 of the square; IoU < 0.3 stops at d = 5,
    # so 10-18 are kept, their edges at IoU 1/3 (u 2/3, d 4: 2.67 beats beyond-the-stop 12/48 x 5 = 1.25): 10.
    # Box on 10: 11-13 between (hull box, IoU 1), the tail below keeps 6-9 -> 6 and 18 tie at 2.67: 6.
    # Box on 6: keeps 5, slice 4 is empty ("mask vanished"; beyond it 30/48 x 2 = 1.25) -> 18, then 22.
    picks = ks.choose("uncertainty", vp, truth, 5)
    assert picks == [14, 10, 6, 18, 22]
    assert ks.choose("uncertainty", vp, truth, 3) == picks[:3]
    one = ks.pseudo_label(vp, volume, truth, "uncertainty", 1)
    three = ks.pseudo_label(vp, volume, truth, "uncertainty", 3)
    assert one.key_slices == (14,) and three.key_slices == (6, 10, 14)
    assert three.settings["picked"] == [14, 10, 6] and three.settings["strategy"] == "uncertainty"
    assert vpl.extent(one.masks) == (10, 18) and vpl.extent(three.masks) == (5, 18)
    assert dice(three.masks, truth) > dice(one.masks, truth)
    assert model.embedded == len(vp.encoder_s)      # every slice went through the encoder once


def test_even_and_random_labels_and_explicit_keys_without_reference_get_no_box(synthetic):
    truth, volume, _, vp = synthetic
    even = ks.pseudo_label(vp, volume, truth, "even", 2)
    assert even.key_slices == tuple(vpl.key_slices_of(truth.sum(axis=(1, 2)), 2)) == (10, 19)
    rnd = ks.pseudo_label(vp, volume, truth, "random", 3, seed=1, name="square")
    assert len(rnd.settings["picked"]) == 3 and all(5 <= k <= 24 for k in rnd.settings["picked"])
    assert rnd.settings["picked"] == ks.choose("random", vp, truth, 3, seed=1, name="square")
    # explicit keys: the slice without reference (2) is a spent pick without a box
    pl = vpl.volume_pseudo_label(vp, volume, truth, keys=[2, 14])
    assert pl.key_slices == (14,) and len(pl.boxes) == 1
    np.testing.assert_array_equal(pl.masks, ks.pseudo_label(vp, volume, truth, "uncertainty", 1).masks)
    assert not vpl.volume_pseudo_label(vp, volume, truth, keys=[0, 1]).label.any()
    with pytest.raises(ValueError):
        vpl.volume_pseudo_label(vp, volume, truth, keys=[30])
    with pytest.raises(ValueError):
        ks.choose("nearest", vp, truth, 1)
