"""Tests of service.core.volume: DICOM series / NIfTI / raw volumes on real data.

The real CT is stored twice in ../shared/data/volumes: as a NIfTI (RAS+) and as a DICOM
series with a documented voxel mapping (pixel (r, c) of file k+1 is NIfTI voxel
(nx-1-c, ny-1-r, k)). Both must give the model bit-identical slices, and masks must go back
to each input's own grid exactly. Bad series are made from copies of the real files.
"""

from __future__ import annotations

import gzip
import io
import math
import random
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.core import volume as volume_module
from service.core.domain import Box, ImageInput, Window
from service.core.errors import InvalidArgument, InvalidImage, InvalidPrompt, PayloadTooLarge
from service.core.imageio import decode_image, normalise
from service.core.volume import InPlane, Volume, VolumeLimits, VolumeSource, estimate_volume_bytes, load_volume
from tests.conftest import SHARED_DATA

VOLUMES = SHARED_DATA / "volumes"
CT_SERIES = VOLUMES / "dicom" / "promed_ct_0051"
CT_NIFTI = VOLUMES / "promed_ct_0051" / "image.nii.gz"
COLIN = VOLUMES / "colin27_t1"
WINDOW = Window(center=40.0, width=400.0)
CANARY_NAME, CANARY_ID = "CANARYSURNAME^CANARYGIVEN", "CANARY-ID-4242"

# missing real volumes fail (tests/conftest.py shared_data), never skip
pytestmark = pytest.mark.usefixtures("shared_data")


# --------------------------------------------------------------------------- helpers
def read(path: Path) -> bytes:
    return path.read_bytes()


def dicom_source(files, **kwargs) -> VolumeSource:
    return VolumeSource(format="dicom_series", files=tuple(files), **kwargs)


def nifti_source(data: bytes, **kwargs) -> VolumeSource:
    return VolumeSource(format="nifti", data=data, **kwargs)


def raw_source(array: np.ndarray, spacing=(0.5, 0.7, 2.0), **kwargs) -> VolumeSource:
    array = np.ascontiguousarray(array)
    return VolumeSource(format="raw", data=array.astype(array.dtype.newbyteorder("<")).tobytes(),
                        dtype=array.dtype.name, shape=array.shape, spacing_mm=spacing, **kwargs)


def nifti_bytes(array: np.ndarray, affine: np.ndarray | None = None, compress: bool = True, **header) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    for key, value in header.items():
        image.header[key] = value
    data = image.to_bytes()
    return gzip.compress(data) if compress else data


def edit(data: bytes, remove: tuple[str, ...] = (), **changes) -> bytes:
    """A copy of a DICOM file with attributes changed (pydicom keywords) or removed."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    for keyword in remove:
        delattr(ds, keyword)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def assert_no_tag_values(message: str, files: list[bytes]) -> None:
    """No patient name/ID, UID or date of the files in a message."""
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID", "StudyDate"):
        value = str(ds.get(keyword, "") or "")
        if value:
            assert value not in message, keyword
    for part in ("CANARY", "1.2.826", "PROMED", "20000101"):
        assert part not in message


def error(exc_type, source: VolumeSource, limits: VolumeLimits = VolumeLimits()) -> str:
    with pytest.raises(exc_type) as info:
        load_volume(source, limits)
    return str(info.value)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ct_files() -> list[bytes]:
    """The CT series in file-name (= slice) order, with canary patient data in every file."""
    paths = sorted(CT_SERIES.glob("*.dcm"))
    assert len(paths) == 108
    return [edit(read(p), PatientName=CANARY_NAME, PatientID=CANARY_ID) for p in paths]


@pytest.fixture(scope="module")
def shuffle() -> list[int]:
    order = list(range(108))
    random.Random(51).shuffle(order)
    return order


@pytest.fixture(scope="module")
def dicom_ct(ct_files, shuffle) -> Volume:
    return load_volume(dicom_source([ct_files[i] for i in shuffle], window=WINDOW))


@pytest.fixture(scope="module")
def nifti_ct() -> Volume:
    return load_volume(nifti_source(read(CT_NIFTI), window=WINDOW))


@pytest.fixture(scope="module")
def ct_stored() -> np.ndarray:
    return np.asanyarray(nib.load(CT_NIFTI).dataobj)


@pytest.fixture(scope="module")
def head_mask() -> np.ndarray:
    return np.asanyarray(nib.load(VOLUMES / "promed_ct_0051" / "masks" / "head.nii.gz").dataobj)


# --------------------------------------------------------------------------- DICOM == NIfTI
def test_ct_series_and_nifti_give_bit_identical_model_slices(dicom_ct, nifti_ct):
    assert dicom_ct.depth == nifti_ct.depth == 108
    for k in range(108):
        a, b = dicom_ct.slice_pixels(k), nifti_ct.slice_pixels(k)
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == (256, 256)
        assert np.array_equal(a, b), k
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_ct_series_geometry_follows_the_documented_voxel_mapping(dicom_ct, nifti_ct, ct_stored, shuffle):
    # pixel (r, c) of file k+1 is NIfTI voxel (nx-1-c, ny-1-r, k); voxels[k] are the sorted files' pixels
    hu = dicom_ct.voxels.astype(np.int32) * dicom_ct.slope + dicom_ct.intercept
    assert np.array_equal(hu, ct_stored[::-1, ::-1, :].transpose(2, 1, 0))
    assert dicom_ct.voxels.dtype == np.uint16 and (dicom_ct.slope, dicom_ct.intercept) == (1.0, -1024.0)
    assert nifti_ct.voxels.dtype == np.int16 and (nifti_ct.slope, nifti_ct.intercept) == (1.0, 0.0)
    assert dicom_ct.input_shape == (256, 256, 108) and nifti_ct.input_shape == (256, 256, 108)
    # sorted slice k is the file named k+1 (uploaded at position shuffle.index(k))
    assert [shuffle[i] for i in dicom_ct.extra["file_order"]] == list(range(108))
    # both affines put the same voxel at the same place: DICOM (c, r, k) == NIfTI (nx-1-c, ny-1-r, k)
    c, r, k = np.meshgrid([0, 17, 255], [0, 100, 255], [0, 50, 107], indexing="ij")
    grid = np.stack([c.ravel(), r.ravel(), k.ravel(), np.ones(c.size)])
    mirrored = np.stack([255 - c.ravel(), 255 - r.ravel(), k.ravel(), np.ones(c.size)])
    assert np.allclose(dicom_ct.affine @ grid, nifti_ct.affine @ mirrored, atol=1e-3)
    assert dicom_ct.in_plane == InPlane(flip_cols=True) and nifti_ct.in_plane == InPlane()
    assert dicom_ct.spacing_mm == pytest.approx((0.9570312, 0.9570312, 1.5))
    assert nifti_ct.spacing_mm == pytest.approx((0.9570312, 0.9570312, 1.5))
    assert dicom_ct.modality == "CT" and dicom_ct.window_source == "request"
    assert dicom_ct.nbytes == 108 * 256 * 256 * 2 == dicom_ct.voxels.nbytes


def test_ct_masks_go_back_to_each_input_grid(dicom_ct, nifti_ct, head_mask):
    # model-orientation masks made from the NIfTI's slices are the same anatomy on the DICOM's
    masks = {k: nifti_ct.mask_to_model(np.flipud(head_mask[:, :, k].T) > 0) for k in range(0, 108, 3)}
    expected = np.zeros_like(head_mask)
    expected[:, :, ::3] = head_mask[:, :, ::3]
    assert np.array_equal(nifti_ct.mask_array(masks), expected)
    dicom_masks = dicom_ct.mask_array(masks)
    assert dicom_masks.dtype == np.uint8 and dicom_masks.shape == (256, 256, 108)
    assert np.array_equal(dicom_masks, expected[::-1, ::-1, :])  # (columns, rows, slices) via the mapping
    back = nib.Nifti1Image.from_bytes(gzip.decompress(dicom_ct.nifti_bytes(masks)))
    assert np.array_equal(np.asanyarray(back.dataobj), dicom_masks)
    assert np.allclose(back.affine, dicom_ct.affine, atol=1e-4)


def test_ct_series_boxes_follow_the_column_flip(dicom_ct):
    box = Box(10.0, 20.0, 30.5, 40.0)
    model = dicom_ct.box_to_model(box)
    assert model == Box(256 - 30.5, 20.0, 256 - 10.0, 40.0)
    assert dicom_ct.box_to_input(model) == box
    # a one-pixel mask at input (r, c) lands in the model box the input box maps to
    mask = np.zeros((256, 256), bool)
    mask[20, 10] = True
    rows, cols = np.nonzero(dicom_ct.mask_to_model(mask))
    target = dicom_ct.box_to_model(Box(10, 20, 11, 21))
    assert (cols[0], rows[0]) == (target.x0, target.y0)


def test_ct_series_matches_the_2d_decoder_of_each_file(dicom_ct, ct_files):
    decoded = decode_image(ImageInput(encoded=ct_files[40], window=WINDOW)).pixels
    assert np.array_equal(dicom_ct.slice_pixels(40), decoded[:, ::-1])


def test_ct_series_window_defaults_to_the_files(ct_files):
    vol = load_volume(dicom_source(ct_files[:20]))
    assert (vol.window, vol.window_source) == (Window(40.0, 400.0), "file")
    no_window = [edit(f, remove=("WindowCenter", "WindowWidth")) for f in ct_files[:4]]
    vol = load_volume(dicom_source(no_window))
    assert (vol.window, vol.window_source) == (Window(40.0, 400.0), "modality default")
    mr = [edit(f, remove=("WindowCenter", "WindowWidth"), Modality="MR") for f in ct_files[:4]]
    vol = load_volume(dicom_source(mr))
    assert vol.window_source == "slice percentiles" and vol.modality == "MR"
    hu = vol.voxels.astype(np.float64) - 1024
    lo, hi = np.percentile(hu, (0.5, 99.5))
    assert vol.window.center == pytest.approx((lo + hi) / 2) and vol.window.width == pytest.approx(hi - lo)


def test_estimates_equal_the_loaded_bytes(ct_files, dicom_ct, nifti_ct):
    assert estimate_volume_bytes(dicom_source(ct_files)) == dicom_ct.nbytes
    assert estimate_volume_bytes(nifti_source(read(CT_NIFTI))) == nifti_ct.nbytes == 256 * 256 * 108 * 2
    raw = raw_source(np.zeros((3, 4, 5), np.float32))
    assert estimate_volume_bytes(raw) == load_volume(raw).nbytes == 240


def test_series_peak_memory_is_the_voxels_plus_about_one_file(ct_files):
    files = tuple(ct_files)
    tracemalloc.start()
    try:
        vol = load_volume(dicom_source(files, window=WINDOW))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < vol.nbytes + 4 * len(files[0]) + (2 << 20), peak


def test_nii_gz_is_inflated_into_one_buffer(monkeypatch):
    data = read(COLIN / "image.nii.gz")
    monkeypatch.setattr(volume_module, "INFLATE_CHUNK", 1 << 20)
    tracemalloc.start()
    try:
        vol = load_volume(nifti_source(data, window=Window(100, 200)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.nbytes == 181 * 217 * 181
    assert peak < vol.nbytes + (4 << 20), peak


# --------------------------------------------------------------------------- NIfTI masks and orientation
def test_colin27_reference_masks_round_trip_exactly(tmp_path):
    image = load_volume(nifti_source(read(COLIN / "image.nii.gz")))
    assert image.window_source == "slice percentiles" and image.in_plane == InPlane()
    for name in ("brain", "hippocampus_left", "putamen_right"):
        path = COLIN / "masks" / f"{name}.nii.gz"
        stored = np.asanyarray(nib.load(path).dataobj)
        reference = load_volume(nifti_source(read(path)))  # its voxels are the volume-convention slices
        masks = {k: image.mask_to_model(reference.voxels[k] > 0) for k in range(image.depth)
                 if reference.voxels[k].any()}
        assert masks
        assert np.array_equal(image.mask_array(masks), stored), name
        data = image.nifti_bytes(masks)
        back = nib.Nifti1Image.from_bytes(gzip.decompress(data))
        assert back.get_data_dtype() == np.uint8
        assert np.array_equal(np.asanyarray(back.dataobj), stored), name
        assert np.allclose(back.affine, image.affine) and np.allclose(back.affine, nib.load(path).affine)
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(data)
    loaded = nib.load(out)
    assert np.array_equal(np.asanyarray(loaded.dataobj), stored) and np.allclose(loaded.affine, image.affine)


def test_nifti_slices_match_the_2d_decoder():
    data = read(COLIN / "image.nii.gz")
    vol = load_volume(nifti_source(data, window=Window(90, 180)))
    decoded = decode_image(ImageInput(encoded=data, slice_index=77, window=Window(90, 180))).pixels
    assert np.array_equal(vol.slice_pixels(77), decoded)


def _reoriented(vol: np.ndarray, affine: np.ndarray, axes: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """The same anatomy stored another way: voxel axes permuted, then flipped; the affine to match."""
    data = vol.transpose(axes)
    new = affine[:, list(axes) + [3]].copy()
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis)
            new[:3, 3] += new[:3, axis] * (data.shape[axis] - 1)
            new[:3, axis] *= -1
    return np.ascontiguousarray(data), new


@pytest.mark.parametrize("axes, flips", [
    ((0, 1, 2), (True, False, False)),    # LAS
    ((0, 1, 2), (True, True, False)),     # LPS
    ((1, 0, 2), (False, False, False)),   # axes swapped: A R S
    ((1, 0, 2), (True, True, False)),     # P L S
    ((0, 1, 2), (False, False, True)),    # RAI: slices stored inferior first
])
def test_reoriented_nifti_gives_the_same_model_slices(axes, flips):
    rng = np.random.default_rng(7)
    ras = rng.integers(-1000, 1000, size=(7, 9, 5), dtype=np.int16)
    affine = np.array([[0.8, 0, 0, -3], [0, 0.9, 0, 4], [0, 0, 2.5, 1], [0, 0, 0, 1]], float)
    reference = load_volume(nifti_source(nifti_bytes(ras, affine), window=Window(0, 2000)))
    assert reference.in_plane == InPlane()
    data, new_affine = _reoriented(ras, affine, axes, flips)
    other = load_volume(nifti_source(nifti_bytes(data, new_affine), window=Window(0, 2000)))
    assert other.slice_shape == reference.slice_shape == (9, 7)
    assert other.spacing_mm == pytest.approx(reference.spacing_mm)
    slices = range(5)[::-1] if flips[2] else range(5)
    for k_ref, k in zip(range(5), slices):
        assert np.array_equal(other.slice_pixels(k), reference.slice_pixels(k_ref))
    # one model-orientation mask goes back to each stored grid as the same anatomy
    masks = {k: rng.random((9, 7)) > 0.5 for k in range(5)}
    other_masks = {(4 - k if flips[2] else k): m for k, m in masks.items()}
    expected, _ = _reoriented(reference.mask_array(masks), affine, axes, flips)
    assert np.array_equal(other.mask_array(other_masks), expected)
    # boxes: there and back, and onto the pixel a one-pixel input mask becomes
    box = Box(1.0, 2.0, 4.5, 6.0)
    assert other.box_to_input(other.box_to_model(box)) == box
    h, w = other.input_slice_shape
    pixel = np.zeros((h, w), bool)
    pixel[2, 1] = True
    rows, cols = np.nonzero(other.mask_to_model(pixel))
    target = other.box_to_model(Box(1, 2, 2, 3))
    assert (cols[0], rows[0]) == (target.x0, target.y0) and (target.x1 - target.x0, target.y1 - target.y0) == (1, 1)
    assert np.array_equal(other.mask_to_input(other.mask_to_model(pixel)), pixel)


def test_coronal_and_sagittal_stacks_show_superior_at_the_top():
    ras = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)   # x=R, y=A, z=S
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    # coronal stack: stored (x, z, y), slices along A
    coronal = load_volume(nifti_source(nifti_bytes(ras.transpose(0, 2, 1).copy(), affine[:, [0, 2, 1, 3]]),
                                       window=Window(60, 120)))
    assert coronal.in_plane == InPlane()
    for j in range(5):
        expected = normalise(ras[:, j, :].T[::-1], Window(60, 120))   # columns R increasing, S at the top
        assert np.array_equal(coronal.slice_pixels(j), expected)
    # sagittal stack stored (z, y, x): columns along S in the input, so the model transposes
    sagittal = load_volume(nifti_source(nifti_bytes(ras.transpose(2, 1, 0).copy(), affine[:, [2, 1, 0, 3]]),
                                        window=Window(60, 120)))
    assert sagittal.in_plane.transpose
    for i in range(4):
        expected = normalise(ras[i, :, :].T[::-1], Window(60, 120))   # columns A increasing, S at the top
        assert np.array_equal(sagittal.slice_pixels(i), expected)
    assert sagittal.slice_shape == (6, 5) and sagittal.input_slice_shape == (5, 6)


# --------------------------------------------------------------------------- synthetic DICOM orientations
def _series_from_ras(ras: np.ndarray, sizes: tuple[float, float, float], row_lps, col_lps) -> list[bytes]:
    """An axial DICOM series (copies of a real CT file) of the RAS volume ``ras`` whose voxel
    (i, j, k) lies at RAS (i, j, k) * sizes, stored with ImageOrientationPatient
    (row_lps, col_lps): each file's pixel (r, c) is the voxel at that pixel's place."""
    template = pydicom.dcmread(io.BytesIO(read(sorted(CT_SERIES.glob("*.dcm"))[0])))
    sizes_a = np.array(sizes, float)
    ras_row = np.array(row_lps, float) * [-1, -1, 1]   # RAS step of one column
    ras_col = np.array(col_lps, float) * [-1, -1, 1]   # RAS step of one row
    axis_c, axis_r = int(np.argmax(abs(ras_row))), int(np.argmax(abs(ras_col)))
    cols_n, rows_n = ras.shape[axis_c], ras.shape[axis_r]
    col_sp, row_sp = sizes[axis_c], sizes[axis_r]
    r, c = np.meshgrid(np.arange(rows_n), np.arange(cols_n), indexing="ij")
    files = []
    for k in range(ras.shape[2]):
        corner = np.array([0.0, 0.0, k])
        corner[axis_c] = 0 if ras_row[axis_c] > 0 else cols_n - 1
        corner[axis_r] = 0 if ras_col[axis_r] > 0 else rows_n - 1
        offsets = (c[..., None] * col_sp * ras_row + r[..., None] * row_sp * ras_col) / sizes_a
        index = np.rint(corner + offsets).astype(int)
        ds = template.copy()
        ds.Rows, ds.Columns = rows_n, cols_n
        ds.PixelSpacing = [row_sp, col_sp]
        ds.ImageOrientationPatient = [float(v) for v in (*row_lps, *col_lps)]
        ds.ImagePositionPatient = [float(v) for v in corner * sizes_a * [-1, -1, 1]]
        ds.PixelData = ras[index[..., 0], index[..., 1], index[..., 2]].astype(np.uint16).tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds)
        files.append(buffer.getvalue())
    return files


@pytest.mark.parametrize("row_lps, col_lps", [
    ((1, 0, 0), (0, 1, 0)),     # the usual axial: columns to the left, rows to posterior
    ((-1, 0, 0), (0, -1, 0)),   # columns to the right, rows to anterior
    ((0, 1, 0), (1, 0, 0)),     # transposed: columns to posterior, rows to the left
])
def test_dicom_series_of_any_axial_orientation_gives_the_nifti_model_slices(row_lps, col_lps):
    rng = np.random.default_rng(3)
    ras = rng.integers(0, 3000, size=(6, 5, 4)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    reference = load_volume(nifti_source(nifti_bytes(ras - 1024, affine), window=WINDOW))
    files = _series_from_ras(ras, (0.8, 0.9, 2.0), row_lps, col_lps)
    series = load_volume(dicom_source(files[::-1], window=WINDOW))
    assert series.slice_shape == reference.slice_shape
    assert series.spacing_mm == pytest.approx(reference.spacing_mm)
    # slices are sorted along the normal row x column: here (0, 1, 0) x (1, 0, 0) points inferior
    upward = np.cross(row_lps, col_lps)[2] > 0
    same = {k: k if upward else 3 - k for k in range(4)}
    for k in range(4):
        assert np.array_equal(series.slice_pixels(k), reference.slice_pixels(same[k])), k
    # the series' affine maps its grid onto the same RAS places as the NIfTI's
    masks = {k: rng.random(reference.slice_shape) > 0.5 for k in range(4)}
    ras_mask = reference.mask_array({same[k]: m for k, m in masks.items()})
    grid = series.mask_array(masks)
    points = np.argwhere(grid)
    world = series.affine @ np.c_[points, np.ones(len(points))].T
    voxels = np.rint(np.linalg.inv(affine) @ world).astype(int)[:3]
    assert ras_mask[tuple(voxels)].all() and grid.sum() == ras_mask.sum()


# --------------------------------------------------------------------------- bad DICOM series
def test_two_series_are_refused(ct_files):
    files = list(ct_files[:10]) + [edit(ct_files[10], SeriesInstanceUID="1.2.826.0.1.3680043.8.498.999")]
    message = error(InvalidImage, dicom_source(files))
    assert "more than one series" in message and "file 11" in message
    assert_no_tag_values(message, files)


def test_a_missing_slice_is_refused(ct_files):
    files = ct_files[:54] + ct_files[55:]
    random.Random(1).shuffle(files)
    message = error(InvalidImage, dicom_source(files))
    assert message.startswith("a slice is missing or the spacing is uneven: gap 3 mm between sorted slices 54 and 55")
    assert "median gap 1.5 mm" in message
    assert_no_tag_values(message, files)


def test_a_duplicated_slice_is_refused(ct_files):
    files = list(ct_files) + [ct_files[30]]
    message = error(InvalidImage, dicom_source(files))
    assert "same position (a duplicated slice)" in message and "31" in message and "109" in message
    assert_no_tag_values(message, files)


def test_non_parallel_slices_are_refused(ct_files):
    angle = math.radians(5)
    tilted = edit(ct_files[40], ImageOrientationPatient=[1, 0, 0, 0, math.cos(angle), math.sin(angle)])
    files = ct_files[:40] + [tilted] + ct_files[41:]
    message = error(InvalidImage, dicom_source(files))
    assert "not parallel" in message and "file 41" in message and "5 degrees" in message
    assert_no_tag_values(message, files)
    # within the tolerance (1 degree): accepted
    angle = math.radians(0.5)
    slight = edit(ct_files[40], ImageOrientationPatient=[1, 0, 0, 0, math.cos(angle), math.sin(angle)])
    assert load_volume(dicom_source(ct_files[:40] + [slight] + ct_files[41:])).depth == 108


def test_in_plane_rotation_is_refused(ct_files):
    angle = math.radians(10)
    turned = edit(ct_files[5], ImageOrientationPatient=[math.cos(angle), math.sin(angle), 0,
                                                        -math.sin(angle), math.cos(angle), 0])
    message = error(InvalidImage, dicom_source(ct_files[:5] + [turned] + ct_files[6:20]))
    assert "not aligned" in message and "file 6" in message


def test_uneven_spacing_is_refused(ct_files):
    moved = edit(ct_files[60], ImagePositionPatient=[0.0, 0.0, 60 * 1.5 + 0.5])
    files = ct_files[:60] + [moved] + ct_files[61:]
    message = error(InvalidImage, dicom_source(files))
    assert "spacing is uneven" in message and "median gap 1.5 mm" in message
    # a gap off by less than spacing_tolerance (10 %) is accepted
    nudged = edit(ct_files[60], ImagePositionPatient=[0.0, 0.0, 60 * 1.5 + 0.1])
    assert load_volume(dicom_source(ct_files[:60] + [nudged] + ct_files[61:])).depth == 108
    # positions off the line between the first and last slice
    shifted = edit(ct_files[60], ImagePositionPatient=[5.0, 0.0, 60 * 1.5])
    message = error(InvalidImage, dicom_source(ct_files[:60] + [shifted] + ct_files[61:]))
    assert "not on one line" in message and "file 61" in message


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_refused(ct_files, keyword):
    files = ct_files[:3] + [edit(ct_files[3], remove=(keyword,))] + ct_files[4:8]
    message = error(InvalidImage, dicom_source(files))
    assert f"DICOM file 4 has no {keyword}" in message


def test_zero_pixel_spacing_is_refused(ct_files):
    files = [edit(ct_files[0], PixelSpacing=[0, 0.9])] + ct_files[1:4]
    assert "zero spacing" in error(InvalidImage, dicom_source(files))


def test_files_of_different_sizes_are_refused(ct_files):
    ds = pydicom.dcmread(io.BytesIO(ct_files[2]))
    half = ds.pixel_array[:128].copy()
    small = edit(ct_files[2], Rows=128, PixelData=half.tobytes())
    message = error(InvalidImage, dicom_source(ct_files[:2] + [small] + ct_files[3:6]))
    assert "differ in size" in message and "256x256" in message and "256x128" in message


def test_multi_frame_and_colour_files_are_refused(ct_files):
    ds = pydicom.dcmread(io.BytesIO(ct_files[0]))
    multi = edit(ct_files[0], NumberOfFrames=2, PixelData=ds.PixelData * 2)
    message = error(InvalidImage, dicom_source([multi] + ct_files[1:3]))
    assert "multi-frame" in message and "send single-frame files, or the frames as a raw array" in message
    colour = edit(ct_files[1], SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0,
                  BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=bytes(256 * 256 * 3))
    message = error(InvalidImage, dicom_source([ct_files[0], colour, ct_files[2]]))
    assert "file 2 is a colour image" in message


def test_different_rescales_are_refused(ct_files):
    files = ct_files[:7] + [edit(ct_files[7], RescaleIntercept=-1000)] + ct_files[8:12]
    message = error(InvalidImage, dicom_source(files))
    assert "RescaleSlope/RescaleIntercept" in message and "8" in message


def test_truncated_and_foreign_files_are_refused(ct_files):
    cut = ct_files[9][: len(ct_files[9]) // 2]
    message = error(InvalidImage, dicom_source(ct_files[:9] + [cut] + ct_files[10:20]))
    assert message.startswith("DICOM file 10:") and "truncated" in message
    assert_no_tag_values(message, ct_files)
    message = error(InvalidImage, dicom_source(ct_files[:2] + [b"not a dicom file" * 20]))
    assert "DICOM file 3 is not a DICOM Part 10 file" in message
    assert "file 2 is empty" in error(InvalidImage, dicom_source([ct_files[0], b""]))
    assert "no files" in error(InvalidImage, dicom_source([]))


def test_series_limits(ct_files):
    files = tuple(ct_files)
    for limits, words in [
        (VolumeLimits(max_files=100), "108 files; the limit is 100 files"),
        (VolumeLimits(max_slices=100), "108 slices; the limit is 100 slices"),
        (VolumeLimits(max_side=200), "the limit is 200 pixels per side"),
        (VolumeLimits(max_volume_bytes=14_000_000), "the limit is 14000000 bytes"),
        (VolumeLimits(max_volume_bytes=100 * 1024 * 1024, max_slices=4096), None),
    ]:
        if words is None:
            assert estimate_volume_bytes(dicom_source(files), limits) == 14_155_776
            continue
        assert words in error(PayloadTooLarge, dicom_source(files), limits)
        with pytest.raises(PayloadTooLarge, match=words):
            estimate_volume_bytes(dicom_source(files), limits)


def deflated(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_deflated_series_over_the_voxel_limit_is_refused_before_decoding(ct_files, monkeypatch):
    files = [deflated(f) for f in ct_files[40:60]]
    assert load_volume(dicom_source(files, window=WINDOW)).voxels.tobytes() == \
        load_volume(dicom_source(ct_files[40:60])).voxels.tobytes()
    calls = []
    monkeypatch.setattr(volume_module, "_dicom_frame", lambda *args: calls.append(args))
    limits = VolumeLimits(max_volume_bytes=sum(map(len, files)) + 1)   # the upload fits, its voxels do not
    assert sum(map(len, files)) < 20 * 256 * 256 * 2
    message = error(PayloadTooLarge, dicom_source(files), limits)
    assert "bytes of voxels" in message and not calls
    with pytest.raises(PayloadTooLarge, match="bytes of voxels"):
        estimate_volume_bytes(dicom_source(files), limits)


# --------------------------------------------------------------------------- NIfTI errors and details
def test_nifti_dimensions():
    four = nifti_bytes(np.zeros((4, 5, 6, 3), np.int16))
    assert "4-D NIfTI with 3 volumes: send one 3-D volume" in error(InvalidImage, nifti_source(four))
    two = nifti_bytes(np.zeros((4, 5), np.int16))
    assert "not a volume" in error(InvalidImage, nifti_source(two))
    one_volume = load_volume(nifti_source(nifti_bytes(np.ones((4, 5, 6, 1), np.int16))))
    assert one_volume.input_shape == (4, 5, 6) and one_volume.depth == 6
    assert one_volume.window == Window(1.0, 1.0) and float(one_volume.slice_pixels(0)[0, 0]) == 0.0  # a constant slice: zeros, as the 2-D percentile rule


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_zero_or_bad_pixdim_is_refused(value):
    data = bytearray(nifti_bytes(np.zeros((4, 5, 6), np.int16), compress=False))
    struct.pack_into("<f", data, 76 + 4 * 3, value)   # pixdim[3]: the slice spacing
    message = error(InvalidImage, nifti_source(gzip.compress(bytes(data))))
    assert "zero spacing" in message and "pixdim" in message


def test_nifti_nan_voxels_are_refused():
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    assert "NaN or infinite" in error(InvalidImage, nifti_source(nifti_bytes(array)))
    array[1, 2, 3] = np.inf
    assert "NaN or infinite" in error(InvalidImage, nifti_source(nifti_bytes(array, compress=False)))


def test_truncated_nifti_is_refused():
    data = read(COLIN / "image.nii.gz")
    assert "truncated" in error(InvalidImage, nifti_source(data[: len(data) // 2]))
    plain = nifti_bytes(np.zeros((8, 8, 8), np.int16), compress=False)
    assert "truncated" in error(InvalidImage, nifti_source(plain[:-10]))
    assert "truncated or corrupt" in error(InvalidImage, nifti_source(b"\x1f\x8b" + b"\x00" * 400))


def test_nifti_limits_are_checked_from_the_header():
    data = read(COLIN / "image.nii.gz")
    limits = VolumeLimits(max_volume_bytes=len(data) + 1)   # the upload fits, the inflated voxels do not
    assert "bytes of voxels" in error(PayloadTooLarge, nifti_source(data), limits)
    assert "180 slices" in error(PayloadTooLarge, nifti_source(data), VolumeLimits(max_slices=180))
    with pytest.raises(PayloadTooLarge):
        estimate_volume_bytes(nifti_source(data), limits)
    # a gzip bomb is not expanded: its header declares the size
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 400))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    bomb = gzip.compress(header.binaryblock + bytes(4) + bytes(1 << 20))   # declares 100 MiB, holds 1 MiB
    limits = VolumeLimits(max_volume_bytes=50 * 1024 * 1024)
    assert "bytes of voxels" in error(PayloadTooLarge, nifti_source(bomb), limits)


def test_nifti_scaling_and_uncompressed_view():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    data = nifti_bytes(array, np.diag([2.0, 3.0, 4.0, 1.0]), compress=False, scl_slope=2.0, scl_inter=10.0)
    vol = load_volume(nifti_source(data, window=Window(100, 200)))
    assert (vol.slope, vol.intercept) == (2.0, 10.0)
    assert np.shares_memory(vol.voxels, np.frombuffer(data, np.uint8))   # a view of the upload
    assert not vol.voxels.flags.writeable
    expected = normalise(np.flipud(array[:, :, 2].T) * 2.0 + 10.0, Window(100, 200))
    assert np.array_equal(vol.slice_pixels(2), expected)
    assert vol.spacing_mm == (3.0, 2.0, 4.0) and vol.window_source == "request"
    flipped = load_volume(nifti_source(nifti_bytes(array, scl_slope=-2.0, scl_inter=10.0)))
    lo, hi = np.percentile(array * -2.0 + 10.0, (0.5, 99.5))
    assert flipped.window_source == "slice percentiles"
    assert (flipped.window.center, flipped.window.width) == pytest.approx(((lo + hi) / 2, hi - lo))
    unscaled = load_volume(nifti_source(nifti_bytes(array, scl_slope=0.0, scl_inter=5.0)))
    assert (unscaled.slope, unscaled.intercept) == (1.0, 0.0)
    assert "scl_inter" in error(InvalidImage, nifti_source(nifti_bytes(array, scl_slope=1.0, scl_inter=np.inf)))


# --------------------------------------------------------------------------- raw
def test_raw_volume_is_viewed_in_place():
    rng = np.random.default_rng(5)
    array = rng.normal(size=(4, 6, 9)).astype(np.float32)
    source = raw_source(array, spacing=(0.5, 0.7, 2.0), window=Window(0, 2))
    vol = load_volume(source)
    assert np.shares_memory(vol.voxels, np.frombuffer(source.data, np.uint8))
    assert vol.in_plane == InPlane() and vol.input_shape == (4, 6, 9) and vol.spacing_mm == (0.7, 0.5, 2.0)
    assert np.array_equal(vol.affine, [[0, 0, 0.5, 0], [0, 0.7, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    assert vol.voxel_volume_ml == pytest.approx(0.7 * 0.5 * 2.0 / 1000)
    for k in range(4):
        assert np.array_equal(vol.slice_pixels(k), normalise(array[k], Window(0, 2)))
    masks = {1: rng.random((6, 9)) > 0.5}
    out = vol.mask_array(masks)
    assert out.shape == (4, 6, 9) and np.array_equal(out[1], masks[1]) and not out[[0, 2, 3]].any()
    back = nib.Nifti1Image.from_bytes(gzip.decompress(vol.nifti_bytes(masks)))
    assert np.array_equal(np.asanyarray(back.dataobj), out) and np.allclose(back.affine, vol.affine)
    assert vol.box_to_model(Box(1, 2, 3, 4)) == Box(1, 2, 3, 4)


def test_raw_errors():
    array = np.zeros((3, 4, 5), np.float32)
    good = raw_source(array)
    short = VolumeSource(format="raw", data=good.data[:-4], dtype="float32", shape=(3, 4, 5), spacing_mm=(1, 1, 1))
    assert "needs 240" in error(InvalidImage, short)
    array[2, 3, 4] = np.nan
    assert "NaN or infinite" in error(InvalidImage, raw_source(array))
    assert "spacing" in error(InvalidImage, raw_source(np.zeros((2, 2, 2), np.uint8), spacing=(1, 0, 1)))
    assert "spacing" in error(InvalidImage, raw_source(np.zeros((2, 2, 2), np.uint8), spacing=()))
    assert "(Z, H, W)" in error(InvalidImage, raw_source(np.zeros((2, 2), np.uint8)))
    assert "dtype" in error(InvalidImage, raw_source(np.zeros((2, 2, 2), np.complex64)))
    limits = VolumeLimits(max_volume_bytes=200)
    assert "the limit is 200 bytes" in error(PayloadTooLarge, good, limits)
    assert "the limit is 2 slices" in error(PayloadTooLarge, good, VolumeLimits(max_slices=2))
    with pytest.raises(PayloadTooLarge):
        estimate_volume_bytes(good, VolumeLimits(max_side=4))


def test_percentile_window_uses_a_bounded_deterministic_subsample(monkeypatch):
    rng = np.random.default_rng(11)
    array = rng.integers(0, 1000, size=(20, 64, 64)).astype(np.int16)
    monkeypatch.setattr(volume_module, "PERCENTILE_SAMPLES", 5000)
    vol = load_volume(raw_source(array))
    assert vol.window_source == "slice percentiles"
    lo, hi = np.percentile(array.astype(np.float64), (0.5, 99.5))
    assert vol.window.center == pytest.approx((lo + hi) / 2, rel=0.05)
    assert vol.window.width == pytest.approx(hi - lo, rel=0.05)
    assert load_volume(raw_source(array)).window == vol.window


# --------------------------------------------------------------------------- misc
def test_bad_requests():
    with pytest.raises(InvalidImage, match="format"):
        load_volume(VolumeSource(format="zip", data=b"x"))
    with pytest.raises(InvalidImage, match="window"):
        load_volume(raw_source(np.zeros((2, 2, 2), np.uint8), window=Window(0, 0)))
    with pytest.raises(InvalidImage, match="empty"):
        load_volume(nifti_source(b""))
    vol = load_volume(raw_source(np.zeros((2, 3, 4), np.uint8)))
    with pytest.raises(InvalidArgument, match="out of range"):
        vol.slice_pixels(2)
    with pytest.raises(InvalidArgument, match="out of range"):
        vol.mask_array({-1: np.zeros((3, 4), bool)})
    with pytest.raises(InvalidPrompt, match=r"slice has shape \(3, 4\)"):
        vol.mask_to_input(np.zeros((4, 3), bool))
