"""The 3-D algorithm (service/inference/propagation.py) on a synthetic ball with a scripted
2-D "model": the plan of pieces, propagation and its stops, refinement reuse and undo."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.domain import Box
from service.inference import propagation as prop

Z, H, W = 30, 40, 40
# a ball's tips shrink faster than any area rule allows: these tests follow the mask to its end
TO_THE_END = prop.Rules(max_area_ratio=1e9)


def ball(center=(15, 20, 20), radius=8.0) -> np.ndarray:
    """A ball without its one-pixel tips (a mask under Rules.min_area_px counts as vanished)."""
    z, y, x = np.ogrid[:Z, :H, :W]
    out = (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius ** 2
    out[out.reshape(Z, -1).sum(axis=1) < prop.Rules().min_area_px] = False
    return out


class Scripted:
    """A "model" that answers a box with the structure's pixels inside it (IoU 0.9), and a
    feature that is (1, 0) on the structure and (0, 1) elsewhere."""

    def __init__(self, truth: np.ndarray, foreign_from: int | None = None) -> None:
        self.truth, self.foreign_from = truth, foreign_from
        self.embeds: list[int] = []
        self.decodes: list[int] = []

    def embed(self, k: int):
        self.embeds.append(k)
        return k

    def decode(self, k: int, embedding, prompt) -> prop.Decoded:
        self.decodes.append(k)
        b = prompt.box
        inside = np.zeros((H, W), bool)
        inside[int(b.y0):int(np.ceil(b.y1)), int(b.x0):int(np.ceil(b.x1))] = True
        mask = self.truth[k] & inside
        foreign = self.foreign_from is not None and k >= self.foreign_from
        feature = np.array([0.0, 1.0]) if foreign else np.array([1.0, 0.0])
        return prop.Decoded(mask, 0.9, np.zeros((8, 8), np.float32), feature)

    def run(self, state: prop.State, done=None, rules: prop.Rules = prop.Rules()):
        return prop.drive(prop.run_state(state, rules, (H, W), {} if done is None else done), self.embed, self.decode)


def masks(results) -> np.ndarray:
    out = np.zeros((Z, H, W), bool)
    for k, r in prop.slices_of(results.values()).items():
        out[k] = r.mask
    return out


def start(truth: np.ndarray) -> prop.State:
    k = int(np.argmax(truth.reshape(Z, -1).sum(axis=1)))
    return prop.State(bounds=(0, Z - 1)).apply(prop.Interaction(k, prop.bounding_box(truth[k])))


def test_the_plan_has_anchors_betweens_and_tails_stopping_at_erased_slices():
    a, b = Box(1, 1, 5, 5), Box(2, 2, 6, 6)
    state = prop.State(bounds=(0, 20)).apply(prop.Interaction(5, a)).apply(prop.Interaction(12, b))
    kinds = [(p.kind, p.start[0], p.step, p.limit) for p in prop.plan(state)]
    assert kinds == [("anchor", 5, 0, 0), ("anchor", 12, 0, 0), ("between", 5, 0, 0), ("tail", 5, -1, 0),
                     ("tail", 12, 1, 20)]
    erased = state.apply(prop.Interaction(erase=(8, 9)))
    kinds = [(p.kind, p.start[0], p.step, p.limit) for p in prop.plan(erased)]
    assert ("tail", 5, 1, 7) in kinds and ("tail", 12, -1, 10) in kinds and not any(k[0] == "between" for k in kinds)
    # erasing an anchor's slice removes the anchor; boxing an erased slice un-erases it
    assert [k for k, _ in state.apply(prop.Interaction(erase=(12, 12))).anchors] == [5]
    assert 8 not in erased.apply(prop.Interaction(8, a)).erased


def test_one_box_propagates_through_the_structure_and_stops_where_it_ends():
    truth = ball()
    model = Scripted(truth)
    got = masks(model.run(start(truth), rules=TO_THE_END))
    assert np.array_equal(got, truth)
    ends = np.flatnonzero(truth.reshape(Z, -1).any(axis=1))
    # it looked one slice past each end (where the mask vanished) and no further
    assert min(model.decodes) == ends[0] - 1 and max(model.decodes) == ends[-1] + 1


def test_the_range_bounds_propagation():
    truth = ball()
    state = prop.State(bounds=(12, 17)).apply(prop.Interaction(15, prop.bounding_box(truth[15])))
    got = masks(Scripted(truth).run(state, rules=TO_THE_END))
    assert set(np.flatnonzero(got.reshape(Z, -1).any(axis=1))) == set(range(12, 18))


def test_propagation_stops_where_the_area_collapses():
    truth = ball()
    results = Scripted(truth).run(start(truth))
    areas = truth.reshape(Z, -1).sum(axis=1)
    got = sorted(prop.slices_of(results.values()))
    above = got[-1] + 1   # the first slice not kept: its area fell more than 3x, or to nothing
    assert areas[above] * 3 < areas[got[-1]] or areas[above] == 0
    assert all(areas[k] * 3 >= areas[k - 1] for k in got if k - 1 in got and k > 15)


def test_propagation_stops_where_the_mask_stops_resembling_the_anchor():
    truth = ball(radius=10.0)
    model = Scripted(truth, foreign_from=19)
    results = model.run(start(truth))
    last = max(prop.slices_of(results.values()))
    assert last == 18
    assert any("left the structure" in r for r in prop.stop_reasons(start(truth), results))


def test_a_refinement_recomputes_only_the_pieces_it_changes_and_undo_none():
    truth = ball()
    model = Scripted(truth)
    first = start(truth)
    done = dict(model.run(first, rules=TO_THE_END))
    model.decodes.clear()
    second = first.apply(prop.Interaction(9, prop.bounding_box(truth[9])))
    results = model.run(second, done, rules=TO_THE_END)
    done.update(results)
    # the new anchor, the slices between it and the old one, and the new lower tail; the
    # upper tail of the first anchor is reused
    assert model.decodes and min(model.decodes) < 9 and max(model.decodes) < 15
    model.decodes.clear()
    back = model.run(first, done, rules=TO_THE_END)
    assert model.decodes == [] and np.array_equal(masks(back), truth)


@pytest.mark.parametrize("rules", [prop.Rules(tail_box="mask"), prop.Rules(between_box="interpolated")])
def test_the_other_documented_prompt_modes_run(rules):
    truth = ball()
    model = Scripted(truth)
    state = start(truth).apply(prop.Interaction(10, prop.bounding_box(truth[10])))
    got = masks(model.run(state, rules=rules))
    assert 0.9 < 2 * (got & truth).sum() / (got.sum() + truth.sum()) <= 1.0


def test_slice_results_pack_their_masks():
    mask = ball()[15]
    r = prop.SliceResult.of(mask, 0.7)
    assert np.array_equal(r.mask, mask) and r.area == int(mask.sum()) and r.packed.nbytes <= mask.size // 8 + 1
    assert r.box == prop.bounding_box(mask)


def test_mask_feature_is_the_unit_mean_over_positive_cells():
    emb = np.zeros((1, 2, 4, 4), np.float32)
    emb[0, 0, :2, :2] = 3.0
    emb[0, 1, 2:, 2:] = 5.0
    logits = -np.ones((16, 16), np.float32)
    logits[:8, :8] = 1.0
    assert np.allclose(prop.mask_feature(emb, logits), [1.0, 0.0])
    assert prop.mask_feature(emb, -np.ones((16, 16), np.float32)) is None
