"""Volume pseudo-labels: the uncertain-region and drift rules on hand-computed arrays, and one
short real run of the served predictor on colin27."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the training extra (requirements/training.txt) is not installed")
nib = pytest.importorskip("nibabel", reason="nibabel is not installed")

from service.core.domain import Box  # noqa: E402
from service.inference import propagation as prop  # noqa: E402
from training import cli, qc  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def rec(k: int, iou: float = 0.9, area: int = 100) -> vpl.SliceRecord:
    return vpl.SliceRecord(k, iou, area, "tail above")


# --------------------------------------------------------------------------- pure rules
def test_edge_band_is_dilation_minus_erosion_per_slice():
    masks = np.zeros((3, 7, 7), bool)
    masks[1, 2:5, 2:5] = True                      # a 3x3 square on the middle slice only
    band = vpl.edge_band(masks, 1)
    # cross dilation: the 5x5 square without its 4 corners (21 px); cross erosion: the centre (1 px)
    expected = np.zeros((7, 7), bool)
    expected[1:6, 1:6] = True
    expected[[1, 1, 5, 5], [1, 5, 1, 5]] = False
    expected[3, 3] = False
    assert not band[0].any() and not band[2].any()  # slices do not mix
    np.testing.assert_array_equal(band[1], expected)
    assert band[1].sum() == 20
    assert not vpl.edge_band(masks, 0).any()


def test_edge_band_of_two_pixels_reaches_two_pixels_out_and_in():
    masks = np.zeros((1, 15, 15), bool)
    masks[0, 3:12, 3:12] = True                    # 9x9 square
    band = vpl.edge_band(masks, 2)[0]
    row = band[7]                                   # through the middle: out 2, in 2 at each side
    np.testing.assert_array_equal(np.flatnonzero(row), [1, 2, 3, 4, 10, 11, 12, 13])


def test_uncertain_slices_low_iou_stops_and_outside_bounds():
    records = [rec(3), rec(4, iou=0.4), rec(5), rec(6), rec(7)]
    stops = [vpl.Stop(5, -1, 3, "predicted IoU 0.20 below 0.3"),   # a model stop: 3 and 2
             vpl.Stop(5, 1, 7, vpl.RANGE_END)]                     # the range ended: only 8
    got = vpl.uncertain_slices(records, stops, depth=10, bounds=(1, 8), rules=vpl.UncertainRules(min_iou=0.5))
    assert got == [0, 2, 3, 4, 8, 9]
    no_stops = vpl.uncertain_slices(records, stops, 10, (1, 8), vpl.UncertainRules(min_iou=0.5, stop_slices=False))
    assert no_stops == [0, 4, 9]


def test_uncertain_mask_is_whole_slices_plus_the_edge_band():
    masks = np.zeros((4, 7, 7), bool)
    masks[1:3, 2:5, 2:5] = True
    records = [rec(1), rec(2)]
    stops = [vpl.Stop(1, -1, 1, "mask vanished"), vpl.Stop(1, 1, 2, vpl.RANGE_END)]
    unc = vpl.uncertain_mask(masks, records, stops, (0, 3), vpl.UncertainRules(edge_px=1))
    assert unc[0].all() and unc[1].all()            # slice 0: beyond the stop; slice 1: its last slice
    assert unc[3].all()                              # after the range end
    np.testing.assert_array_equal(unc[2], vpl.edge_band(masks, 1)[2])


def test_key_slices_one_is_the_largest_area_more_are_evenly_spaced_over_the_extent():
    areas = np.zeros(40)
    areas[10:30] = np.arange(20) + 1
    areas[15] = 100
    assert vpl.key_slices_of(areas, 1) == [15]
    # targets 10 + 19 * (i + 0.5) / 3 = 13.17, 19.5, 25.83
    assert vpl.key_slices_of(areas, 3) == [13, 19, 26]
    areas[19] = areas[20] = 0                        # no reference there: the nearest slice with some
    assert vpl.key_slices_of(areas, 3) == [13, 18, 26]
    with pytest.raises(ValueError):
        vpl.key_slices_of(np.zeros(5), 1)


def test_drawn_box_is_tight_and_jitter_moves_sides_within_the_fraction_reproducibly():
    mask = np.zeros((50, 60), bool)
    mask[10:30, 20:40] = True
    assert vpl.drawn_box(mask) == Box(20.0, 10.0, 40.0, 30.0)
    a = vpl.drawn_box(mask, 0.1, np.random.default_rng(3))
    b = vpl.drawn_box(mask, 0.1, np.random.default_rng(3))
    assert a == b and a != Box(20.0, 10.0, 40.0, 30.0)
    assert abs(a.x0 - 20) <= 2 and abs(a.x1 - 40) <= 2 and abs(a.y0 - 10) <= 2 and abs(a.y1 - 30) <= 2


def test_records_of_a_segment_keep_source_iou_area_and_stop_reason():
    box = Box(1.0, 1.0, 4.0, 4.0)
    state = prop.State(anchors=((5, box),), bounds=(0, 9))
    masks = {k: np.zeros((6, 6), bool) for k in (3, 4, 5, 6)}
    for k, m in masks.items():
        m[1:1 + k - 2, 1:4] = True
    results = {}
    for piece in prop.plan(state):
        r = prop.PieceResult()
        if piece.kind == "anchor":
            r.slices[5] = prop.SliceResult.of(masks[5], 0.9)
        elif piece.step < 0:
            r.slices = {4: prop.SliceResult.of(masks[4], 0.8), 3: prop.SliceResult.of(masks[3], 0.7)}
            r.stop_reason = "mask vanished"
        else:
            r.slices = {6: prop.SliceResult.of(masks[6], 0.6)}
            r.stop_reason = "area grew more than 3x"
        results[piece.key] = r
    records, stops = vpl.records_of(state, results)
    assert [(r.slice_index, r.source, r.area, r.stop) for r in records] == [
        (3, "tail below", 3, "mask vanished"), (4, "tail below", 6, ""), (5, "anchor", 9, ""),
        (6, "tail above", 12, "area grew more than 3x")]
    assert records[0].iou == pytest.approx(0.7)
    assert sorted((s.step, s.last) for s in stops) == [(-1, 3), (1, 6)]


def test_drift_flags_area_jump_iou_collapse_extent_and_volume_end():
    records = [rec(3, 0.9, 100), rec(4, 0.4, 110), rec(5, 0.8, 250), rec(6, 0.8, 240)]
    flags = qc.check_propagation("s", records, depth=7, extent=(4, 5))
    got = sorted((f.check, f.index, round(f.value, 3)) for f in flags)
    assert got == [("area_jump", 4, round(250 / 110, 3)), ("beyond_extent", 3, 1.0), ("beyond_extent", 6, 1.0),
                   ("iou_collapse", 4, 0.4), ("runs_to_volume_end", 6, 1.0)]
    calm = [rec(10, 0.9, 100), rec(11, 0.8, 190), rec(12, 0.8, 100)]
    assert qc.check_propagation("s", calm, depth=30, extent=None) == []
    assert qc.check_propagation("s", calm, depth=30, extent=(11, 12),
                                t=qc.DriftThresholds(extent_margin=1)) == []


def test_volume_report_lists_flagged_slices_with_their_pictures(tmp_path):
    flags = [qc.Flag("s", "iou_collapse", 4, 0.4, 0.5), qc.Flag("s", "area_jump", 4, 2.3, 2.0)]
    pictures = {k: np.zeros((8, 8, 3), np.uint8) for k in (2, 4)}
    path = qc.write_volume_report("s", flags, tmp_path, pictures, key_slices=(2,))
    text = path.read_text()
    assert "| s_z004 | iou_collapse |" in text and "| s_z004 | area_jump |" in text
    assert "[2](s_z002.png)" in text
    assert (tmp_path / "s_z002.png").is_file() and (tmp_path / "s_z004.png").is_file()


def test_cli_defines_the_volume_pseudo_labels_command():
    args = cli.parser().parse_args(["volume-pseudo-labels", "--volume", "a.nii.gz", "--reference", "m.nii.gz",
                                    "--out", "o", "--key-slices", "3", "--jitter", "0.1", "--seed", "2"])
    assert args.func is cli.cmd_volume_pseudo_labels
    assert (args.key_slices, args.jitter, args.seed) == ("3", 0.1, 2)
    assert cli.parser().parse_args(["volume-pseudo-labels", "--volume", "a", "--reference", "m", "--out", "o",
                                    "--key-slices", "every"]).key_slices == "every"


# --------------------------------------------------------------------------- one real run
@pytest.fixture(scope="module")
def predictor():
    if not (REPOSITORY / "medsam_lite_encoder" / "1" / "model.onnx").is_file():
        pytest.skip("LiteMedSAM ONNX files missing: run `python -m export medsam_lite --check-cases 0`")
    from service.inference.predictor import SamPredictor

    return SamPredictor.from_repository(REPOSITORY, "medsam_lite", threads=2)


@pytest.fixture(scope="module")
def real_run(shared_data, predictor):
    from service.core.volume import VolumeSource, load_volume

    folder = shared_data / "volumes" / "colin27_t1"
    volume = load_volume(VolumeSource("nifti", data=(folder / "image.nii.gz").read_bytes()))
    mask_file = folder / "masks" / "thalamus_left.nii.gz"
    reference = load_volume(VolumeSource("nifti", data=mask_file.read_bytes()))
    ref = vpl.reference_slices(reference, volume)
    key = vpl.key_slices_of(ref.reshape(len(ref), -1).sum(axis=1))[0]
    pl = vpl.volume_pseudo_label(predictor, volume, reference, bounds=(key - 2, key + 2), name="thalamus_left")
    return volume, folder, mask_file, key, pl


@pytest.mark.slow
def test_one_box_on_colin27_thalamus_gives_a_label_on_the_volume_grid(real_run, tmp_path):
    volume, folder, mask_file, key, pl = real_run
    image = nib.load(folder / "image.nii.gz")
    assert pl.label.shape == image.shape and pl.label.dtype == np.uint8
    assert pl.uncertain.shape == image.shape and pl.uncertain.dtype == bool
    np.testing.assert_allclose(pl.affine, image.affine)
    assert pl.key_slices == (key,)
    assert [r.slice_index for r in pl.records] == list(range(key - 2, key + 3))
    ref = np.asarray(nib.load(mask_file).dataobj) > 0
    near = slice(key - 2, key + 3)                  # axial slices are the last NIfTI axis
    # measured 0.899 (LiteMedSAM, medsam_lite, 2 CPU threads)
    assert dice(pl.label[:, :, near] > 0, ref[:, :, near]) > 0.8
    assert not pl.label[:, :, : key - 2].any() and not pl.label[:, :, key + 3:].any()

    # uncertain: the whole of the slices beyond where each side stopped (outside the bounds here)
    for s in pl.stops:
        assert pl.uncertain[:, :, s.last + s.step].all()
    assert pl.uncertain[:, :, : key - 2].all() and pl.uncertain[:, :, key + 3:].all()
    # ... and the edge band on every slice, and nothing else on the kept, confident slices
    band = volume.mask_array({k: b for k, b in enumerate(vpl.edge_band(pl.masks, 2)) if b.any()}) > 0
    assert band.any() and np.all(pl.uncertain[band])
    whole = vpl.uncertain_slices(pl.records, pl.stops, volume.depth, pl.bounds)
    kept = [k for k in range(key - 2, key + 3) if k not in whole]
    assert kept and np.array_equal(pl.uncertain[:, :, kept], band[:, :, kept])

    vpl.save(pl, tmp_path)
    back = vpl.load(tmp_path, "thalamus_left")
    np.testing.assert_array_equal(back.label, pl.label)
    np.testing.assert_array_equal(back.uncertain, pl.uncertain)
    np.testing.assert_allclose(back.affine, pl.affine)
    assert back.records == pl.records and back.stops == pl.stops and back.key_slices == pl.key_slices
    assert back.bounds == pl.bounds and back.reference_extent == pl.reference_extent


@pytest.mark.slow
def test_a_box_on_every_slice_is_litemedsam_in_each_box_with_background_beyond_and_gaps_left_empty(real_run,
                                                                                                   predictor):
    """``key_slices=EVERY_SLICE``: every slice with reference pixels is an anchor prompted with its
    own tight box, nothing is propagated (no tails, no stops), a slice inside the extent without
    reference pixels stays empty, and the slices beyond the boxed ones are certain background."""
    from service.core.domain import Prompt
    from service.core.volume import VolumeSource, load_volume
    from service.inference.volume_predictor import VolumePredictor

    volume, folder, mask_file, key, _ = real_run
    ref = vpl.reference_slices(load_volume(VolumeSource("nifti", data=mask_file.read_bytes())), volume)
    few = np.zeros_like(ref)
    few[[key - 2, key - 1, key + 1, key + 2]] = ref[[key - 2, key - 1, key + 1, key + 2]]   # key: a gap
    vp = VolumePredictor(predictor, volume)
    pl = vpl.volume_pseudo_label(vp, volume, few, key_slices=vpl.EVERY_SLICE, name="thalamus_left")
    assert pl.key_slices == (key - 2, key - 1, key + 1, key + 2) and pl.bounds == (key - 2, key + 2)
    assert pl.stops == () and {r.source for r in pl.records} == {"anchor"}
    assert [r.slice_index for r in pl.records] == list(pl.key_slices)
    for k in pl.key_slices:
        np.testing.assert_array_equal(pl.masks[k], vp.box_mask(k, Prompt(box=prop.bounding_box(few[k]))))
    assert not pl.masks[key].any()                                     # the unboxed slice in between
    assert not pl.masks[: key - 2].any() and not pl.masks[key + 3:].any()
    near = slice(key - 2, key + 3)
    assert not pl.uncertain[:, :, : key - 2].any() and not pl.uncertain[:, :, key + 3:].any()   # background
    assert dice(pl.label[:, :, near] > 0, volume.mask_array({k: few[k] for k in pl.key_slices})[:, :, near] > 0) > 0.7


@pytest.mark.slow
def test_qc_report_of_the_real_run_has_the_key_slice_picture(real_run, tmp_path):
    volume, _, _, key, pl = real_run
    flags, report = vpl.write_qc(pl, volume, tmp_path)
    assert (tmp_path / f"thalamus_left_z{key:03d}.png").is_file()
    assert f"[{key}](thalamus_left_z{key:03d}.png)" in report.read_text()
    assert all(f.check != "runs_to_volume_end" for f in flags)
