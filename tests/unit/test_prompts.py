"""Prompt validation against the image and the model's declared prompt kinds."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import errors
from service.core.domain import Box, ModelInfo, Point, Prompt, PromptKind
from service.core.prompts import decoder_batches, sparse_points, validate
from service.core.geometry import Frame

FRAME = Frame(100, 200, 256)
LITE = ModelInfo("lite", "1", 256, frozenset({PromptKind.BOX, PromptKind.MASK}), frozenset({PromptKind.BOX}))
SAM = ModelInfo("sam", "1", 1024, frozenset(PromptKind), frozenset())
LOW = (256, 256)


def _check(*prompts, model=LITE, limit=4):
    return validate(tuple(prompts), FRAME, model, limit, LOW)


@pytest.mark.parametrize("box", [Box(10, 10, 10, 50), Box(50, 10, 20, 50), Box(-50, -50, -1, -1),
                                 Box(200, 0, 300, 50), Box(float("nan"), 0, 5, 5), Box(0, 0, float("inf"), 5)])
def test_bad_boxes_are_rejected(box):
    with pytest.raises(errors.InvalidPrompt):
        _check(Prompt(box=box))


def test_box_partly_outside_is_clipped_to_the_image():
    (p,) = _check(Prompt(box=Box(-10, -5, 250, 120)))
    assert p.box == Box(0, 0, 200, 100)


def test_points_on_a_box_only_model_are_unsupported():
    with pytest.raises(errors.UnsupportedPrompt):
        _check(Prompt(box=Box(0, 0, 5, 5), points=(Point(1, 1, True),)))


def test_a_required_box_cannot_be_left_out():
    with pytest.raises(errors.UnsupportedPrompt):
        _check(Prompt(mask_input=np.zeros(LOW, np.float32)))


def test_counts_and_emptiness_are_checked():
    with pytest.raises(errors.InvalidPrompt):
        _check()
    with pytest.raises(errors.InvalidPrompt):
        _check(*[Prompt(box=Box(0, 0, 5, 5))] * 5)
    with pytest.raises(errors.InvalidPrompt):
        _check(Prompt())


@pytest.mark.parametrize("mask", [np.zeros((64, 64), np.float32), np.full(LOW, np.nan, np.float32)])
def test_bad_mask_input_is_rejected(mask):
    with pytest.raises(errors.InvalidPrompt):
        _check(Prompt(box=Box(0, 0, 5, 5), mask_input=mask))


def test_point_outside_the_image_is_rejected():
    with pytest.raises(errors.InvalidPrompt):
        _check(Prompt(points=(Point(201, 5, True),)), model=SAM)


def test_sparse_points_put_points_first_then_box_corners_or_a_padding_point():
    coords, labels = sparse_points(Prompt(box=Box(0, 0, 10, 10), points=(Point(5, 5, False),)), FRAME)
    np.testing.assert_array_equal(labels, [0, 2, 3])
    coords, labels = sparse_points(Prompt(points=(Point(5, 5, True),)), FRAME)
    np.testing.assert_array_equal(labels, [1, -1])
    assert coords.shape == (2, 2)


def test_decoder_batches_group_prompts_of_equal_length_and_keep_every_index():
    prompts = [Prompt(box=Box(0, 0, 5, 5)), Prompt(points=(Point(1, 1, True),)),
               Prompt(box=Box(1, 1, 9, 9), mask_input=np.ones(LOW, np.float32))]
    batches = list(decoder_batches(prompts, FRAME, LOW))
    seen = sorted(i for indices, _ in batches for i in indices)
    assert seen == [0, 1, 2]
    for indices, feeds in batches:
        assert feeds["point_coords"].shape[:2] == feeds["point_labels"].shape == (len(indices), 2)
        assert feeds["mask_input"].shape == (len(indices), 1, *LOW)
        for j, i in enumerate(indices):
            assert feeds["has_mask_input"][j, 0] == (1.0 if prompts[i].mask_input is not None else 0.0)
