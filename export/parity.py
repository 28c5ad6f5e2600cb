"""Parity of the exported LiteMedSAM ONNX files with the PyTorch model on real dev images.

Both sides get the gateway's own preprocessing (decode -> resize longest side -> pad) and
the reference box of each case; the ONNX side is the gateway's own predictor
(:class:`service.inference.predictor.SamPredictor` on the repository's entries). The check
compares the low-res logits and the final masks (mask IoU >= 0.99 per case) and prints the
largest logit difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.dev_cases import SHARED_DATA, iou, load_cases, reference_box
from export.reference import TorchReference, raw_input
from export.options import ExportOptions
from service.core.domain import Prompt
from service.core.imageio import decode_image
from service.inference.predictor import SamPredictor

MIN_IOU = 0.99


def default_dev_dir() -> Path:
    return SHARED_DATA / "dev"


def check_medsam_lite(opts: ExportOptions, data_dir: Path, limit: int | None) -> bool:
    ref = TorchReference(opts.cache_dir)
    predictor = SamPredictor.from_repository(opts.repository, "medsam_lite", version=opts.version)
    worst_iou, worst_logit = 1.0, 0.0
    cases = load_cases(data_dir, limit)
    for case in cases:
        tensor, frame = ref.prepare(case.image)
        box = reference_box(case.mask)
        want = ref.low_res_logits(tensor, frame, box)
        embedding = predictor.embed(decode_image(raw_input(case.image)).pixels)
        low, _ = predictor.predict(embedding, [Prompt(box=box)])
        got = low[0]
        logit_diff = float(np.abs(want - got).max())
        masks = predictor.masks(np.stack([want, got]), embedding.frame)
        case_iou = iou(masks[0], masks[1])
        worst_iou, worst_logit = min(worst_iou, case_iou), max(worst_logit, logit_diff)
        print(f"parity {case.case_id:45s} max|dlogit| {logit_diff:.2e}  mask IoU {case_iou:.5f}")
    ok = worst_iou >= MIN_IOU
    print(f"parity over {len(cases)} dev cases: worst mask IoU {worst_iou:.5f} (need >= {MIN_IOU}), "
          f"max |logit difference| {worst_logit:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok
