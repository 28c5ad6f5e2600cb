"""The served segmenter's pre/post-processing (shared by training and the gateway)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.segmenter_io import postprocess, preprocess, resize_labels


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
