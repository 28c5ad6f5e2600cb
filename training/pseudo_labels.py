"""Pseudo-labels from LiteMedSAM prompted with each box ("SAM inside the bounding box").

The served models of ``model_repository/`` (``medsam_lite_encoder``, ``medsam_lite_decoder``)
run through the gateway's own predictor (:class:`service.inference.predictor.SamPredictor`:
its runtimes, preprocessing, prompt checks, decoder feeds and upsampling) after the gateway's
intensity rule (:func:`service.core.imageio.normalise`), so a pseudo-label is exactly what the
gateway would answer to a request with these box prompts. Tensor names and sizes come from
each model's ``config.pbtxt``.

Per case, every box gives a logit map at input size; the foreground probability is the
maximum over boxes of ``sigmoid(logit)`` *inside* that box (outside all boxes it is 0:
the box says so). The label map is 1 where ``p >= hi``, 0 where ``p <= lo`` and -1
(uncertain, ignored by :func:`training.losses.pseudo_label_loss`) in between; a box that
quality control rejects (:mod:`training.qc`) has its whole inside set to -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from service.core.domain import Box, Prompt
from service.core.imageio import normalise
from service.inference.predictor import SamPredictor


class BoxMask(NamedTuple):
    """LiteMedSAM's answer to one box: float32 ``(H, W)`` logits and its predicted IoU."""

    logits: np.ndarray
    iou: float


@dataclass(frozen=True)
class PseudoLabel:
    """``prob``: float32 ``(H, W)`` foreground probability; ``labels``: int8 ``(H, W)`` 1/0/-1;
    ``ious``: float32 ``(K,)`` predicted IoU per box; ``box_masks``: bool ``(K, H, W)``."""

    case_id: str
    prob: np.ndarray
    labels: np.ndarray
    ious: np.ndarray
    box_masks: np.ndarray


class LiteMedSAM:
    """The served LiteMedSAM encoder and decoder, through the gateway's predictor."""

    def __init__(self, repository: Path = Path("model_repository"), model: str = "medsam_lite",
                 threads: int = 2) -> None:
        self.predictor = SamPredictor.from_repository(Path(repository), model, threads=threads)
        self.size = self.predictor.input_size

    def segment_boxes(self, image: np.ndarray, boxes: np.ndarray) -> list[BoxMask]:
        """One :class:`BoxMask` per XYXY API box (``boxes`` float ``(K, 4)``) on a native image;
        boxes are checked (and clipped to the image) as the gateway checks them."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            return []
        embedding = self.predictor.embed(normalise(np.asarray(image), None))
        prompts = [Prompt(box=Box(float(x0), float(y0), float(x1), float(y1))) for x0, y0, x1, y1 in boxes]
        low, ious = self.predictor.predict(embedding, prompts)
        logits = self.predictor.upsample(low, embedding.frame)
        return [BoxMask(logits[k], float(ious[k])) for k in range(len(prompts))]


def box_region(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool ``shape``: pixels whose centre lies inside the XYXY API box."""
    h, w = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    rows = (np.arange(h) + 0.5 >= y0) & (np.arange(h) + 0.5 <= y1)
    cols = (np.arange(w) + 0.5 >= x0) & (np.arange(w) + 0.5 <= x1)
    return rows[:, None] & cols[None, :]


def combine(case_id: str, shape: tuple[int, int], boxes: np.ndarray, answers: list[BoxMask],
            rejected: np.ndarray | None = None, lo: float = 0.3, hi: float = 0.7) -> PseudoLabel:
    """Merge per-box answers into a :class:`PseudoLabel` (rules in the module doc).

    ``rejected``: bool ``(K,)``, boxes whose inside becomes uncertain (-1).
    """
    prob = np.zeros(shape, dtype=np.float32)
    uncertain = np.zeros(shape, dtype=bool)
    box_masks = np.zeros((len(answers), *shape), dtype=bool)
    rejected = np.zeros(len(answers), bool) if rejected is None else np.asarray(rejected, bool)
    for k, (box, answer) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), answers)):
        inside = box_region(box, shape)
        p = 1.0 / (1.0 + np.exp(-np.clip(answer.logits, -30, 30)))
        p = np.where(inside, p, 0.0).astype(np.float32)
        box_masks[k] = p > 0.5
        if rejected[k]:
            uncertain |= inside
        else:
            prob = np.maximum(prob, p)
    labels = np.full(shape, -1, dtype=np.int8)
    labels[prob <= lo] = 0
    labels[prob >= hi] = 1
    labels[uncertain & (labels != 1)] = -1
    ious = np.array([a.iou for a in answers], dtype=np.float32)
    return PseudoLabel(case_id, prob, labels, ious, box_masks)


def save(pl: PseudoLabel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pl.case_id}.npz"
    np.savez_compressed(path, prob=pl.prob.astype(np.float16), labels=pl.labels, ious=pl.ious,
                        box_masks=pl.box_masks)
    return path


def load(folder: Path, case_id: str) -> PseudoLabel:
    with np.load(Path(folder) / f"{case_id}.npz", allow_pickle=False) as z:
        return PseudoLabel(case_id, z["prob"].astype(np.float32), z["labels"], z["ious"], z["box_masks"])
