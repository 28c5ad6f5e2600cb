"""The served segmenter's pre/post-processing (shared by training and the gateway)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.segmenter_io import (context_indices, input_channels, postprocess, preprocess, preprocess_context,
                                      resize_labels, slice_inputs)


def test_preprocess_resizes_longest_side_and_pads_bottom_right():
    pixels = np.random.default_rng(0).random((60, 30)).astype(np.float32)
    tensor, frame = preprocess(pixels, 32)
    assert tensor.shape == (1, 1, 32, 32) and tensor.dtype == np.float32
    assert frame.resized_hw == (32, 16)
    assert (tensor[0, 0, :, 16:] == 0).all()


def test_rgb_is_averaged_to_grey():
    grey = np.full((8, 8), 0.5, np.float32)
    rgb = np.stack([grey * 0, grey, grey * 2], axis=2)
    assert np.allclose(preprocess(rgb, 8)[0], preprocess(grey, 8)[0])


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_postprocess_maps_a_square_back_to_the_input_frame(channels):
    h, w, size = 40, 20, 16
    mask = np.zeros((h, w), bool)
    mask[10:30, 5:15] = True
    _, frame = preprocess(np.zeros((h, w), np.float32), size)
    fg = resize_labels(mask.astype(np.int64), frame, ignore=0).astype(np.float32)
    logits = np.zeros((1, channels, size, size), np.float32)
    if channels == 1:
        logits[0, 0] = np.where(fg > 0, 5.0, -5.0)
    else:
        logits[0, 0] = np.where(fg > 0, 0.0, 5.0)
        logits[0, channels - 1] = np.where(fg > 0, 5.0, 0.0)
    out = postprocess(logits, frame)
    assert out.shape == (h, w)
    inter = (out & mask).sum()
    assert 2 * inter / (out.sum() + mask.sum()) > 0.9


def test_resize_labels_marks_padding_as_ignored():
    labels = np.ones((10, 5), np.int64)
    _, frame = preprocess(np.zeros((10, 5), np.float32), 8)
    out = resize_labels(labels, frame, ignore=-1)
    assert (out[:, :4] == 1).all() and (out[:, 4:] == -1).all()


@pytest.mark.parametrize("k, depth, context, expected", [
    (2, 5, 1, [1, 2, 3]),
    (0, 5, 1, [0, 0, 1]),          # the edge slice repeats past the volume's end
    (4, 5, 1, [3, 4, 4]),
    (1, 5, 2, [0, 0, 1, 2, 3]),
    (0, 1, 2, [0, 0, 0, 0, 0]),
    (3, 5, 0, [3]),
])
def test_context_indices_are_the_slice_and_its_neighbours_clipped_to_the_volume(k, depth, context, expected):
    assert context_indices(k, depth, context) == expected
    assert len(expected) == input_channels(context)


@pytest.mark.parametrize("k, depth, context", [(5, 5, 1), (-1, 5, 1), (0, 5, -1)])
def test_context_indices_refuse_a_slice_outside_the_volume_or_a_negative_context(k, depth, context):
    with pytest.raises(ValueError):
        context_indices(k, depth, context)


def test_preprocess_context_stacks_each_slice_as_preprocess_places_it_in_channel_order():
    rng = np.random.default_rng(1)
    slices = [rng.random((30, 50)).astype(np.float32) for _ in range(3)]
    tensor, frame = preprocess_context(slices, 32)
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == np.float32
    for c, pixels in enumerate(slices):
        alone, f = preprocess(pixels, 32)
        assert np.array_equal(tensor[0, c], alone[0, 0]) and f == frame


def test_preprocess_context_refuses_slices_of_different_shapes_or_none():
    with pytest.raises(ValueError, match="differ in shape"):
        preprocess_context([np.zeros((8, 8), np.float32), np.zeros((8, 9), np.float32)], 16)
    with pytest.raises(ValueError):
        preprocess_context([], 16)


def test_slice_inputs_read_each_needed_slice_once_and_stack_its_neighbours():
    rng = np.random.default_rng(2)
    volume = [rng.random((20, 30)).astype(np.float32) for _ in range(5)]
    reads = []

    def slice_pixels(j):
        reads.append(j)
        return volume[j]

    batch, frame = slice_inputs(slice_pixels, 5, [0, 1, 4], 32, context=1)
    assert sorted(reads) == [0, 1, 2, 3, 4]                       # 0..2 and 3..4, each once
    assert batch.shape == (3, 3, 32, 32)
    for i, k in enumerate([0, 1, 4]):
        expected, f = preprocess_context([volume[j] for j in context_indices(k, 5, 1)], 32)
        np.testing.assert_array_equal(batch[i:i + 1], expected)
        assert f == frame
    flat, _ = slice_inputs(lambda j: volume[j], 5, [2, 3], 32)
    np.testing.assert_array_equal(flat, np.concatenate([preprocess(volume[j], 32)[0] for j in (2, 3)]))
