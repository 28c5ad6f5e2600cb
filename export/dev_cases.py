"""Evidence for the export checks: the dev cases of ``../shared/data`` (one ``.npz`` each:
image, mask, meta JSON), or, on a bare clone without them, images that ship with the
installed packages.

``MEDSEG_SHARED_DATA`` overrides where the shared data folder is (``/nonexistent`` hides it,
as on a fresh clone). :func:`check_evidence` picks what the parity check and the encoder
variant guards run on and says which:

* ``dev``: the ``.npz`` dev cases, each prompted with the tight box of its reference mask;
* ``shipped``: pydicom's bundled test images (the package folder ``pydicom/data/test_files``,
  globbed: ``pydicom.data.get_testdata_files()`` tries to download and retries forever
  offline), decoded by the gateway's own decoder (:mod:`service.core.imageio`), distinct
  pixel content only, each prompted with centred boxes of :data:`BOX_FRACTIONS` of its sides.
  They have no reference masks: the checks compare two models' masks with each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.core.domain import Box

SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
BOX_FRACTIONS = (0.3, 0.5, 0.8)  # centred boxes on shipped images: this fraction of each side
MIN_SHIPPED_SIDE = 64  # smaller shipped images are skipped


@dataclass(frozen=True)
class Case:
    """One 2-D image. ``image``: native intensities ``(H, W)`` (grey) or ``(H, W, 3)``;
    ``mask``: bool ``(H, W)`` reference (all False when unknown); ``meta``: free metadata."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def structure(self) -> str:
        return str(self.meta.get("structure", "unknown"))

    @property
    def spacing_mm(self) -> tuple[float, float]:
        spacing = self.meta.get("pixel_spacing_mm") or (1.0, 1.0)
        return float(spacing[0]), float(spacing[1])


def load_cases(folder: Path, limit: int | None = None) -> list[Case]:
    """Cases of a folder of ``.npz`` files (``image``, optional ``mask`` and ``meta`` JSON), sorted
    by file name, read with ``allow_pickle=False``; a missing mask is all False."""
    paths = sorted(Path(folder).glob("*.npz"))
    if not paths:
        raise FileNotFoundError(f"no .npz cases in {folder}")
    cases = []
    for path in paths[:limit]:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            mask = z["mask"].astype(bool) if "mask" in z.files else np.zeros(z["image"].shape[:2], bool)
            cases.append(Case(str(meta.get("case_id", path.stem)), z["image"], mask, meta))
    return cases


def reference_box(mask: np.ndarray) -> Box:
    """Tight API box (corner convention) around a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------------- evidence
@dataclass(frozen=True)
class Prompted:
    """One image (decoded pixels, float32 [0, 1]) with one box prompt; ``mask``: its reference
    mask (dev cases) or ``None`` (shipped images)."""

    case_id: str
    pixels: np.ndarray
    box: Box
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Evidence:
    """What a check runs on: ``kind`` is ``"dev"`` or ``"shipped"``; ``images`` distinct images."""

    kind: str
    source: str
    items: tuple[Prompted, ...]
    images: int
    dev_dir: str = ""  # where dev cases were looked for

    def describe(self) -> str:
        if self.kind == "dev":
            return f"{self.images} dev cases of {self.source}, reference-box prompts"
        return (f"{self.images} images shipped with pydicom ({self.source}) x {len(BOX_FRACTIONS)} centred boxes "
                f"({', '.join(f'{f:.0%}' for f in BOX_FRACTIONS)} of each side) = {len(self.items)} prompts; "
                f"no dev cases (.npz) in {self.dev_dir}")


def has_cases(folder: Path | None) -> bool:
    return folder is not None and Path(folder).is_dir() and any(Path(folder).glob("*.npz"))


def shipped_images_dir() -> Path:
    """pydicom's bundled test files (the package folder; never its download helpers)."""
    import pydicom

    return Path(pydicom.__file__).resolve().parent / "data" / "test_files"


def shipped_images(limit: int | None = None, min_side: int = MIN_SHIPPED_SIDE) -> list[tuple[str, np.ndarray]]:
    """``(file name, decoded pixels)`` of the shipped DICOM test images the gateway decodes, sorted
    by name, at least ``min_side`` on each side, each pixel content once; at most ``limit``."""
    from service.core.domain import ImageInput
    from service.core.imageio import decode_image

    folder = shipped_images_dir()
    out: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.dcm")):
        if limit is not None and len(out) >= limit:
            break
        try:
            pixels = decode_image(ImageInput(encoded=path.read_bytes())).pixels
        except Exception:  # noqa: BLE001 - a shipped file the gateway refuses is no evidence, nothing more
            continue
        if min(pixels.shape[:2]) < min_side:
            continue
        digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((path.name, pixels))
    if not out:
        raise FileNotFoundError(f"no decodable images of at least {min_side} px in {folder}")
    return out


def centred_boxes(height: int, width: int, fractions: tuple[float, ...] = BOX_FRACTIONS) -> list[Box]:
    """Boxes centred on the image, ``f`` of each side for each ``f`` in ``fractions``."""
    boxes = []
    for f in fractions:
        h, w = max(1.0, round(height * f)), max(1.0, round(width * f))
        y0, x0 = (height - h) // 2, (width - w) // 2
        boxes.append(Box(float(x0), float(y0), float(x0 + w), float(y0 + h)))
    return boxes


def check_evidence(data_dir: Path | None = None, limit: int | None = None) -> Evidence:
    """The dev cases of ``data_dir`` (default ``SHARED_DATA / "dev"``) when it has any, else the
    shipped images; ``limit``: at most this many images (``None``: all)."""
    from service.core.domain import ImageInput, RawPixels
    from service.core.imageio import decode_image

    def raw_input(image: np.ndarray) -> ImageInput:  # as export.reference.raw_input, without importing torch
        return ImageInput(raw=RawPixels(str(image.dtype), tuple(image.shape), np.ascontiguousarray(image).tobytes()))

    if limit is not None and limit < 1:
        raise ValueError(f"a check needs at least one image (asked for {limit})")
    folder = Path(data_dir) if data_dir is not None else SHARED_DATA / "dev"
    if has_cases(folder):
        cases = load_cases(folder, limit)
        items = tuple(Prompted(c.case_id, decode_image(raw_input(c.image)).pixels, reference_box(c.mask), c.mask)
                      for c in cases)
        return Evidence("dev", str(folder), items, len(cases))
    images = shipped_images(limit)
    items = tuple(Prompted(f"{name} box {f:.0%}", pixels, box)
                  for name, pixels in images
                  for f, box in zip(BOX_FRACTIONS, centred_boxes(*pixels.shape[:2])))
    return Evidence("shipped", str(shipped_images_dir()), items, len(images), str(folder))
