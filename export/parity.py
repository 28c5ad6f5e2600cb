"""Parity of the exported LiteMedSAM ONNX files with the PyTorch model on real images.

The evidence (:func:`export.dev_cases.check_evidence`) is the dev cases of ``../shared/data``
with their reference boxes when they are there, else (a bare clone) the DICOM test images that
ship with pydicom with centred boxes; the check prints which. Both sides get the gateway's own
decoding and preprocessing (resize longest side -> pad); the ONNX side is the gateway's own
predictor (:class:`service.inference.predictor.SamPredictor` on the repository's entries). The
check compares the low-res logits and the final masks (mask IoU >= 0.99 per prompt) and prints
the largest logit difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import medsam_lite as ml
from export.dev_cases import SHARED_DATA, Evidence, check_evidence, iou
from export.options import ExportOptions
from export.reference import TorchReference
from service.core import geometry as st
from service.core.domain import Prompt
from service.inference.predictor import SamPredictor

MIN_IOU = 0.99


def default_dev_dir() -> Path:
    return SHARED_DATA / "dev"


def check_medsam_lite(opts: ExportOptions, data_dir: Path | None, limit: int | None,
                      evidence: Evidence | None = None) -> bool:
    """Parity on ``limit`` images (``None``: all) of the evidence found for ``data_dir``."""
    evidence = evidence if evidence is not None else check_evidence(data_dir, limit)
    print(f"parity evidence: {evidence.describe()}")
    ref = TorchReference(opts.cache_dir)
    predictor = SamPredictor.from_repository(opts.repository, "medsam_lite", version=opts.version)
    worst_iou, worst_logit = 1.0, 0.0
    embeddings: dict[int, tuple] = {}
    for item in evidence.items:
        key = id(item.pixels)  # several prompts of one shipped image share its encoder runs
        if key not in embeddings:
            embeddings[key] = (st.model_input(item.pixels, ml.IMAGE_SIZE), predictor.embed(item.pixels))
        (tensor, frame), embedding = embeddings[key]
        want = ref.low_res_logits(tensor, frame, item.box)
        low, _ = predictor.predict(embedding, [Prompt(box=item.box)])
        got = low[0]
        logit_diff = float(np.abs(want - got).max())
        masks = predictor.masks(np.stack([want, got]), embedding.frame)
        case_iou = iou(masks[0], masks[1])
        worst_iou, worst_logit = min(worst_iou, case_iou), max(worst_logit, logit_diff)
        print(f"parity {item.case_id:45s} max|dlogit| {logit_diff:.2e}  mask IoU {case_iou:.5f}")
    ok = worst_iou >= MIN_IOU
    print(f"parity over {len(evidence.items)} prompts ({evidence.kind} evidence): worst mask IoU {worst_iou:.5f} "
          f"(need >= {MIN_IOU}), max |logit difference| {worst_logit:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok
