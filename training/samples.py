"""Cases + weak labels -> tensors in the model frame, and seeded batches.

Every image goes through :func:`service.core.segmenter_io.preprocess` after the gateway's
intensity normalisation (:func:`service.core.imageio.normalise`, percentile rule): the exact
input the served model will get. Labels are moved into the same ``size x size`` frame
(:func:`service.core.segmenter_io.resize_labels`); the zero padding is "unlabelled" (-1) in the
scribble, point and pseudo-label maps and background in the reference mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.core.segmenter_io import Frame, preprocess, resize_labels
from service.core.imageio import normalise
from training.data import Case
from training.pseudo_labels import PseudoLabel
from training.weak_labels import WeakLabels

MAX_BOXES = 4


def model_image(image: np.ndarray, size: int) -> tuple[np.ndarray, Frame]:
    """Native image -> float32 ``(1, size, size)`` model input and its frame (gateway rules)."""
    tensor, frame = preprocess(normalise(np.asarray(image), None), size)
    return tensor[0], frame


def boxes_to_frame(boxes: np.ndarray | None, frame: Frame, max_boxes: int = MAX_BOXES) -> np.ndarray:
    """XYXY API boxes ``(K, 4)`` -> int64 ``(max_boxes, 4)`` ``(col0, row0, col1, row1)`` end
    exclusive in the model frame (outward rounding, clipped to the resized image); padding
    rows are zeros. Extra boxes beyond ``max_boxes`` are dropped (largest kept)."""
    out = np.zeros((max_boxes, 4), dtype=np.int64)
    if boxes is None or len(boxes) == 0:
        return out
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    h, w = frame.resized_hw
    for k, (x0, y0, x1, y1) in enumerate(boxes[np.argsort(-areas)][:max_boxes] * frame.scale):
        c0, r0 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
        c1, r1 = int(np.clip(np.ceil(x1), c0 + 1, w)), int(np.clip(np.ceil(y1), r0 + 1, h))
        out[k] = (c0, r0, c1, r1)
    return out


def points_to_frame(points: np.ndarray | None, labels: np.ndarray | None, frame: Frame,
                    radius: int = 1) -> np.ndarray:
    """Points (API (x, y), labels 1/0) -> int64 ``(size, size)`` map: a square of side
    ``2 radius + 1`` around each point's model-frame pixel gets its label, the rest -1."""
    out = np.full((frame.size, frame.size), -1, dtype=np.int64)
    if points is None:
        return out
    h, w = frame.resized_hw
    for (x, y), label in zip(np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)):
        c = int(np.clip(np.floor(x * frame.scale), 0, w - 1))
        r = int(np.clip(np.floor(y * frame.scale), 0, h - 1))
        out[max(0, r - radius): min(h, r + radius + 1), max(0, c - radius): min(w, c + radius + 1)] = int(label)
    return out


@dataclass
class SampleSet:
    """All training tensors, N samples in the model frame (``S = size``).

    ``images`` float32 ``(N, 1, S, S)``; ``masks`` int64 ``(N, S, S)`` 0/1 reference;
    ``scribbles``, ``points``, ``pseudo`` int64 ``(N, S, S)`` 1/0/-1; ``boxes`` int64
    ``(N, MAX_BOXES, 4)``; ``areas`` float32 ``(N,)`` reference area in model pixels;
    ``present`` bool ``(N,)``; ``hw`` int64 ``(N, 2)`` un-padded extent.
    """

    case_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    scribbles: torch.Tensor
    points: torch.Tensor
    pseudo: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    present: torch.Tensor
    hw: torch.Tensor

    def __len__(self) -> int:
        return len(self.case_ids)


def prepare(cases: list[Case], size: int, weak: dict[str, WeakLabels] | None = None,
            pseudo: dict[str, PseudoLabel] | None = None) -> SampleSet:
    """Build a :class:`SampleSet`; missing weak labels / pseudo-labels give all -1 maps."""
    cols: dict[str, list] = {k: [] for k in ("images", "masks", "scribbles", "points", "pseudo", "boxes",
                                             "areas", "present", "hw")}
    for case in cases:
        image, frame = model_image(case.image, size)
        w = (weak or {}).get(case.case_id)
        mask = resize_labels(case.mask.astype(np.int64), frame, ignore=0)
        cols["images"].append(image)
        cols["masks"].append(mask)
        cols["areas"].append(float(mask.sum()))
        cols["hw"].append(frame.resized_hw)
        unlabelled = np.full((size, size), -1, np.int64)
        cols["scribbles"].append(unlabelled if w is None or w.scribbles is None
                                 else resize_labels(w.scribbles.astype(np.int64), frame, ignore=-1))
        cols["points"].append(points_to_frame(None if w is None else w.points,
                                              None if w is None else w.point_labels, frame))
        cols["boxes"].append(boxes_to_frame(None if w is None else w.boxes, frame))
        cols["present"].append(bool(case.mask.any()) if w is None or w.present is None else w.present)
        p = (pseudo or {}).get(case.case_id)
        cols["pseudo"].append(unlabelled if p is None else resize_labels(p.labels.astype(np.int64), frame, ignore=-1))
    t = {k: torch.as_tensor(np.stack(v)) if k not in ("areas", "present") else torch.as_tensor(np.asarray(v))
         for k, v in cols.items()}
    return SampleSet([c.case_id for c in cases], t["images"], t["masks"], t["scribbles"], t["points"], t["pseudo"],
                     t["boxes"], t["areas"].float(), t["present"].bool(), t["hw"])


def batch(samples: SampleSet, generator: torch.Generator, batch_size: int, augment: bool = True) -> dict[str, torch.Tensor]:
    """A random batch (indices with replacement) drawn from ``generator`` only.

    Augmentation (also from ``generator``): left-right flip inside the un-padded region
    (p = 0.5; boxes flipped with it) and a gamma ``exp(uniform(-0.25, 0.25))`` on intensities.
    """
    idx = torch.randint(len(samples), (batch_size,), generator=generator)
    flips = torch.rand(batch_size, generator=generator) < 0.5
    gammas = torch.exp((torch.rand(batch_size, generator=generator) - 0.5) * 0.5)
    out = {k: getattr(samples, k)[idx].clone() for k in ("images", "masks", "scribbles", "points", "pseudo",
                                                         "boxes", "areas", "present")}
    if not augment:
        return out
    for i in range(batch_size):
        out["images"][i] = out["images"][i].clamp(min=0) ** gammas[i]
        if not flips[i]:
            continue
        h, w = samples.hw[idx[i]].tolist()
        for key in ("images", "masks", "scribbles", "points", "pseudo"):
            region = out[key][i][..., :h, :w]
            out[key][i][..., :h, :w] = torch.flip(region, dims=(-1,))
        b = out["boxes"][i]
        valid = b[:, 2] > b[:, 0]
        c0, c1 = b[:, 0].clone(), b[:, 2].clone()
        b[valid, 0], b[valid, 2] = w - c1[valid], w - c0[valid]
    return out
