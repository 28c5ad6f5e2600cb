"""Dice of an encoder + decoder pair on the dev cases, and the guard every faster variant passes.

A variant (INT8 or BF16 encoder, TensorRT engines) is kept only if its mean Dice on the dev
cases, each prompted with its reference box, is within ``MAX_DICE_DROP`` of the fp32 models'.
Both sides run the gateway's own steps: :class:`service.inference.predictor.SamPredictor`
(built with ``SamPredictor.from_repository``, a variant with ``predictor.with_encoder`` or a
``Run`` of other sessions, e.g. TensorRT engines), so the guard measures what is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.dev_cases import dice, load_cases, reference_box
from service.inference.predictor import SamPredictor

MAX_DICE_DROP = 0.005


def dev_dice(predictor: SamPredictor, data_dir: Path, limit: int | None = None) -> list[float]:
    """Per-case Dice against the reference masks, prompted with each case's reference box."""
    from export.reference import raw_input
    from service.core.domain import Prompt
    from service.core.imageio import decode_image

    scores = []
    for case in load_cases(data_dir, limit):
        embedding = predictor.embed(decode_image(raw_input(case.image)).pixels)
        low, _ = predictor.predict(embedding, [Prompt(box=reference_box(case.mask))])
        scores.append(dice(predictor.masks(low, embedding.frame)[0], case.mask))
    return scores


def check_drop(base: list[float], variant: list[float], what: str, limit: float = MAX_DICE_DROP,
               two_sided: bool = False) -> float:
    """Mean Dice drop of ``variant`` against ``base``; raises ``RuntimeError`` past ``limit``
    (``two_sided``: a gain that large fails too, as for engines that must equal the base)."""
    drop = float(np.mean(base) - np.mean(variant))
    print(f"{what} on {len(base)} dev cases: mean Dice base {np.mean(base):.4f}, variant {np.mean(variant):.4f}, "
          f"drop {drop:+.4f} (limit {limit})")
    if drop > limit or (two_sided and abs(drop) > limit):
        raise RuntimeError(f"{what}: mean Dice changes by {-drop:+.4f} on the dev cases (limit {limit})")
    return drop
