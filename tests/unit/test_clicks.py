"""Where the simulated user clicks (service/inference/clicks.py): the centre of the largest
false-negative or false-positive region of a slice, on hand-drawn masks whose answers are
worked out by hand in each test."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.domain import Point
from bench import clicks


def masks(shape=(12, 12)) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(shape, bool), np.zeros(shape, bool)


def test_a_missed_square_gets_a_positive_click_at_its_centre_pixel():
    mask, ref = masks()
    ref[2:7, 3:8] = True            # rows 2-6, columns 3-7: the centre pixel is (4, 5)
    assert clicks.correction_click(mask, ref) == Point(5.5, 4.5, True)
    # found its left part: missed rows 2-6, columns 5-7; rows 3-5 of column 6 are all 2 from
    # the boundary, and the first of them in raster order is taken
    mask[2:7, 3:5] = True
    assert clicks.correction_click(mask, ref) == Point(6.5, 3.5, True)


def test_the_larger_of_the_largest_missed_and_the_largest_extra_region_decides_the_sign():
    mask, ref = masks()
    ref[0:3, 0:3] = True            # 9 missed pixels
    mask[6:11, 6:11] = True         # 25 extra pixels, centre (8, 8)
    assert clicks.correction_click(mask, ref) == Point(8.5, 8.5, False)
    # missed regions of 9 and 6 pixels (15 in all) against one extra region of 12: the largest
    # component counts, not the sum; the 3x4 extra block at the border: (9, 9) first of the ties
    mask, ref = masks()
    ref[0:3, 0:3] = True
    ref[0:2, 9:12] = True
    mask[8:11, 8:12] = True
    assert clicks.correction_click(mask, ref) == Point(9.5, 9.5, False)
    # a tie goes to the missed region (positive)
    mask, ref = masks()
    ref[0:3, 0:3] = True
    mask[8:11, 8:11] = True
    assert clicks.correction_click(mask, ref) == Point(1.5, 1.5, True)


def test_the_image_border_counts_as_the_region_s_boundary():
    mask, ref = masks()
    ref[0:3, 0:3] = True            # in the corner: without the border the farthest pixel is (0, 0)
    assert clicks.centre(ref) == (1, 1)
    assert clicks.correction_click(mask, ref) == Point(1.5, 1.5, True)


def test_components_are_eight_connected():
    region = np.zeros((12, 12), bool)
    region[0:2, 0:3] = True         # 6 pixels, first in raster order
    region[5:7, 5:7] = True         # two 2x2 squares touching at a corner: one component of 8
    region[7:9, 7:9] = True
    largest = clicks.largest_component(region)
    assert largest.sum() == 8 and largest[5, 5] and largest[8, 8] and not largest[0, 0]
    # every pixel of it is 1 from its boundary: the first in raster order is the centre
    assert clicks.centre(largest) == (5, 5)
    mask, ref = masks()
    assert clicks.correction_click(mask, region) == Point(5.5, 5.5, True)


def test_the_farthest_pixel_of_an_elongated_region_is_on_its_middle_line():
    region = np.zeros((9, 15), bool)
    region[2:7, 1:14] = True        # 5 rows x 13 columns: distance 3 only on row 4, columns 3-11
    row, col = clicks.centre(region)
    assert (row, col) == (4, 3)     # the first of the ties in raster order
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    assert distance[row, col] == distance.max() == 3.0


def test_agreeing_masks_need_no_click_and_bad_input_is_refused():
    mask, ref = masks()
    assert clicks.correction_click(mask, ref) is None
    mask[3:5, 3:5] = ref[3:5, 3:5] = True
    assert clicks.correction_click(mask, ref) is None
    with pytest.raises(ValueError):
        clicks.correction_click(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        clicks.centre(np.zeros((4, 4), bool))
    assert not clicks.largest_component(np.zeros((4, 4), bool)).any()
