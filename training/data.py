"""Loading 2-D cases: folders of ``.npz`` (the format of ``../shared/data``), NIfTI pairs, PNG pairs.

Every loader returns :class:`Case` objects holding *native* intensities and a bool reference
mask (all-False where a folder has no masks); normalisation happens later, in one place
(:func:`training.samples.prepare`), exactly as the gateway does it.

Layouts:

* npz folder: ``*.npz`` with ``image``, ``mask`` and a ``meta`` JSON string (``../shared/data``).
* NIfTI pairs: ``images/NAME.nii[.gz]`` + ``masks/NAME.nii[.gz]`` (mask optional); a 3-D
  volume gives one case per slice along the last voxel axis (``NAME_zK``), oriented as the
  gateway orients NIfTI (``flipud(vol[:, :, k].T)``, see :mod:`service.core.imageio`); only
  slices whose mask is non-empty are kept unless ``keep_empty``.
* PNG pairs: ``images/NAME.png`` + ``masks/NAME.png`` (mask > 0 is foreground; optional).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.dev_cases import SHARED_DATA, Case, load_cases  # noqa: F401 - Case is part of this module's API


# One Case type and one .npz loader for the project: the exporter's parity check, the
# evaluation scripts and training all read ../shared/data the same way.
load_npz_folder = load_cases


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _nifti_planes(path: Path) -> list[np.ndarray]:
    """2-D planes of a NIfTI file in the gateway's orientation (scaling applied)."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image or 3-D volume, got shape {data.shape}")
    return [np.ascontiguousarray(data[:, :, k].T[::-1]) for k in range(data.shape[2])]


def load_nifti_pairs(folder: Path, structure: str = "unknown", keep_empty: bool = False) -> list[Case]:
    """Cases from ``folder/images/*.nii[.gz]`` and matching ``folder/masks/*`` (see module doc)."""
    folder = Path(folder)
    images = sorted(p for p in (folder / "images").glob("*.nii*"))
    if not images:
        raise FileNotFoundError(f"no NIfTI images in {folder / 'images'}")
    masks = {_stem(p): p for p in (folder / "masks").glob("*.nii*")} if (folder / "masks").is_dir() else {}
    cases = []
    for path in images:
        name = _stem(path)
        planes = _nifti_planes(path)
        mask_planes = _nifti_planes(masks[name]) if name in masks else [np.zeros(p.shape, bool) for p in planes]
        if len(mask_planes) != len(planes):
            raise ValueError(f"{name}: image has {len(planes)} slices, mask {len(mask_planes)}")
        for k, (img, msk) in enumerate(zip(planes, mask_planes)):
            msk = msk > 0
            if not keep_empty and name in masks and not msk.any():
                continue
            case_id = name if len(planes) == 1 else f"{name}_z{k}"
            cases.append(Case(case_id, img, msk, {"case_id": case_id, "structure": structure,
                                                   "source": str(path), "slice_index": k}))
    return cases


def load_png_pairs(folder: Path, structure: str = "unknown") -> list[Case]:
    """Cases from ``folder/images/*.png`` and matching ``folder/masks/*.png`` (mask > 0)."""
    from PIL import Image

    folder = Path(folder)
    images = sorted((folder / "images").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no PNG images in {folder / 'images'}")
    cases = []
    for path in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB") if im.mode in ("P", "PA", "RGBA", "LA", "CMYK") else im)
        if image.ndim == 3 and np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            image = image[..., 0]
        mask_path = folder / "masks" / path.name
        if mask_path.is_file():
            with Image.open(mask_path) as im:
                mask = np.asarray(im.convert("L")) > 0
        else:
            mask = np.zeros(image.shape[:2], bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{path.name}: mask shape {mask.shape} differs from image {image.shape[:2]}")
        cases.append(Case(path.stem, np.ascontiguousarray(image), mask,
                          {"case_id": path.stem, "structure": structure, "source": str(path)}))
    return cases


def load_cases(source: Path, structure: str = "unknown") -> list[Case]:
    """Any supported layout: ``*.npz`` directly in ``source``, else ``images/`` NIfTI or PNG."""
    source = Path(source)
    if any(source.glob("*.npz")):
        return load_npz_folder(source)
    if any((source / "images").glob("*.nii*")):
        return load_nifti_pairs(source, structure)
    if any((source / "images").glob("*.png")):
        return load_png_pairs(source, structure)
    raise FileNotFoundError(f"{source}: no *.npz, images/*.nii[.gz] or images/*.png")


def select(cases: list[Case], structure: str | None = None, min_dev_gap: int | None = None,
           limit: int | None = None) -> list[Case]:
    """Cases of one ``structure`` whose ``dev_slice_gap`` is ``>= min_dev_gap``.

    A case without ``dev_slice_gap`` (dev cases, other sources) or with ``None`` passes
    the gap filter only where it is not a slice of a dev volume: ``None`` in
    ``../shared/data/train`` marks microscopy tiles cut out of dev images, so they fail it.
    """
    out = []
    for case in cases:
        if structure is not None and case.structure != structure:
            continue
        if min_dev_gap is not None and "dev_slice_gap" in case.meta:
            gap = case.meta["dev_slice_gap"]
            if gap is None or int(gap) < min_dev_gap:
                continue
        out.append(case)
    return out[:limit]
