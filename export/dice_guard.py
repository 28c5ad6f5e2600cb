"""Dice of an encoder + decoder pair on the dev cases, and the guard every faster variant passes.

A variant (INT8 or BF16 encoder, TensorRT engines) is kept only if it passes its guard on the
evidence :func:`export.dev_cases.check_evidence` finds, and the guard prints which it used:

* **dev-case Dice** (``../shared/data/dev`` present): its mean Dice on the dev cases, each
  prompted with its reference box, is within ``MAX_DICE_DROP`` of the fp32 models';
* **fp32 agreement on shipped images** (a bare clone, no dev cases): there is no reference
  mask, so the variant's masks are compared with the fp32 model's on the DICOM test images
  that ship with pydicom (centred boxes of three sizes); their mean Dice must be at least
  ``MIN_AGREEMENT``. Measured on the first 1..23 decodable shipped images (what ``--guard-cases
  N`` takes): BF16 0.972-0.981, INT8 0.912-0.979 (its larger per-case swings), on all 25
  (75 prompts): BF16 0.973, static INT8 0.955 (0.851 while its convolutional first stage was
  quantised too, see ``export.encoder_variants.FLOAT_SCOPE``), an encoder that
  ignores its image (zeroed weights, or all-zero embeddings) 0.69-0.82: the box prompt alone
  already gives a box-shaped mask, so the threshold sits between the two groups, not near 1.

Both sides run the gateway's own steps: :class:`service.inference.predictor.SamPredictor`
(built with ``SamPredictor.from_repository``, a variant with ``predictor.with_encoder``, plus
``.with_decoder`` for a variant with its own prompt decoder such as BF16, or a ``Run`` of other
sessions, e.g. TensorRT engines), so the guard measures the whole variant as it is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.dev_cases import Evidence, dice, load_cases, reference_box
from service.core.domain import Prompt
from service.inference.predictor import SamPredictor

MAX_DICE_DROP = 0.005
MIN_AGREEMENT = 0.87  # mean Dice of a variant's masks with the fp32 model's, shipped images


def dev_dice(predictor: SamPredictor, data_dir: Path, limit: int | None = None) -> list[float]:
    """Per-case Dice against the reference masks, prompted with each case's reference box."""
    from export.reference import raw_input
    from service.core.imageio import decode_image

    scores = []
    for case in load_cases(data_dir, limit):
        embedding = predictor.embed(decode_image(raw_input(case.image)).pixels)
        low, _ = predictor.predict(embedding, [Prompt(box=reference_box(case.mask))])
        scores.append(dice(predictor.masks(low, embedding.frame)[0], case.mask))
    return scores


def evidence_masks(predictor: SamPredictor, evidence: Evidence) -> list[np.ndarray]:
    """bool ``(H, W)`` mask of each prompted image of ``evidence`` (one encoder run per image)."""
    masks, embeddings = [], {}
    for item in evidence.items:
        key = id(item.pixels)
        if key not in embeddings:
            embeddings[key] = predictor.embed(item.pixels)
        low, _ = predictor.predict(embeddings[key], [Prompt(box=item.box)])
        masks.append(predictor.masks(low, embeddings[key].frame)[0])
    return masks


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


def check_agreement(agreement: list[float], what: str, limit: float = MIN_AGREEMENT) -> float:
    """Mean of per-prompt Dice between a variant's and the fp32 model's masks; raises
    ``RuntimeError`` below ``limit``."""
    mean = float(np.mean(agreement))
    print(f"{what} on {len(agreement)} prompts: mean Dice with the fp32 masks {mean:.4f}, worst "
          f"{min(agreement):.4f} (need mean >= {limit})")
    if mean < limit:
        raise RuntimeError(f"{what}: mean agreement (Dice) with the fp32 model's masks is {mean:.4f} on "
                           f"shipped images (need >= {limit})")
    return mean


def guard_variant(base: SamPredictor, variant: SamPredictor, evidence: Evidence, what: str) -> float:
    """The variant guard on ``evidence``, printing which evidence decided: dev-case Dice drop
    (returned) or agreement with ``base`` on shipped images (the mean Dice, returned).
    ``variant`` is the whole variant: its encoder and the decoder it is served with."""
    if evidence.kind == "dev":
        print(f"{what} evidence: dev-case Dice against the reference masks, {evidence.describe()}")
        masks = {"base": evidence_masks(base, evidence), "variant": evidence_masks(variant, evidence)}
        scores = {k: [dice(m, item.mask) for m, item in zip(v, evidence.items)] for k, v in masks.items()}
        return check_drop(scores["base"], scores["variant"], what)
    print(f"{what} evidence: agreement with the fp32 model's masks on {evidence.describe()}")
    agreement = [dice(a, b) for a, b in zip(evidence_masks(base, evidence), evidence_masks(variant, evidence))]
    return check_agreement(agreement, what)
