"""Geometry between input-image pixels and a SAM-family model's square input frame.

Conventions:

* API coordinates are continuous input-image pixels with the origin at the top-left
  *corner* of the top-left pixel: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a
  box around the whole W x H image is (0, 0, W, H).
* SAM/MedSAM work in *pixel-index* coordinates (pixel j's centre is x = j) scaled by
  ``size / max(H, W)`` after the longest side is resized to ``size`` and the image is
  zero-padded at the bottom/right to ``size x size``. A box there spans the centres of its
  extreme pixels, which is how MedSAM's training boxes were drawn from reference masks.

So a continuous point c maps to index c - 0.5, and a box (x0, y0, x1, y1) maps to the
index box (x0, y0, x1 - 1, y1 - 1) (its first and last pixel inside), then times the scale.

How an image is placed in the square input is the model's *preprocessing*
(``medseg.preprocessing`` in its config.pbtxt, :data:`PREPROCESSINGS`):

* ``""`` (LiteMedSAM): longest side resized to ``size``, [0, 1], zero padding bottom/right;
* ``"sam"`` (Meta's SAM): the same placement; the encoder graph normalises with SAM's pixel
  mean and std, so the padding is filled with the mean (:data:`SAM_PIXEL_MEAN`), which the
  graph turns into the zeros SAM pads with after normalising;
* ``"medsam"`` (MedSAM ViT-B): the image *stretched* to ``size x size`` in [0, 1] (what
  MedSAM's own inference does), so x and y have their own scale (:attr:`Frame.scales`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.core.domain import Box, Point


PREPROCESSINGS = ("", "sam", "medsam")
# SAM's ImageNet pixel mean on the [0, 1] scale (its 123.675, 116.28, 103.53 over 255)
SAM_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM_PIXEL_STD = (0.229, 0.224, 0.225)


def check_preprocessing(name: str) -> str:
    if name not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {name!r}; known: {', '.join(repr(p) for p in PREPROCESSINGS)}")
    return name


@dataclass(frozen=True)
class Frame:
    """How an ``(height, width)`` image sits in the model's ``size x size`` input:
    letterboxed (longest side resized, padded), or with ``stretch`` resized to the square."""

    height: int
    width: int
    size: int
    stretch: bool = False

    @property
    def scale(self) -> float:
        """The one scale of a letterboxed frame (a stretched frame has two: :attr:`scales`)."""
        if self.stretch:
            raise ValueError("a stretched frame has a scale per axis: use Frame.scales")
        return self.size / max(self.height, self.width)

    @property
    def scales(self) -> tuple[float, float]:
        """(x scale, y scale) from input-image pixels to the model frame."""
        if self.stretch:
            return self.size / self.width, self.size / self.height
        s = self.scale
        return s, s

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(h, w) of the resized image inside the padded square (longest side == size)."""
        if self.stretch:
            return self.size, self.size
        s = self.scale
        return max(1, int(round(self.height * s))), max(1, int(round(self.width * s)))


def _resize_channel(channel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(channel)
    return np.asarray(image.resize((hw[1], hw[0]), resample=Image.Resampling.BILINEAR), dtype=np.float32)


def frame_of(height: int, width: int, size: int, preprocessing: str = "") -> Frame:
    """The :class:`Frame` of an ``(height, width)`` image for a model of this preprocessing."""
    return Frame(int(height), int(width), size, stretch=check_preprocessing(preprocessing) == "medsam")


def model_input(pixels: np.ndarray, size: int, preprocessing: str = "") -> tuple[np.ndarray, Frame]:
    """Resize (+ pad) a decoded image into the model input tensor.

    ``pixels``: float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1].
    Returns float32 ``(1, 3, size, size)`` in [0, 1] (grey replicated to 3 channels; the
    padding bottom/right zero, or SAM's pixel mean for ``"sam"``; see the module doc) and
    the :class:`Frame` needed to map prompts and masks.
    """
    frame = frame_of(pixels.shape[0], pixels.shape[1], size, preprocessing)
    hw = frame.resized_hw
    out = np.zeros((1, 3, size, size), dtype=np.float32)
    if preprocessing == "sam":
        out[0] = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32).reshape(3, 1, 1)
    if pixels.ndim == 2:
        resized = _resize_channel(pixels, hw)
        out[0, :, : hw[0], : hw[1]] = resized  # broadcast to the 3 channels
    else:
        for c in range(3):
            out[0, c, : hw[0], : hw[1]] = _resize_channel(np.ascontiguousarray(pixels[..., c]), hw)
    np.clip(out, 0.0, 1.0, out=out)
    return out, frame


def box_to_model(box: Box, frame: Frame) -> np.ndarray:
    """float32 ``(4,)`` XYXY index box in the model frame for an API box (see module doc)."""
    x1 = max(box.x1 - 1.0, box.x0)
    y1 = max(box.y1 - 1.0, box.y0)
    sx, sy = frame.scales
    return np.array([box.x0, box.y0, x1, y1], dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)


def points_to_model(points: tuple[Point, ...] | list[Point], frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """API points -> (float32 ``(N, 2)`` model-frame coords, float32 ``(N,)`` labels 1/0)."""
    coords = np.array([[p.x - 0.5, p.y - 0.5] for p in points], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1.0 if p.positive else 0.0 for p in points], dtype=np.float32)
    return coords * np.asarray(frame.scales, dtype=np.float32), labels


def box_from_model(model_box: np.ndarray, frame: Frame) -> Box:
    """Inverse of :func:`box_to_model` (used by tests and the reference pipeline)."""
    sx, sy = frame.scales
    x0, y0, x1, y1 = (np.asarray(model_box, dtype=np.float64) / np.array([sx, sy, sx, sy])).tolist()
    return Box(x0, y0, x1 + 1.0, y1 + 1.0)


def upsample_logits(low_res: np.ndarray, frame: Frame) -> np.ndarray:
    """Low-res logits ``(P, size', size')`` -> logits ``(P, H, W)`` at input size.

    The valid (un-padded) region is cropped and bilinearly resized, as SAM's
    ``postprocess_masks`` does after its own upscaling to the input size.
    """
    p, lh, lw = low_res.shape
    h, w = frame.resized_hw
    ch = max(1, int(round(h * lh / frame.size)))
    cw = max(1, int(round(w * lw / frame.size)))
    out = np.empty((p, frame.height, frame.width), dtype=np.float32)
    for i in range(p):
        crop = np.ascontiguousarray(low_res[i, :ch, :cw], dtype=np.float32)
        image = Image.fromarray(crop)
        out[i] = np.asarray(image.resize((frame.width, frame.height), resample=Image.Resampling.BILINEAR))
    return out
