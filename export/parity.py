"""Parity of the exported LiteMedSAM ONNX files with the PyTorch model on real dev images.

Both sides get the gateway's own preprocessing (decode -> resize longest side -> pad) and
the reference box of each case; the check compares the low-res logits and the final masks
(mask IoU >= 0.99 per case) and prints the largest logit difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import medsam_lite as ml
from export.dev_cases import SHARED_DATA, iou, load_cases, reference_box
from export.onnx_io import run_onnx
from export.reference import TorchReference
from export.registry import ExportOptions
from export.triton_config import ONNX_FILENAME
from service.core import geometry as st

MIN_IOU = 0.99


def default_dev_dir() -> Path:
    return SHARED_DATA / "dev"


def check_medsam_lite(opts: ExportOptions, data_dir: Path, limit: int | None) -> bool:
    ref = TorchReference(opts.cache_dir)
    enc = opts.repository / "medsam_lite_encoder" / str(opts.version) / ONNX_FILENAME
    dec = opts.repository / "medsam_lite_decoder" / str(opts.version) / ONNX_FILENAME
    worst_iou, worst_logit = 1.0, 0.0
    cases = load_cases(data_dir, limit)
    for case in cases:
        tensor, frame = ref.prepare(case.image)
        box = reference_box(case.mask)
        want = ref.low_res_logits(tensor, frame, box)
        (emb,) = run_onnx(enc, {"image": tensor}, ["image_embeddings"])
        got, _ = run_onnx(dec, {
            "image_embeddings": emb,
            "point_coords": st.box_to_model(box, frame).reshape(1, 2, 2),
            "point_labels": np.array([[2.0, 3.0]], dtype=np.float32),
            "mask_input": np.zeros((1, 1, ml.LOW_RES, ml.LOW_RES), dtype=np.float32),
            "has_mask_input": np.zeros((1, 1), dtype=np.float32),
        }, ["low_res_masks", "iou_predictions"])
        logit_diff = float(np.abs(want - got[0, 0]).max())
        masks = st.upsample_logits(np.stack([want, got[0, 0]]), frame) > 0
        case_iou = iou(masks[0], masks[1])
        worst_iou, worst_logit = min(worst_iou, case_iou), max(worst_logit, logit_diff)
        print(f"parity {case.case_id:45s} max|dlogit| {logit_diff:.2e}  mask IoU {case_iou:.5f}")
    ok = worst_iou >= MIN_IOU
    print(f"parity over {len(cases)} dev cases: worst mask IoU {worst_iou:.5f} (need >= {MIN_IOU}), "
          f"max |logit difference| {worst_logit:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok
