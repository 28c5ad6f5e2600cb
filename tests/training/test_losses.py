"""Each loss on small tensors against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training import losses

# Foreground probabilities of a 3x3 image; logits (0, logit(p)) give softmax p exactly.
P = [[0.8, 0.5, 0.1],
     [0.2, 0.4, 0.1],
     [0.1, 0.1, 0.1]]


def logits_for(p: list[list[float]]) -> torch.Tensor:
    fg = torch.tensor(p, dtype=torch.float64)
    return torch.stack([torch.zeros_like(fg), torch.log(fg / (1 - fg))])[None]


def test_tightness_prior_matches_hand_computed_bags_and_outside():
    box = torch.tensor([[[0, 0, 2, 2]]])  # columns 0-1, rows 0-1
    # rows: max(0.8, 0.5) = 0.8, max(0.2, 0.4) = 0.4; columns: max(0.8, 0.2) = 0.8, max(0.5, 0.4) = 0.5
    positive = -(math.log(0.8) + math.log(0.4) + math.log(0.8) + math.log(0.5)) / 4
    negative = -math.log(0.9)  # the 5 outside pixels all have p = 0.1
    got = losses.tightness_prior_loss(logits_for(P), box)
    assert got.item() == pytest.approx(positive + negative, abs=1e-9)


def test_tightness_prior_without_boxes_is_background_everywhere():
    empty = torch.zeros((1, 2, 4), dtype=torch.int64)
    want = -sum(math.log(1 - p) for row in P for p in row) / 9
    assert losses.tightness_prior_loss(logits_for(P), empty).item() == pytest.approx(want, abs=1e-9)


def test_tightness_prior_pushes_inside_up_and_outside_down():
    logits = logits_for(P).clone().requires_grad_(True)
    losses.tightness_prior_loss(logits, torch.tensor([[[0, 0, 2, 2]]])).backward()
    fg_grad = logits.grad[0, 1] - logits.grad[0, 0]
    assert fg_grad[0, 0] < 0 and fg_grad[1, 1] < 0  # bag maxima: raise
    assert (fg_grad[2] > 0).all() and (fg_grad[:, 2] > 0).all()  # outside: lower


def test_partial_cross_entropy_uses_labelled_pixels_only():
    labels = torch.full((1, 3, 3), -1)
    labels[0, 0, 0] = 1  # p = 0.8
    labels[0, 2, 2] = 0  # 1 - p = 0.9
    want = -(math.log(0.8) + math.log(0.9)) / 2
    assert losses.partial_cross_entropy(logits_for(P), labels).item() == pytest.approx(want, abs=1e-9)
    changed = logits_for(P)
    changed[0, 1, 1, 1] = 7.0  # an unlabelled pixel
    assert losses.partial_cross_entropy(changed, labels).item() == pytest.approx(want, abs=1e-9)


def test_partial_cross_entropy_is_zero_without_labels():
    assert losses.partial_cross_entropy(logits_for(P), torch.full((1, 3, 3), -1)).item() == 0.0


@pytest.mark.parametrize(("lower", "upper", "want"), [
    (1.0, 3.0, 0.0),               # area 2 inside the bounds
    (3.0, 4.0, (3 - 2) ** 2 / 4),  # too small by 1 pixel
    (0.0, 0.5, (2 - 0.5) ** 2 / 4),  # too large by 1.5 pixels
])
def test_size_penalty_is_quadratic_outside_the_bounds(lower, upper, want):
    logits = torch.zeros((1, 2, 2, 2), dtype=torch.float64)  # p = 0.5 on 4 pixels: area 2
    got = losses.size_penalty(logits, torch.tensor([lower]), torch.tensor([upper]))
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_pseudo_label_loss_ignores_uncertain_pixels():
    labels = torch.tensor([[[1, 0, -1],
                            [-1, -1, -1],
                            [-1, -1, 0]]])
    ce = -(math.log(0.8) + math.log(0.5) + math.log(0.9)) / 3
    # soft Dice over the three certain pixels: p = (0.8, 0.5, 0.1), y = (1, 0, 0)
    dice = 1 - (2 * 0.8 + 1e-6) / ((0.8 + 0.5 + 0.1) + 1 + 1e-6)
    got = losses.pseudo_label_loss(logits_for(P), labels)
    assert got.item() == pytest.approx(ce + dice, abs=1e-9)
    changed = logits_for(P)
    changed[0, 1, 1, :] = -9.0
    assert losses.pseudo_label_loss(changed, labels).item() == pytest.approx(ce + dice, abs=1e-9)


@pytest.mark.parametrize(("fill", "want"), [(0.75, (3 - 1.9) ** 2 / 9), (0.25, 0.0)])
def test_box_fill_penalty_bounds_the_area_inside_each_box(fill, want):
    box = torch.tensor([[[0, 0, 2, 2]]])  # 4 pixels, p sums to 0.8 + 0.5 + 0.2 + 0.4 = 1.9
    assert losses.box_fill_penalty(logits_for(P), box, fill).item() == pytest.approx(want, abs=1e-9)


# --------------------------------------------------------------------------- CE + batch Dice on a 1/0/-1 map
def test_batch_dice_pools_the_labelled_pixels_of_the_whole_batch_hand_computed():
    pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")
    # image 0: the 3x3 P, its first row labelled (1, 1, 0), the rest ignored; image 1: all labelled 0
    logits = torch.cat([logits_for(P), logits_for(P)])
    labels = torch.full((2, 3, 3), -1)
    labels[0, 0] = torch.tensor([1, 1, 0])
    labels[1] = 0
    s = losses.BATCH_DICE_SMOOTH
    inter = 0.8 + 0.5                                   # p y over image 0's labelled row
    sum_p = (0.8 + 0.5 + 0.1) + sum(sum(row) for row in P)   # image 0's labelled row + all of image 1
    want = 1 - (2 * inter + s) / (sum_p + 2 + s)
    got = losses.batch_dice_loss(logits, labels)
    assert got.item() == pytest.approx(want, abs=1e-9)
    # not the mean of per-image Dice: the empty image 1 alone would have Dice loss ~1
    per_image = [losses.batch_dice_loss(logits[i:i + 1], labels[i:i + 1]).item() for i in range(2)]
    assert per_image[1] == pytest.approx(1 - s / (sum(sum(row) for row in P) + s), abs=1e-9)
    assert abs(got.item() - sum(per_image) / 2) > 0.05   # 0.552 pooled vs 0.618 per image


def test_labelled_dice_ce_is_ce_plus_batch_dice_and_ignores_minus_one_pixels():
    pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")
    labels = torch.tensor([[[1, 0, -1],
                            [-1, 1, -1],
                            [-1, -1, 0]]])
    # certain pixels: p = 0.8 (y 1), 0.5 (y 0), 0.4 (y 1), 0.1 (y 0)
    ce = -(math.log(0.8) + math.log(0.5) + math.log(0.4) + math.log(0.9)) / 4
    s = losses.BATCH_DICE_SMOOTH
    dice = 1 - (2 * (0.8 + 0.4) + s) / ((0.8 + 0.5 + 0.4 + 0.1) + 2 + s)
    got = losses.labelled_dice_ce_loss(logits_for(P), labels)
    assert got.item() == pytest.approx(ce + dice, abs=1e-9)
    changed = logits_for(P)
    changed[0, 1, labels[0] == -1] = 9.0               # every ignored pixel: no effect
    assert losses.labelled_dice_ce_loss(changed, labels).item() == pytest.approx(ce + dice, abs=1e-9)
    changed[0, 1, 0, 1] = 9.0                           # a labelled background pixel: it counts
    assert losses.labelled_dice_ce_loss(changed, labels).item() > ce + dice + 1.0
    assert losses.labelled_dice_ce_loss(logits_for(P), labels, dice_weight=0.0).item() == pytest.approx(ce, abs=1e-9)


@pytest.mark.parametrize("fill", [0, -1])
def test_labelled_dice_ce_on_an_all_empty_or_all_ignored_batch_is_finite(fill):
    pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")
    logits = torch.cat([logits_for(P), logits_for(P)]).requires_grad_(True)
    labels = torch.full((2, 3, 3), fill)
    loss = losses.labelled_dice_ce_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    if fill == 0:       # no foreground anywhere: the Dice term is ~1 and pushes p down everywhere
        s, sum_p = losses.BATCH_DICE_SMOOTH, 2 * sum(sum(row) for row in P)
        ce = -2 * sum(math.log(1 - p) for row in P for p in row) / 18
        assert loss.item() == pytest.approx(ce + 1 - s / (sum_p + s), abs=1e-9)
        assert ((logits.grad[:, 1] - logits.grad[:, 0]) > 0).all()
    else:               # nothing labelled: no loss, no gradient
        assert loss.item() == 0.0 and (logits.grad == 0).all()
