"""Losses for weak supervision. Every function takes ``logits`` float ``(B, 2, H, W)``
(channel 0 background, 1 foreground; probabilities by softmax over channels) and returns a
scalar tensor. Label maps use -1 for "unlabelled / uncertain" (ignored).

* :func:`tightness_prior_loss`: box tightness prior as multiple-instance learning (Hsu et al.,
  NeurIPS 2019): every row and every column crossing a box is a positive bag (at least one
  of its pixels inside the box is foreground): ``-log max p`` per bag; every pixel outside
  all boxes is background: ``-log(1 - p)``.
* :func:`partial_cross_entropy`: cross-entropy on labelled (scribbled) pixels only (Tang et al. 2018).
* :func:`size_penalty`: inequality constraints ``lower <= V <= upper`` on the predicted area
  ``V = sum p`` (pixels), penalised as ``(relu(lower - V)^2 + relu(V - upper)^2) / (H W)``
  (Kervadec et al., MedIA 2019, "Constrained-CNN losses", their quadratic penalty).
* :func:`box_fill_penalty`: the area inside each box must be at least ``fill`` times the box's.
* :func:`pseudo_label_loss`: cross-entropy + soft Dice on pixels whose pseudo-label is
  certain (0/1); -1 pixels are ignored by both terms.
* :func:`batch_dice_loss`: MONAI ``DiceLoss(batch=True)`` of the foreground over the labelled
  pixels of the whole batch (one Dice, not one per image), -1 pixels zeroed in both the
  prediction and the target; :func:`labelled_dice_ce_loss` adds the partial cross-entropy. The
  same loss takes a reference mask (padding -1) and a pseudo-label (uncertain -1).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

EPS = 1e-6


def _fg_log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_fg, log p_bg), each ``(B, H, W)``."""
    log_p = F.log_softmax(logits, dim=1)
    return log_p[:, 1], log_p[:, 0]


def tightness_prior_loss(logits: torch.Tensor, boxes: torch.Tensor, outside_weight: float = 1.0) -> torch.Tensor:
    """Box tightness prior + background outside the boxes.

    ``boxes``: int64 ``(B, K, 4)`` as ``(col0, row0, col1, row1)`` pixel-index ranges in the
    logits' frame, end exclusive; rows with ``col1 <= col0`` are padding. An image without
    a box is all background. Returns ``mean_bags(-log max p) + outside_weight *
    mean_outside(-log(1 - p))``; the two means run over all bags / outside pixels of the batch.
    """
    log_fg, log_bg = _fg_log_probs(logits)
    b, h, w = log_fg.shape
    inside = torch.zeros((b, h, w), dtype=torch.bool, device=logits.device)
    bag_terms = []
    for i in range(b):
        for c0, r0, c1, r1 in boxes[i].tolist():
            if c1 <= c0 or r1 <= r0:
                continue
            region = log_fg[i, r0:r1, c0:c1]
            bag_terms.append(-region.max(dim=1).values)  # one bag per row
            bag_terms.append(-region.max(dim=0).values)  # one bag per column
            inside[i, r0:r1, c0:c1] = True
    zero = logits.sum() * 0.0
    positive = torch.cat(bag_terms).mean() if bag_terms else zero
    outside = -log_bg[~inside]
    negative = outside.mean() if outside.numel() else zero
    return positive + outside_weight * negative


def box_fill_penalty(logits: torch.Tensor, boxes: torch.Tensor, fill: float) -> torch.Tensor:
    """Lower bound on the predicted area inside each box: ``relu(fill |B| - V_B)^2 / (H W)``
    with ``V_B`` the sum of ``p`` over the box (pixels), mean over the boxes of the batch
    (0 without boxes). Keeps the tightness prior from collapsing to one pixel per row and
    column (a global size constraint in the spirit of Kervadec et al., MIDL 2020).
    ``boxes`` as in :func:`tightness_prior_loss`."""
    p = torch.softmax(logits, dim=1)[:, 1]
    h, w = p.shape[1:]
    terms = []
    for i in range(p.shape[0]):
        for c0, r0, c1, r1 in boxes[i].tolist():
            if c1 <= c0 or r1 <= r0:
                continue
            area = p[i, r0:r1, c0:c1].sum()
            terms.append(F.relu(fill * (r1 - r0) * (c1 - c0) - area) ** 2 / (h * w))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def partial_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels with ``labels`` in {0, 1}; ``labels`` int64 ``(B, H, W)``,
    -1 ignored. 0 when nothing is labelled."""
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)


def size_penalty(logits: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Quadratic penalty on the predicted area leaving ``[lower, upper]`` (pixels, ``(B,)`` each),
    divided by ``H * W``; mean over the batch."""
    p = torch.softmax(logits, dim=1)[:, 1]
    area = p.sum(dim=(1, 2))
    h, w = p.shape[1:]
    penalty = F.relu(lower.to(area) - area) ** 2 + F.relu(area - upper.to(area)) ** 2
    return (penalty / (h * w)).mean()


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 - (2 sum p y + eps) / (sum p + sum y + eps)`` per image over pixels with labels
    0/1 (-1 ignored), mean over the batch; ``eps`` = 1e-6."""
    p = torch.softmax(logits, dim=1)[:, 1]
    valid = (labels >= 0).to(p)
    y = (labels == 1).to(p)
    inter = (p * y * valid).sum(dim=(1, 2))
    denom = (p * valid).sum(dim=(1, 2)) + (y * valid).sum(dim=(1, 2))
    return (1.0 - (2.0 * inter + EPS) / (denom + EPS)).mean()


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` * soft Dice on certain pseudo-labels (``labels`` int64
    ``(B, H, W)``, 1/0, -1 uncertain and ignored)."""
    return partial_cross_entropy(logits, labels) + dice_weight * soft_dice_loss(logits, labels)


BATCH_DICE_SMOOTH = 1e-5   # MONAI DiceLoss's default smooth_nr = smooth_dr


def batch_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 - (2 sum p y + s) / (sum p + sum y + s)`` with the sums over every labelled pixel of
    the batch (``labels`` int64 ``(B, H, W)``: 1/0, -1 ignored), ``p`` the softmax foreground
    probability and ``s`` = :data:`BATCH_DICE_SMOOTH`: MONAI ``DiceLoss(batch=True)`` on ``p``
    and the foreground target, both zeroed where ignored. Pooling the batch keeps slices without
    foreground from pulling the prediction to nothing (a per-image Dice of an empty slice is 1
    for any positive ``p``); an all-empty batch gives ``1 - s / (sum p + s)``, an all-ignored one 0."""
    from monai.losses import DiceLoss

    p = torch.softmax(logits, dim=1)[:, 1:2]
    valid = (labels >= 0)[:, None].to(p)
    y = (labels == 1)[:, None].to(p)
    dice = DiceLoss(include_background=True, batch=True, smooth_nr=BATCH_DICE_SMOOTH, smooth_dr=BATCH_DICE_SMOOTH)
    return dice(p * valid, y * valid)


def labelled_dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """:func:`partial_cross_entropy` + ``dice_weight`` * :func:`batch_dice_loss` on a 1/0/-1 map
    ``labels`` int64 ``(B, H, W)``; -1 pixels are ignored by both terms."""
    return partial_cross_entropy(logits, labels) + dice_weight * batch_dice_loss(logits, labels)
