"""Training from a volume's slices (training/volume_training.py): the ignore map, the slice
sampling, the samples' inputs and labels (dense maps, per-slice boxes), the shared CE + batch Dice
loss and the partial-CE controls on ignored voxels, the 3-D scores, the crops, resuming, the CLI.
Hand-computed values on small synthetic volumes; the real pipeline (one-box pseudo-labels ->
training -> export -> a gateway's SegmentVolume) is tests/integration/test_volume_training.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")
nib = pytest.importorskip("nibabel", reason="nibabel is not installed")

import torch  # noqa: E402

from service.core.domain import Window  # noqa: E402
from service.core.segmenter_io import preprocess  # noqa: E402
from service.core.volume import VolumeSource, load_volume  # noqa: E402
from training import cli  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training import volume_training as vt  # noqa: E402
from training.model import NetworkConfig  # noqa: E402
from training.train import TrainConfig, batch_loss  # noqa: E402

TINY = NetworkConfig(channels=(4, 8), num_res_units=0)


def raw_volume(stack: np.ndarray, window: Window | None = Window(0.5, 1.0)):
    """A raw float32 upload (model orientation = the array's), windowed to [0, 1] by default."""
    stack = np.ascontiguousarray(stack, np.float32)
    return load_volume(VolumeSource("raw", data=stack.tobytes(), dtype="float32", shape=stack.shape,
                                    spacing_mm=(1.0, 1.0, 2.0), window=window))


def cube_stack(depth: int = 8, h: int = 16, w: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): a bright 5x5 square on slices 2..4 over a dim ramp (values 0..0.3)."""
    image = np.tile(np.linspace(0.0, 0.3, w, dtype=np.float32), (depth, h, 1))
    mask = np.zeros((depth, h, w), bool)
    mask[2:5, 4:9, 4:9] = True
    image[mask] = 1.0
    return image, mask


# --------------------------------------------------------------------------- the rules
def test_label_map_is_one_zero_and_minus_one_where_uncertain():
    label = np.array([[[1, 0, 0], [1, 1, 0]]], np.uint8)
    uncertain = np.array([[[0, 1, 0], [1, 0, 0]]], bool)
    np.testing.assert_array_equal(vt.label_map(label, uncertain), [[[1, -1, 0], [-1, 1, 0]]])
    np.testing.assert_array_equal(vt.label_map(label), label.astype(np.int64))
    assert vt.label_map(label).dtype == np.int64
    with pytest.raises(ValueError, match="does not fit"):
        vt.label_map(label, uncertain[:, :1])


def test_training_slices_keep_foreground_and_every_nth_background_never_all_ignored():
    labels = np.zeros((10, 2, 2), np.int64)
    labels[1, 0, 0] = 1                 # foreground
    labels[2] = -1                      # all uncertain (a stop slice): never
    labels[5] = -1
    labels[5, 1, 1] = 1                 # foreground with the rest uncertain: kept
    labels[8] = -1                      # 8 % 4 == 0 but nothing certain: dropped
    labels[9, 0, 1] = 1
    assert vt.training_slices(labels, 4) == [0, 1, 4, 5, 9]
    assert vt.training_slices(labels, 1) == [0, 1, 3, 4, 5, 6, 7, 9]
    assert vt.training_slices(labels, 3) == [0, 1, 3, 5, 6, 9]
    with pytest.raises(ValueError):
        vt.training_slices(labels, 0)


def test_hemisphere_ranges_leave_the_middle_column_out():
    assert vt.hemisphere_ranges(181) == ((0, 90), (91, 181))
    assert vt.hemisphere_ranges(10) == ((0, 5), (6, 10))


# --------------------------------------------------------------------------- samples and loss
def test_pseudo_samples_hold_the_map_in_scribbles_and_the_served_input():
    image, mask = cube_stack(h=16, w=12)            # not square: 4 padded columns at size 16
    volume = raw_volume(image)
    labels = vt.label_map(mask, vpl.edge_band(mask, 1))
    samples = vt.volume_samples(volume, labels, 16, "pseudo", "cube", background_every=4)
    assert vt.slice_indices(samples) == [0, 2, 3, 4]
    for i, k in enumerate([0, 2, 3, 4]):
        np.testing.assert_array_equal(samples.scribbles[i, :, :12].numpy(), labels[k])
        assert (samples.scribbles[i, :, 12:] == -1).all()           # padding is ignored
        np.testing.assert_array_equal(samples.images[i].numpy(), preprocess(volume.slice_pixels(k), 16)[0][0])
    assert (samples.pseudo == -1).all()


def test_2_5d_samples_hold_each_slice_with_its_neighbours_as_channels_and_the_middle_slices_label():
    image, mask = cube_stack(h=16, w=12)
    image = image + np.arange(len(image), dtype=np.float32)[:, None, None] * 0.01   # every slice differs
    volume = raw_volume(image)
    samples = vt.volume_samples(volume, vt.label_map(mask), 16, "full", background_every=4, context=1)
    ks = vt.slice_indices(samples)
    assert samples.images.shape == (len(ks), 3, 16, 16)
    for i, k in enumerate(ks):
        for c, j in enumerate((max(k - 1, 0), k, min(k + 1, volume.depth - 1))):
            np.testing.assert_array_equal(samples.images[i, c].numpy(), preprocess(volume.slice_pixels(j), 16)[0][0, 0])
        np.testing.assert_array_equal(samples.masks[i, :, :12].numpy(), mask[k].astype(np.int64))
    from training.model import build_network

    assert build_network(replace(TINY, context_slices=1))(samples.images[:2]).shape == (2, 2, 16, 16)


def test_full_samples_hold_the_reference_in_masks_and_refuse_ignored_voxels():
    image, mask = cube_stack()
    volume = raw_volume(image)
    samples = vt.volume_samples(volume, vt.label_map(mask), 16, "full", background_every=8)
    assert vt.slice_indices(samples) == [0, 2, 3, 4]
    np.testing.assert_array_equal(samples.masks.numpy(), mask[[0, 2, 3, 4]].astype(np.int64))
    with pytest.raises(ValueError, match="no ignored"):
        vt.volume_samples(volume, vt.label_map(mask, vpl.edge_band(mask, 1)), 16, "full")
    with pytest.raises(ValueError, match="unknown volume method"):
        vt.volume_samples(volume, vt.label_map(mask), 16, "box")


def test_full_samples_hold_the_reference_with_padding_ignored_for_the_shared_loss():
    image, mask = cube_stack(h=16, w=12)
    samples = vt.volume_samples(raw_volume(image), vt.label_map(mask), 16, "full", background_every=8)
    np.testing.assert_array_equal(samples.scribbles[:, :, :12].numpy(), mask[[0, 2, 3, 4]].astype(np.int64))
    assert (samples.scribbles[:, :, 12:] == -1).all()            # only the padding is ignored
    assert (samples.masks[:, :, 12:] == 0).all()
    assert vt.METHODS["full"][0] == vt.METHODS["pseudo"][0] == "dice_ce"   # (a) and (b) share one loss


def test_slice_box_is_the_bounding_box_of_all_the_slice_foreground():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:4] = True
    mask[4, 6] = True                                            # a second piece: one box around both
    np.testing.assert_array_equal(vt.slice_box(mask), [[2, 1, 7, 5]])
    assert vt.slice_box(np.zeros((6, 8), bool)).shape == (0, 4)


def test_boxes_samples_hold_one_box_per_foreground_slice_and_refuse_ignored_voxels():
    image, mask = cube_stack()                                   # 16x16 at size 16: the frame is the slice
    volume = raw_volume(image)
    samples = vt.volume_samples(volume, vt.label_map(mask), 16, "boxes", background_every=8)
    assert vt.slice_indices(samples) == [0, 2, 3, 4]
    np.testing.assert_array_equal(samples.boxes[0].numpy(), np.zeros((4, 4)))     # slice 0: no box
    for i in (1, 2, 3):
        np.testing.assert_array_equal(samples.boxes[i, 0].numpy(), [4, 4, 9, 9])
        assert (samples.boxes[i, 1:] == 0).all()
    assert (samples.scribbles == -1).all()                       # the reference reaches the loss only as boxes
    with pytest.raises(ValueError, match="no ignored"):
        vt.volume_samples(volume, vt.label_map(mask, vpl.edge_band(mask, 1)), 16, "boxes")


def test_scribble_samples_are_strokes_inside_and_outside_the_reference_drawn_the_same_each_time():
    image, mask = cube_stack()
    volume = raw_volume(image)
    samples = vt.volume_samples(volume, vt.label_map(mask), 16, "scribbles", background_every=8)
    strokes, masks = samples.scribbles.numpy(), samples.masks.numpy()
    assert (strokes == 1).any() and (strokes == 0).any() and (strokes == -1).any()
    assert (masks[strokes == 1] == 1).all() and (masks[strokes == 0] == 0).all()
    assert (strokes == 1).sum() < (masks == 1).sum()             # a stroke, not the whole structure
    again = vt.volume_samples(volume, vt.label_map(mask), 16, "scribbles", background_every=8)
    np.testing.assert_array_equal(again.scribbles.numpy(), strokes)
    assert vt.METHODS["scribbles"][0] == "scribble"
    with pytest.raises(ValueError, match="no ignored"):
        vt.volume_samples(volume, vt.label_map(mask, vpl.edge_band(mask, 1)), 16, "scribbles")


def _logits(margin: list[float]) -> torch.Tensor:
    """(1, 2, 1, N) logits with foreground minus background = ``margin``."""
    m = torch.tensor([[margin]], dtype=torch.float64)
    return torch.stack([torch.zeros_like(m), m], dim=1)


def test_the_pseudo_method_loss_is_ce_plus_batch_dice_and_ignores_uncertain_pixels_hand_computed():
    from training.losses import BATCH_DICE_SMOOTH as s

    cfg = TrainConfig(method=vt.METHODS["pseudo"][0])
    labels = torch.tensor([[[1, 0, -1]]])
    logits = _logits([2.0, 0.0, 7.0])
    p1 = 1 / (1 + math.exp(-2.0))                                  # p of the two certain pixels: p1, 0.5
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2 + 1 - (2 * p1 + s) / (p1 + 0.5 + 1 + s)
    assert float(batch_loss(cfg, logits, {"scribbles": labels})) == pytest.approx(expected, rel=1e-9)
    logits[0, 1, 0, 2] = -30.0                                     # the ignored pixel: no effect
    assert float(batch_loss(cfg, logits, {"scribbles": labels})) == pytest.approx(expected, rel=1e-9)
    logits[0, 1, 0, 1] = 3.0                                       # a certain one: it counts
    assert float(batch_loss(cfg, logits, {"scribbles": labels})) > expected + 0.5


def test_the_partial_ce_controls_ignore_uncertain_pixels_hand_computed():
    cfg = TrainConfig(method=vt.METHODS["pseudo_ce"][0])
    assert vt.METHODS["full_ce"][0] == cfg.method == "scribble"
    labels = torch.tensor([[[1, 0, -1]]])
    logits = _logits([2.0, 0.0, 7.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2   # CE of the two certain pixels
    assert float(batch_loss(cfg, logits, {"scribbles": labels})) == pytest.approx(expected, rel=1e-9)
    logits[0, 1, 0, 2] = -30.0
    assert float(batch_loss(cfg, logits, {"scribbles": labels})) == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- 3-D evaluation
class Threshold(torch.nn.Module):
    """Logits (bg, fg) = (0.5 - x, x - 0.5) x 10: foreground where the input is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def test_predict_volume_is_the_per_slice_serving_path_and_scores_are_3d():
    image, mask = cube_stack()
    volume = raw_volume(image)
    pred = vt.predict_volume(Threshold(), volume, 16, batch=3)   # batches across the cube
    np.testing.assert_array_equal(pred, mask)
    ref = mask.copy()
    ref[4] = False                                              # 75 predicted, 50 reference voxels
    score = vt.score_masks(pred, ref, volume)
    assert score.dice == pytest.approx(2 * 50 / 125)
    assert (score.predicted_voxels, score.reference_voxels) == (75, 50)
    assert score.predicted_slices == (2, 4) and score.reference_slices == (2, 3)
    assert vt.evaluate_volume(Threshold(), volume, mask, 16).nsd == pytest.approx(1.0)
    # NSD at 2 mm: slice 4 is 2 mm (one slice) above the reference's top face -> within tolerance
    # for its own surface; at 1 mm it is not.
    assert vt.score_masks(pred, ref, volume, 1.0).nsd < score.nsd


# --------------------------------------------------------------------------- files
def test_crop_nifti_keeps_every_voxel_at_its_world_position(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    affine = np.diag([0.9, 1.1, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    out = vt.crop_nifti(tmp_path / "a.nii.gz", tmp_path / "c.nii.gz", x=(2, 5), z=(1, 3))
    crop = nib.load(out)
    np.testing.assert_array_equal(np.asarray(crop.dataobj), data[2:5, :, 1:3])
    assert crop.get_data_dtype() == np.int16
    np.testing.assert_allclose(crop.affine @ [0, 0, 0, 1], affine @ [2, 0, 1, 1])
    np.testing.assert_allclose(crop.affine[:3, :3], affine[:3, :3])


def test_pseudo_label_map_reads_saved_files_back_in_model_orientation(tmp_path):
    image = np.random.default_rng(0).integers(0, 200, (12, 10, 6)).astype(np.uint8)  # stored x, y, z
    nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "img.nii.gz")
    volume = vt.read_volume(tmp_path / "img.nii.gz")
    masks = np.zeros((volume.depth, *volume.slice_shape), bool)
    masks[2, 1:4, 2:7] = True                         # model orientation
    unc = vpl.edge_band(masks, 1)
    unc[5] = True
    pl = vpl.VolumePseudoLabel("s", volume.mask_array({k: masks[k] for k in range(volume.depth)}),
                               volume.mask_array({k: unc[k] for k in range(volume.depth)}) > 0,
                               np.asarray(volume.affine), (), (), (2,), ((2.0, 1.0, 7.0, 4.0),), (0, 5))
    vpl.save(pl, tmp_path / "pl")
    labels, back = vt.pseudo_label_map(tmp_path / "pl", "s", volume)
    np.testing.assert_array_equal(labels, vt.label_map(masks, unc))
    assert back.key_slices == (2,)


# --------------------------------------------------------------------------- training
def test_train_volume_resumes_like_the_trainer_and_refuses_another_method(tmp_path):
    image, mask = cube_stack()
    volume = raw_volume(image)
    labels = vt.label_map(mask, vpl.edge_band(mask, 1))
    cfg = TrainConfig(structure="cube", size=16, iterations=6, batch_size=2, threads=1, checkpoint_every=2,
                      network=TINY)
    whole = vt.train_volume(cfg, volume, labels, "pseudo", tmp_path / "whole", progress=False)
    vt.train_volume(cfg, volume, labels, "pseudo", tmp_path / "split", stop_after=3, progress=False)
    resumed = vt.train_volume(cfg, volume, labels, "pseudo", tmp_path / "split", progress=False)
    assert resumed.iterations == 6
    assert resumed.history == pytest.approx(whole.history, rel=1e-5, abs=1e-6)
    record = json.loads((tmp_path / "split" / vt.RUN_FILE).read_text())
    assert record["method"] == "pseudo" and record["trainer_method"] == "dice_ce"
    assert record["slices"] == [0, 2, 3, 4] and record["foreground_slices"] == [2, 3, 4]
    with pytest.raises(ValueError, match="method"):
        vt.train_volume(cfg, volume, labels, "pseudo_ce", tmp_path / "split", progress=False)
    full = vt.train_volume(replace(cfg, iterations=2), volume, vt.label_map(mask), "full", tmp_path / "full",
                           progress=False)
    assert full.iterations == 2
    boxes = vt.train_volume(replace(cfg, iterations=2), volume, vt.label_map(mask), "boxes", tmp_path / "boxes",
                            progress=False)
    assert boxes.iterations == 2
    assert json.loads((tmp_path / "boxes" / vt.RUN_FILE).read_text())["trainer_method"] == "box_size"


def test_cli_trains_from_a_saved_pseudo_label_and_evaluates_in_3d(tmp_path, capsys):
    stack, mask = cube_stack(depth=6, h=16, w=16)
    # stored (x, y, z) arrays whose gateway slices are the stack's (flipud(vol[:, :, k].T) = stack[k])
    to_stored = lambda a: np.ascontiguousarray(np.flip(a, axis=1).transpose(2, 1, 0))  # noqa: E731
    nib.save(nib.Nifti1Image((to_stored(stack) * 200).astype(np.uint8), np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(to_stored(mask).astype(np.uint8), np.eye(4)), tmp_path / "ref.nii.gz")
    volume = vt.read_volume(tmp_path / "img.nii.gz")
    ref = vt.model_masks(tmp_path / "ref.nii.gz", volume)
    unc = vpl.edge_band(ref, 1)
    pl = vpl.VolumePseudoLabel("cube", volume.mask_array({k: ref[k] for k in range(volume.depth)}),
                               volume.mask_array({k: unc[k] for k in range(volume.depth)}) > 0,
                               np.asarray(volume.affine), (), (), (3,), ((4.0, 4.0, 9.0, 9.0),), (0, 5))
    vpl.save(pl, tmp_path / "pl")
    run = tmp_path / "run"
    common = ["--volume", str(tmp_path / "img.nii.gz"), "--run-dir", str(run), "--size", "16", "--batch-size", "2",
              "--threads", "1", "--no-progress"]
    assert cli.main(["train-volume", "--method", "pseudo", "--pseudo", str(tmp_path / "pl"), "--iterations", "2",
                     *common]) == 0
    assert "2 iterations" in capsys.readouterr().out
    assert cli.main(["train-volume", "--method", "pseudo", "--pseudo", str(tmp_path / "pl"), "--iterations", "3",
                     *common]) == 0                                  # resumed: one more iteration
    assert "3 iterations" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["structure"] == "cube"
    assert cli.main(["evaluate-volume", "--checkpoint", str(run / "checkpoint.pt"), "--volume",
                     str(tmp_path / "img.nii.gz"), "--reference", str(tmp_path / "ref.nii.gz")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["reference_voxels"] == 75 and 0.0 <= got["dice"] <= 1.0 and got["tolerance_mm"] == 2.0
    with pytest.raises(SystemExit, match="--reference"):
        cli.main(["train-volume", "--method", "full", "--iterations", "1", *common])
    with pytest.raises(SystemExit, match="--pseudo"):
        cli.main(["train-volume", "--method", "pseudo_ce", "--iterations", "1", *common])
    # 2.5-D: its own run folder (a run of another context is not resumed), evaluated with its stacks
    with pytest.raises(ValueError, match="other context slices"):
        cli.main(["train-volume", "--method", "pseudo", "--pseudo", str(tmp_path / "pl"), "--iterations", "4",
                  "--context-slices", "1", *common])
    deep = [str(tmp_path / "run25") if a == str(run) else a for a in common]
    assert cli.main(["train-volume", "--method", "pseudo", "--pseudo", str(tmp_path / "pl"), "--iterations", "2",
                     "--context-slices", "1", *deep]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "run25" / "config.json").read_text())["network"]["context_slices"] == 1
    assert cli.main(["evaluate-volume", "--checkpoint", str(tmp_path / "run25" / "checkpoint.pt"), "--volume",
                     str(tmp_path / "img.nii.gz"), "--reference", str(tmp_path / "ref.nii.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["reference_voxels"] == 75
    with pytest.raises(SystemExit, match="--context-slices"):
        cli.main(["train-volume", "--method", "pseudo", "--pseudo", str(tmp_path / "pl"), "--context-slices", "-1",
                  *deep])
