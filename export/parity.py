"""Parity of the exported LiteMedSAM ONNX files with the PyTorch model on real dev images.

Both sides get the gateway's own preprocessing (decode -> resize longest side -> pad) and
the reference box of each case; the check compares the low-res logits and the final masks
(mask IoU >= 0.99 per case) and prints the largest logit difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export import medsam_lite as ml
from export.dev_cases import SHARED_DATA, iou, load_cases, reference_box
from export.onnx_io import run_onnx
from export.registry import ExportOptions
from export.triton_config import ONNX_FILENAME
from service import sam_transforms as st
from service.domain import ImageInput, RawPixels
from service.imageio import decode_image

MIN_IOU = 0.99


def default_dev_dir() -> Path:
    return SHARED_DATA / "dev"


def check_medsam_lite(opts: ExportOptions, data_dir: Path, limit: int | None) -> bool:
    net = ml.load_pretrained(opts.cache_dir)
    enc = opts.repository / "medsam_lite_encoder" / str(opts.version) / ONNX_FILENAME
    dec = opts.repository / "medsam_lite_decoder" / str(opts.version) / ONNX_FILENAME
    worst_iou, worst_logit = 1.0, 0.0
    cases = load_cases(data_dir, limit)
    for case in cases:
        raw = RawPixels(str(case.image.dtype), case.image.shape, case.image.tobytes())
        pixels = decode_image(ImageInput(raw=raw)).pixels
        tensor, frame = st.model_input(pixels, ml.IMAGE_SIZE)
        model_box = st.box_to_model(reference_box(case.mask), frame)
        want = ml.reference_logits(net, torch.from_numpy(tensor), torch.from_numpy(model_box[None])).numpy()
        (emb,) = run_onnx(enc, {"image": tensor}, ["image_embeddings"])
        got, _ = run_onnx(dec, {
            "image_embeddings": emb,
            "point_coords": model_box.reshape(1, 2, 2),
            "point_labels": np.array([[2.0, 3.0]], dtype=np.float32),
            "mask_input": np.zeros((1, 1, ml.LOW_RES, ml.LOW_RES), dtype=np.float32),
            "has_mask_input": np.zeros((1, 1), dtype=np.float32),
        }, ["low_res_masks", "iou_predictions"])
        logit_diff = float(np.abs(want - got).max())
        mask_want = st.upsample_logits(want[:, 0], frame)[0] > 0
        mask_got = st.upsample_logits(got[:, 0], frame)[0] > 0
        case_iou = iou(mask_want, mask_got)
        worst_iou, worst_logit = min(worst_iou, case_iou), max(worst_logit, logit_diff)
        print(f"parity {case.case_id:45s} max|dlogit| {logit_diff:.2e}  mask IoU {case_iou:.5f}")
    ok = worst_iou >= MIN_IOU
    print(f"parity over {len(cases)} dev cases: worst mask IoU {worst_iou:.5f} (need >= {MIN_IOU}), "
          f"max |logit difference| {worst_logit:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok
