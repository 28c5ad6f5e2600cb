"""Draw masks, boxes and points over the input image, for a human to look at.

Display only: the server's decoding (windowing, VOI LUTs, orientation) is not reproduced
exactly. 8-bit PNG/JPEG/TIFF are shown as they are; DICOM, NIfTI, ``.npy`` and 16-bit or
float images are rendered with the given window or a 0.5-99.5 percentile stretch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medseg_client._optional import require
from medseg_client.images import image_suffix, select_plane

__all__ = ["MASK_COLOURS", "draw_overlay", "load_display_image", "mask_outline", "to_uint8"]

MASK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 215, 0),  # gold
    (0, 191, 255),  # deep sky blue
    (255, 0, 255),  # magenta
    (255, 140, 0),  # dark orange
    (0, 255, 255),  # cyan
    (186, 85, 211),  # orchid
    (255, 105, 180),  # pink
    (255, 255, 255),  # white
)
FOREGROUND_COLOUR = (0, 255, 0)
BACKGROUND_COLOUR = (255, 0, 0)


def to_uint8(pixels: np.ndarray, window: Sequence[float] | None = None) -> np.ndarray:
    """Map a grey ``(H, W)`` array in native units to uint8 for display.

    ``window``: ``(center, width)``; without it, the 0.5th-99.5th percentiles are stretched
    to 0-255 (a constant image becomes all zeros). NaNs become 0.
    """
    values = np.asarray(pixels, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    elif finite.size:
        low, high = np.percentile(finite, [0.5, 99.5])
    else:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.clip((np.nan_to_num(values, nan=low) - low) * scale, 0, 255)
    return out.round().astype(np.uint8)


def load_display_image(
    path: str | Path,
    *,
    window: Sequence[float] | None = None,
    slice_index: int | None = None,
) -> Image.Image:
    """Load ``path`` as an RGB :class:`PIL.Image.Image` of the input image's size.

    For 3-D inputs ``slice_index`` picks the slice (NIfTI: last axis; DICOM: frame;
    ``.npy``: as :func:`medseg_client.images.select_plane`), default the middle one.
    NIfTI planes are oriented as the gateway decodes them (see ``_nifti_plane``).
    Raises :class:`ValueError` for unsupported files, :class:`ImportError` for DICOM/NIfTI
    without ``pydicom``/``nibabel`` (``pip install 'medseg-client[files]'``).
    """
    suffix = image_suffix(path)
    if suffix == ".npy":
        plane = select_plane(np.load(Path(path), allow_pickle=False), slice_index)
        return _plane_to_rgb(plane, window)
    if suffix == ".dcm":
        return _plane_to_rgb(_dicom_plane(Path(path), slice_index), window)
    if suffix in (".nii", ".nii.gz"):
        return _plane_to_rgb(_nifti_plane(Path(path), slice_index), window)
    with Image.open(Path(path)) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return _plane_to_rgb(np.asarray(image), window)
        return image.convert("RGB")


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool ``(H, W)``: foreground pixels with a 4-neighbour outside the mask (or the border)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    )
    return mask & ~interior


def draw_overlay(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
) -> Image.Image:
    """A copy of ``image`` (RGB) with each mask's outline, the boxes and the points drawn.

    ``masks``: bool ``(H, W)`` at the image's size; mask ``i`` and box ``i`` share colour
    ``MASK_COLOURS[i % len(MASK_COLOURS)]``. ``boxes``: ``(x0, y0, x1, y1)``; ``points``:
    ``(x, y, label)``, drawn green (label 1, foreground) or red (0, background); all in
    input-image pixels. Raises :class:`ValueError` when a mask's size differs from the image's.
    """
    canvas = np.array(image.convert("RGB"))
    height, width = canvas.shape[:2]
    line = max(1, round(max(height, width) / 256))
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask {index} is {mask.shape}, the image is {(height, width)} (H, W)")
        outline = mask_outline(mask)
        for _ in range(line - 1):  # thicken the outline inwards and outwards
            outline = _dilate(outline)
        canvas[outline] = MASK_COLOURS[index % len(MASK_COLOURS)]
    out = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(out)
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        colour = MASK_COLOURS[index % len(MASK_COLOURS)]
        # Pixel edges (x0, x1) -> the last covered pixel is x1 - 1.
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=line)
    radius = max(2, line * 2)
    for x, y, label in points:
        colour = FOREGROUND_COLOUR if label else BACKGROUND_COLOUR
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
    return out


# --------------------------------------------------------------------------- helpers
def _plane_to_rgb(plane: np.ndarray, window: Sequence[float] | None) -> Image.Image:
    if plane.ndim == 3 and plane.shape[2] == 3:
        if plane.dtype == np.uint8 and window is None:
            return Image.fromarray(np.ascontiguousarray(plane), mode="RGB")
        channels = [to_uint8(plane[:, :, c], window) for c in range(3)]
        return Image.fromarray(np.stack(channels, axis=2), mode="RGB")
    if plane.ndim != 2:
        raise ValueError(f"cannot display an array of shape {plane.shape}")
    return Image.fromarray(to_uint8(plane, window), mode="L").convert("RGB")


def _dicom_plane(path: Path, slice_index: int | None) -> np.ndarray:
    pydicom = require("pydicom", "files", "showing a DICOM image")

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.astype(np.float64)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if slice_index is None else int(slice_index)
        if not 0 <= index < frames:
            raise ValueError(f"slice_index {index} is outside 0..{frames - 1}")
        pixels = pixels[index]
    slope = float(getattr(dataset, "RescaleSlope", 1) or 1)
    intercept = float(getattr(dataset, "RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _nifti_plane(path: Path, slice_index: int | None) -> np.ndarray:
    """The plane the gateway decodes (:mod:`service.core.imageio`): slice ``k`` of the last voxel
    axis, then ``flipud(vol[:, :, k].T)`` (columns = first voxel axis, highest j on top)."""
    nibabel = require("nibabel", "files", "showing a NIfTI image")

    data = np.asarray(nibabel.load(str(path)).dataobj)  # scl_slope/scl_inter applied
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"cannot display a NIfTI image of shape {data.shape}")
    depth = data.shape[2] if data.ndim == 3 else 1
    index = depth // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < depth:
        raise ValueError(f"slice_index {index} is outside 0..{depth - 1}")
    plane = data[:, :, index] if data.ndim == 3 else data
    return plane.T[::-1]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return (
        mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    )
