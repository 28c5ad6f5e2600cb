"""Prompt coordinate transforms between input-image pixels and the model frame."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.domain import Box, Point
from service.core.geometry import Frame, box_from_model, box_to_model, model_input, points_to_model, upsample_logits


@given(h=st.integers(1, 4000), w=st.integers(1, 4000), x0=st.floats(0, 1), y0=st.floats(0, 1),
       fx=st.floats(0.01, 1), fy=st.floats(0.01, 1))
@settings(max_examples=300, deadline=None)
def test_box_round_trips_through_the_model_frame(h, w, x0, y0, fx, fy):
    frame = Frame(h, w, 256)
    box = Box(x0 * w, y0 * h, x0 * w + max(1.0, fx * w), y0 * h + max(1.0, fy * h))
    back = box_from_model(box_to_model(box, frame), frame)
    assert back.x0 == pytest.approx(box.x0, abs=1e-3) and back.y0 == pytest.approx(box.y0, abs=1e-3)
    assert back.x1 == pytest.approx(box.x1, abs=1e-3) and back.y1 == pytest.approx(box.y1, abs=1e-3)


def test_whole_image_box_spans_the_resized_image_in_index_coordinates():
    frame = Frame(200, 100, 256)  # portrait: height is the long side
    assert frame.scale == pytest.approx(1.28) and frame.resized_hw == (256, 128)
    model_box = box_to_model(Box(0, 0, 100, 200), frame)
    np.testing.assert_allclose(model_box, [0, 0, 99 * 1.28, 199 * 1.28], rtol=1e-6)


def test_point_at_a_pixel_centre_maps_to_that_pixel_index():
    frame = Frame(512, 512, 256)
    coords, labels = points_to_model([Point(10.5, 20.5, True), Point(0.5, 0.5, False)], frame)
    np.testing.assert_allclose(coords, [[5.0, 10.0], [0.0, 0.0]])
    np.testing.assert_array_equal(labels, [1.0, 0.0])


def test_model_input_resizes_longest_side_and_pads_bottom_right():
    pixels = np.ones((100, 50), dtype=np.float32)
    tensor, frame = model_input(pixels, 256)
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == np.float32
    assert frame.resized_hw == (256, 128)
    assert np.allclose(tensor[0, :, :256, :128], 1.0) and np.all(tensor[0, :, :, 128:] == 0)


def test_rgb_input_keeps_its_channels():
    pixels = np.zeros((64, 64, 3), dtype=np.float32)
    pixels[..., 1] = 1.0
    tensor, _ = model_input(pixels, 256)
    assert tensor[0, 0].max() == 0 and tensor[0, 1].min() == pytest.approx(1.0) and tensor[0, 2].max() == 0


def test_upsampled_logits_follow_the_valid_region_only():
    frame = Frame(100, 50, 256)  # valid region of the 256 frame: 256 x 128
    low = np.full((1, 256, 256), -10.0, dtype=np.float32)
    low[0, :128, :64] = 10.0  # top-left quarter of the valid region
    full = upsample_logits(low, frame)
    assert full.shape == (1, 100, 50)
    mask = full[0] > 0
    assert mask[:45, :22].all() and not mask[55:, :].any() and not mask[:, 28:].any()
