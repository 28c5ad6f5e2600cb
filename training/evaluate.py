"""Evaluation at the input images' own resolution: Dice and 95% Hausdorff distance (MONAI).

Predictions go through exactly the serving path: :func:`training.samples.model_image`
(gateway normalisation + :func:`service.core.segmenter_io.preprocess`), the network, then
:func:`service.core.segmenter_io.postprocess`. HD95 is in millimetres (``pixel_spacing_mm``);
it is undefined (NaN, counted in ``empty``) when the prediction or the reference is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from service.core.segmenter_io import postprocess
from training.data import Case
from training.samples import model_image


@dataclass(frozen=True)
class CaseScore:
    case_id: str
    structure: str
    dice: float
    hd95_mm: float  # NaN when undefined


@dataclass(frozen=True)
class Summary:
    structure: str
    cases: int
    dice_mean: float
    dice_std: float
    hd95_mean_mm: float  # over cases where it is defined
    empty: int           # cases with an empty prediction


def scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    """(Dice, HD95 in mm) of bool ``(H, W)`` masks, with MONAI's metric functions."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    def onehot(m: np.ndarray) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(m, bool))
        return torch.stack([~m, m]).float()[None]

    p, r = onehot(pred), onehot(ref)
    dice = float(compute_dice(p, r, include_background=False, ignore_empty=False)[0, 0])
    if not pred.any() or not ref.any():
        return dice, math.nan
    hd = float(compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                          spacing=[list(spacing)])[0, 0])
    return dice, hd


def torch_predictor(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """``(1, 1, S, S)`` float32 -> logits ``(1, C, S, S)`` with the PyTorch model."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.eval()(torch.from_numpy(x)).numpy()
    return run


def onnx_predictor(path: str, threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """Same as :func:`torch_predictor` on an exported file, through the gateway's session factory
    (:func:`service.backends.runtimes.open_session`: ONNX Runtime, as the embedded backend runs it)."""
    from service.backends.runtimes import open_session

    session = open_session(Path(path), {}, threads, batch_axis=True)
    name, output = session.input_names[0], session.output_names[0]
    return lambda x: session.run([output], {name: x})[0]


def predict(predictor: Callable[[np.ndarray], np.ndarray], image: np.ndarray, size: int) -> np.ndarray:
    """bool ``(H, W)`` prediction for a native-intensity image."""
    tensor, frame = model_image(image, size)
    return postprocess(predictor(tensor[None]), frame)


def evaluate(predictor: Callable[[np.ndarray], np.ndarray], cases: list[Case], size: int) -> list[CaseScore]:
    out = []
    for case in cases:
        pred = predict(predictor, case.image, size)
        dice, hd = scores(pred, case.mask, case.spacing_mm)
        out.append(CaseScore(case.case_id, case.structure, dice, hd))
    return out


def summarise(case_scores: list[CaseScore]) -> list[Summary]:
    """One :class:`Summary` per structure (sorted by name)."""
    out = []
    for structure in sorted({s.structure for s in case_scores}):
        rows = [s for s in case_scores if s.structure == structure]
        dice = np.array([s.dice for s in rows])
        hd = np.array([s.hd95_mm for s in rows])
        defined = hd[np.isfinite(hd)]
        out.append(Summary(structure, len(rows), float(dice.mean()), float(dice.std()),
                           float(defined.mean()) if defined.size else math.nan, int((~np.isfinite(hd)).sum())))
    return out
