"""Case loaders: npz folders, NIfTI pairs, PNG pairs; the dev-gap filter."""

from __future__ import annotations

import json

import numpy as np

from training import data

from .helpers import two_blobs


def test_npz_folder_reads_image_mask_and_meta(tmp_path):
    mask = two_blobs()
    meta = {"case_id": "c1", "structure": "blob", "dev_slice_gap": 4}
    np.savez_compressed(tmp_path / "c1.npz", image=np.arange(mask.size, dtype=np.int16).reshape(mask.shape),
                        mask=mask.astype(np.uint8), meta=np.array(json.dumps(meta)))
    (case,) = data.load_npz_folder(tmp_path)
    assert case.case_id == "c1" and case.structure == "blob" and case.image.dtype == np.int16
    assert np.array_equal(case.mask, mask)


def test_nifti_pairs_give_one_case_per_non_empty_slice_in_gateway_orientation(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(0).integers(0, 1000, (6, 5, 3)).astype(np.int16)
    seg = np.zeros((6, 5, 3), np.uint8)
    seg[1:3, 2:4, 1] = 1
    seg[4, 0, 2] = 1
    for sub, arr in (("images", vol), ("masks", seg)):
        (tmp_path / sub).mkdir()
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / sub / "vol.nii.gz"))
    cases = data.load_nifti_pairs(tmp_path, "blob")
    assert [c.case_id for c in cases] == ["vol_z1", "vol_z2"]
    assert np.array_equal(cases[0].image, vol[:, :, 1].T[::-1])  # rows: second voxel axis, flipped
    assert np.array_equal(cases[0].mask, seg[:, :, 1].T[::-1] > 0)
    assert data.load_cases(tmp_path)[1].mask.sum() == 1


def test_png_pairs_read_grey_images_and_binary_masks(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.random.default_rng(1).integers(0, 255, (30, 40)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "images" / "p1.png")
    Image.fromarray((two_blobs(30, 40) * 255).astype(np.uint8)).save(tmp_path / "masks" / "p1.png")
    (case,) = data.load_cases(tmp_path, "blob")
    assert case.case_id == "p1" and np.array_equal(case.image, image)
    assert np.array_equal(case.mask, two_blobs(30, 40))


def test_select_drops_train_slices_near_dev_slices():
    cases = [data.Case(f"c{i}", np.zeros((2, 2)), np.zeros((2, 2), bool), {"structure": s, "dev_slice_gap": g})
             for i, (s, g) in enumerate([("a", 1), ("a", 3), ("b", 9), ("a", None)])]
    assert [c.case_id for c in data.select(cases, "a", 3)] == ["c1"]
    assert [c.case_id for c in data.select(cases, None, None)] == ["c0", "c1", "c2", "c3"]
