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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from service.core.domain import Box, Point


@dataclass(frozen=True)
class Frame:
    """How an ``(height, width)`` image sits in the model's ``size x size`` input."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(h, w) of the resized image inside the padded square (longest side == size)."""
        s = self.scale
        return max(1, int(round(self.height * s))), max(1, int(round(self.width * s)))


def _resize_channel(channel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(channel)
    return np.asarray(image.resize((hw[1], hw[0]), resample=Image.Resampling.BILINEAR), dtype=np.float32)


def model_input(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Frame]:
    """Resize + pad a decoded image into the model input tensor.

    ``pixels``: float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1].
    Returns float32 ``(1, 3, size, size)`` in [0, 1] (grey replicated to 3 channels,
    zero padding bottom/right) and the :class:`Frame` needed to map prompts and masks.
    """
    frame = Frame(int(pixels.shape[0]), int(pixels.shape[1]), size)
    hw = frame.resized_hw
    out = np.zeros((1, 3, size, size), dtype=np.float32)
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
    return np.array([box.x0, box.y0, x1, y1], dtype=np.float32) * np.float32(frame.scale)


def points_to_model(points: tuple[Point, ...] | list[Point], frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """API points -> (float32 ``(N, 2)`` model-frame coords, float32 ``(N,)`` labels 1/0)."""
    coords = np.array([[p.x - 0.5, p.y - 0.5] for p in points], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1.0 if p.positive else 0.0 for p in points], dtype=np.float32)
    return coords * np.float32(frame.scale), labels


def box_from_model(model_box: np.ndarray, frame: Frame) -> Box:
    """Inverse of :func:`box_to_model` (used by tests and the reference pipeline)."""
    x0, y0, x1, y1 = (np.asarray(model_box, dtype=np.float64) / frame.scale).tolist()
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
