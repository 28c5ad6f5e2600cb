"""Image-level labels (training/cam_labels.py): the pure rules (ticks, CAM -> box, box fill, label
assembly) against hand-computed small arrays; the slice classifier + MONAI CAM on a tiny synthetic
volume (a bright square on some slices: the CAM box must land on it); and the saved label read
back by train-volume's reader, with a stand-in for LiteMedSAM (the served model is not run here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")
nib = pytest.importorskip("nibabel", reason="nibabel is not installed")

import torch  # noqa: E402

from training import cam_labels as cl  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training import volume_training as vt  # noqa: E402


# --------------------------------------------------------------------------- pure rules
def test_ticks_from_mask():
    mask = np.zeros((4, 3, 3), bool)
    mask[1, 0, 0] = True
    mask[3, 2, 1:] = True
    assert cl.ticks_from_mask(mask).tolist() == [False, True, False, True]
    with pytest.raises(ValueError):
        cl.ticks_from_mask(mask[0])


def test_largest_component_is_4_connected():
    on = np.array([[1, 1, 0, 0],
                   [0, 1, 0, 1],
                   [0, 0, 1, 1]], bool)      # {(0,0),(0,1),(1,1)} and {(1,3),(2,2),(2,3)}; (1,1)-(2,2) only diagonal
    got = cl.largest_component(on)
    assert got.sum() == 3 and got[0, 0] and got[1, 1] and not got[2, 2]   # tie: the first in scan order
    on[0, 2] = True                                                       # joins (0,1): now 4 pixels
    assert cl.largest_component(on).sum() == 4 and cl.largest_component(on)[0, 2]
    assert not cl.largest_component(np.zeros((2, 2), bool)).any()


def test_cam_box_threshold_component_and_margin():
    cam = np.zeros((6, 8))
    cam[1:3, 1:4] = 10.0     # 2 x 3 block at the maximum
    cam[2, 2] = 12.0         # the maximum: threshold 6
    cam[5, 6:8] = 7.0        # above the threshold but smaller (2 pixels)
    cam[4, 0] = 5.0          # below the threshold
    assert cl.cam_box(cam, 0.5, 0.0) == (1, 1, 4, 3)
    # margin 0.5: x grows round(0.5 * 3) = 2 (clipped at 0), y grows round(0.5 * 2) = 1
    assert cl.cam_box(cam, 0.5, 0.5) == (0, 0, 6, 4)
    # a threshold of 0.9 x 12 = 10.8 keeps only the maximum
    assert cl.cam_box(cam, 0.9, 0.0) == (2, 2, 3, 3)
    assert cl.cam_box(np.full((3, 3), -1.0)) is None
    assert cl.cam_box(np.zeros((3, 3))) is None


def test_grow_box_clips_to_the_slice():
    assert cl.grow_box((2, 1, 6, 3), (4, 7), 0.25) == (1, 1, 7, 3)   # dx 1, dy round(0.5) = 0 (half to even)
    assert cl.grow_box((2, 1, 6, 3), (4, 7), 0.5) == (0, 0, 7, 4)    # dx 2, dy 1, clipped to 7 x 4
    assert cl.grow_box((0, 0, 4, 4), (4, 4), 1.0) == (0, 0, 4, 4)


def test_box_masks_fill_pixel_centres():
    got = cl.box_masks((2, 4, 4), {1: (1, 0, 3, 2)})
    expected = np.zeros((2, 4, 4), bool)
    expected[1, 0:2, 1:3] = True
    assert np.array_equal(got, expected)


def test_assemble_ticks_ious_and_edge_band():
    masks = np.zeros((4, 5, 5), bool)
    masks[0, 1:4, 1:4] = True      # ticked absent: must become background
    masks[1, 1:4, 1:4] = True      # ticked, good IoU
    masks[3, 2, 2] = True          # ticked absent
    ticks = np.array([False, True, True, False])   # slice 2 ticked but no box (no IoU) and no mask
    label, uncertain, records = cl.assemble(masks, ticks, {1: 0.9}, vpl.UncertainRules(edge_px=0))
    assert label[1].sum() == 9 and not label[[0, 2, 3]].any()
    assert [(r.slice_index, r.iou, r.area) for r in records] == [(1, 0.9, 9), (2, 0.0, 0)]
    assert uncertain[2].all() and not uncertain[[0, 1, 3]].any()
    # a low predicted IoU makes the whole ticked slice uncertain (UncertainRules.min_iou 0.5)
    _, uncertain, _ = cl.assemble(masks, ticks, {1: 0.3}, vpl.UncertainRules(edge_px=0))
    assert uncertain[1].all()
    # edge band of 1 px around the 3x3 square: cross dilation (all but the 4 corners) minus the
    # cross erosion (the centre): 20 pixels
    _, uncertain, _ = cl.assemble(masks, ticks, {1: 0.9}, vpl.UncertainRules(edge_px=1))
    expected = np.ones((5, 5), bool)
    expected[[0, 0, 4, 4], [0, 4, 0, 4]] = False
    expected[2, 2] = False
    assert np.array_equal(uncertain[1], expected)
    assert not uncertain[0].any() and not uncertain[3].any()    # ticked absent: certain
    with pytest.raises(ValueError):
        cl.assemble(masks, ticks[:3], {})


# --------------------------------------------------------------------------- classifier + CAM
# A fixed window: with the gateway's per-slice percentiles (what a NIfTI without one gets) the
# square's presence also darkens the whole slice's noise, and the classifier may learn that instead.
WINDOW = (127.5, 255.0)


def square_volume(path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A 40 x 40 x 16 NIfTI: noise, and a bright 10 x 10 square on slices 4..11; its mask."""
    rng = np.random.default_rng(seed)
    image = rng.normal(60, 12, (40, 40, 16)).clip(0, 255)
    mask = np.zeros((40, 40, 16), np.uint8)
    mask[6:16, 22:32, 4:12] = 1
    image[mask > 0] = 200
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(image.astype(np.uint8), affine), str(path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(path / "mask.nii.gz"))
    return path / "image.nii.gz", path / "mask.nii.gz"


TINY = cl.ClassifierConfig(size=32, channels=(8, 16), strides=(2, 1), iterations=200, batch_size=8, lr=3e-3,
                           shift_px=2, seed=0, threads=1)


def test_classifier_cam_box_lands_on_the_square(tmp_path):
    torch.set_num_threads(1)
    image, mask = square_volume(tmp_path)
    volume = vt.read_volume(image, WINDOW)
    ref = vt.model_masks(mask, volume)
    ticks = cl.ticks_from_mask(ref)
    assert ticks.tolist() == [4 <= k < 12 for k in range(16)]
    clf = cl.train_classifier(vt.served_inputs(volume, range(volume.depth), TINY.size), ticks, TINY)
    assert clf.train_accuracy == 1.0
    present = [int(k) for k in np.flatnonzero(ticks)]
    cams = cl.slice_cams(clf.model, volume, present, TINY.size)
    assert all(cams[k].shape == volume.slice_shape for k in present)
    for k in present:
        box = cl.cam_box(cams[k])
        assert box is not None, k
        inside = cl.box_masks((1, *volume.slice_shape), {0: box})[0]
        # on the square: it holds (nearly) all of it, and is not the whole slice (the CAM is coarse:
        # 16 x 16 cells at 32 x 32, so the box is larger than the square's 6 % of the slice)
        assert (inside & ref[k]).sum() >= 0.9 * ref[k].sum(), (k, box)
        assert inside.mean() <= 0.4, (k, box)


class BoxPredictor:
    """Stands in for the served LiteMedSAM: the whole slice as its mask (kept inside the box)."""

    class _Embedding:
        def __init__(self, shape):
            self.frame = shape

    def embed(self, pixels):
        return self._Embedding(pixels.shape)

    def predict(self, embedding, prompts):
        return np.zeros((len(prompts), 1, 1), np.float32), np.full(len(prompts), 0.8, np.float32)

    def masks(self, low, frame):
        return np.ones((len(low), *frame), bool)


def test_saved_label_reads_back_as_train_volume_reads_it(tmp_path):
    torch.set_num_threads(1)
    image, mask = square_volume(tmp_path)
    volume = vt.read_volume(image, WINDOW)
    ref = vt.model_masks(mask, volume)
    ticks = cl.ticks_from_mask(ref)
    label = cl.cam_pseudo_label(BoxPredictor(), volume, ticks, "square", TINY, rules=vpl.UncertainRules(edge_px=1))
    # with a predictor answering "everything", the label is the CAM boxes filled
    assert np.array_equal(label.pl.masks, label.box_only)
    assert sorted(label.boxes) == [k for k in range(16) if ticks[k]]
    cl.save(label, tmp_path / "pseudo")
    labels, pl = vt.pseudo_label_map(tmp_path / "pseudo", "square", volume)
    assert np.array_equal(labels >= 0, ~vpl.edge_band(label.pl.masks, 1))
    assert np.array_equal(labels == 1, label.pl.masks & ~vpl.edge_band(label.pl.masks, 1))
    assert (labels[~ticks] == 0).all()                               # ticked absent: certain background
    assert pl.reference_extent == (4, 11) and pl.stops == ()
    samples = vt.volume_samples(volume, labels, 32, "pseudo", "square")
    assert len(samples.case_ids) > 0


def test_classifier_volume_windows(tmp_path):
    image, _ = square_volume(tmp_path)
    served = vt.read_volume(image)                      # a NIfTI without a window: per-slice percentiles
    assert cl.classifier_volume(served, "served") is served
    seen = cl.classifier_volume(served, "volume")
    assert seen.window == served.window and seen.window_source != served.window_source
    # slice 0 has no square: its own percentiles stretch the noise; the volume's window (set by
    # the squares' 200) does not, so the same voxels are darker
    assert seen.slice_pixels(0).mean() < served.slice_pixels(0).mean()
    fixed = vt.read_volume(image, WINDOW)
    assert cl.classifier_volume(fixed, "volume") is fixed   # already one window
    with pytest.raises(ValueError):
        cl.classifier_volume(served, "other")
