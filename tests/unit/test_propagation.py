"""The 3-D algorithm (service/inference/propagation.py) on a synthetic ball with a scripted
2-D "model": the plan of pieces, propagation and its stops, refinement reuse and undo, and
clicks on a slice (their anchors, the prompts they are decoded with, what they recompute)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.domain import Box, Point
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
    feature that is (1, 0) on the structure and (0, 1) elsewhere. Clicks without a box: the
    structure's slice when a positive click is on it, else nothing. Its logits are filled
    with the number of the decode call that made them (so a mask prompt names its origin)."""

    def __init__(self, truth: np.ndarray, foreign_from: int | None = None) -> None:
        self.truth, self.foreign_from = truth, foreign_from
        self.embeds: list[int] = []
        self.decodes: list[int] = []
        self.prompts: list[tuple[int, object]] = []

    def embed(self, k: int):
        self.embeds.append(k)
        return k

    def decode(self, k: int, embedding, prompt) -> prop.Decoded:
        self.decodes.append(k)
        self.prompts.append((k, prompt))
        b = prompt.box
        inside = np.zeros((H, W), bool)
        if b is not None:
            inside[int(b.y0):int(np.ceil(b.y1)), int(b.x0):int(np.ceil(b.x1))] = True
        elif any(p.positive and self.truth[k][int(p.y), int(p.x)] for p in prompt.points):
            inside[:] = True
        mask = self.truth[k] & inside
        foreign = self.foreign_from is not None and k >= self.foreign_from
        feature = np.array([0.0, 1.0]) if foreign else np.array([1.0, 0.0])
        return prop.Decoded(mask, 0.9, np.full((8, 8), len(self.decodes) - 1, np.float32), feature)

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


# --------------------------------------------------------------------------- clicks
P, Q, N = Point(20.5, 20.5, True), Point(14.5, 20.5, True), Point(26.5, 20.5, False)


def test_clicks_on_a_box_anchor_keep_its_box_and_accumulate_and_a_box_replaces_them():
    box = Box(12, 12, 29, 29)
    state = prop.State(bounds=(0, Z - 1)).apply(prop.Interaction(15, box))
    once = state.apply(prop.Interaction(15, points=(P,)))
    twice = once.apply(prop.Interaction(15, points=(Q, N)))
    assert once.anchors == ((15, prop.Clicks(box, (P,))),)
    assert twice.anchors == ((15, prop.Clicks(box, (P, Q, N))),)
    # anchors stay hashable values, so pieces stay keyed by them
    assert len({p.key for s in (state, once, twice) for p in prop.plan(s)}) == 3 * len(prop.plan(state))
    assert twice.apply(prop.Interaction(15, box)).anchors == state.anchors
    assert twice.apply(prop.Interaction(erase=(14, 16))).anchors == ()


def test_a_click_elsewhere_makes_an_anchor_boxed_by_the_slice_s_current_mask_or_by_nothing():
    truth = ball()
    first = start(truth)
    slices = prop.slices_of(Scripted(truth).run(first, rules=TO_THE_END).values())
    clicked = first.apply(prop.Interaction(10, points=(P,)), slices)
    assert dict(clicked.anchors)[10] == prop.Clicks(prop.bounding_box(truth[10]), (P,))
    # no mask on the slice (past the structure), no masks given, or an erased slice: no box
    assert dict(first.apply(prop.Interaction(2, points=(P,)), slices).anchors)[2] == prop.Clicks(None, (P,))
    assert dict(first.apply(prop.Interaction(10, points=(P,))).anchors)[10] == prop.Clicks(None, (P,))
    erased = first.apply(prop.Interaction(erase=(9, 11)))
    again = erased.apply(prop.Interaction(10, points=(P,)), slices)
    assert dict(again.anchors)[10] == prop.Clicks(None, (P,)) and 10 not in again.erased and 9 in again.erased


@pytest.mark.parametrize("step", [prop.Interaction(3), prop.Interaction(3, Box(1, 1, 5, 5), points=(P,)),
                                  prop.Interaction(points=(P,)), prop.Interaction(3, erase=(3, 4), points=(P,))])
def test_an_interaction_is_exactly_one_action_on_a_slice(step):
    with pytest.raises(ValueError):
        prop.State(bounds=(0, Z - 1)).apply(step)


def test_a_clicked_anchor_is_decoded_in_rounds_each_with_the_previous_round_s_logits():
    truth = ball()
    box = prop.bounding_box(truth[15])
    state = prop.State(bounds=(15, 15)).apply(prop.Interaction(15, box)).apply(
        prop.Interaction(15, points=(P,))).apply(prop.Interaction(15, points=(N,)))
    model = Scripted(truth)
    model.run(state)
    rounds = [prompt for k, prompt in model.prompts]
    assert [(r.box, r.points) for r in rounds] == [(box, ()), (box, (P,)), (box, (P, N))]
    # round i's mask prompt is the logits of decode i - 1 (the Scripted logits hold their call's number)
    assert rounds[0].mask_input is None
    assert [float(r.mask_input[0, 0]) for r in rounds[1:]] == [0.0, 1.0]
    # the anchor's result is its last round's (the logits its neighbours start from)
    results = model.run(state)
    assert float(results[prop.plan(state)[0].key].last_logits[0, 0]) == 5.0
    # without mask prompts (a model that takes none) no round gets one; no box: clicks alone
    model = Scripted(truth)
    alone = prop.State(bounds=(15, 15)).apply(prop.Interaction(15, points=(P, N)))
    model.run(alone, rules=prop.Rules(mask_prompt=False))
    assert [(r.box, r.points, r.mask_input) for _, r in model.prompts] == [(None, (P,), None), (None, (P, N), None)]


def test_a_click_recomputes_the_pieces_beside_its_slice_as_a_box_would_and_undo_none():
    truth = ball()
    model = Scripted(truth)
    first = start(truth)
    done = dict(model.run(first, rules=TO_THE_END))
    slices = prop.slices_of(done.values())
    ends = np.flatnonzero(truth.reshape(Z, -1).any(axis=1))
    # a click on a propagated slice: that anchor, the slices between it and the old anchor and
    # the new lower tail; the upper tail of the old anchor is reused
    model.decodes.clear()
    second = first.apply(prop.Interaction(9, points=(P,)), slices)
    results = model.run(second, done, rules=TO_THE_END)
    done.update(results)
    assert sorted(set(model.decodes)) == list(range(ends[0] - 1, 15))
    assert model.decodes.count(9) == 2    # its box, then box + click with the box's logits
    # a click on the boxed anchor: that anchor and every piece from it, nothing else
    model.decodes.clear()
    third = second.apply(prop.Interaction(15, points=(Q,)))
    done.update(model.run(third, done, rules=TO_THE_END))
    assert sorted(set(model.decodes)) == list(range(10, ends[-1] + 2))
    model.decodes.clear()
    for back in (second, first):
        assert np.array_equal(masks(model.run(back, done, rules=TO_THE_END)), truth)
    assert model.decodes == []


def test_the_neighbours_of_an_anchor_of_clicks_alone_take_its_mask_s_box():
    truth = ball()
    model = Scripted(truth)
    state = prop.State(bounds=(0, Z - 1)).apply(prop.Interaction(15, points=(P,)))
    got = masks(model.run(state, rules=TO_THE_END))
    assert np.array_equal(got, truth)
    boxes = {prompt.box for k, prompt in model.prompts if k != 15}
    assert boxes == {prop.bounding_box(truth[15])}
    # between it and a boxed anchor: the hull of its mask's box and the other box
    model = Scripted(truth)
    other = Box(10, 10, 25, 25)
    model.run(state.apply(prop.Interaction(12, other)), rules=TO_THE_END)
    b = prop.bounding_box(truth[15])
    hull = Box(min(b.x0, 10), min(b.y0, 10), max(b.x1, 25), max(b.y1, 25))
    assert {prompt.box for k, prompt in model.prompts if k in (13, 14)} == {hull}
    # a negative click alone on the slice: an empty anchor, nothing propagates from it
    model = Scripted(truth)
    empty = prop.State(bounds=(0, Z - 1)).apply(prop.Interaction(15, points=(N,)))
    assert not masks(model.run(empty)).any() and model.decodes == [15]
