"""How well QC catches wrong annotations: corrupt some on purpose, count the flags.

For each case, every tight box is checked as drawn (false alarms) and once more moved by
its own size (one box width right, or left where it would leave the image), so that it
mostly covers background or a neighbouring structure (detections). Foreground scribbles
are checked as drawn and once more shifted down by ``scribble_shift`` pixels so they leave
the structure. Benchmarks are not tests: numbers go to docs/TRAINING.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import pseudo_labels as pl
from training import qc
from training import weak_labels as wl
from training.data import Case


@dataclass(frozen=True)
class QCRates:
    structure: str
    boxes: int
    clean_boxes_flagged: int
    moved_boxes_flagged: int
    scribbles: int
    clean_scribbles_flagged: int
    shifted_scribbles_flagged: int


def moved_box(box: np.ndarray, width: int) -> np.ndarray:
    """The XYXY box moved right by its width, or left when that leaves an image ``width``
    wide (clipped at the left edge)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 + (x1 - x0) <= width:
        return np.array([x1, y0, 2 * x1 - x0, y1], dtype=np.float32)
    return np.array([max(0.0, 2 * x0 - x1), y0, x0 if x0 > 0 else x1, y1], dtype=np.float32)


def run(cases: list[Case], repository: Path, seed: int = 0, scribble_shift: int = 8,
        thresholds: qc.QCThresholds = qc.QCThresholds()) -> QCRates:
    sam = pl.LiteMedSAM(repository)
    counts = np.zeros(6, dtype=int)
    for case in cases:
        labels = wl.simulate(case.case_id, case.mask, ("boxes", "scribbles"), seed)
        w = case.mask.shape[1]
        moved = np.stack([moved_box(b, w) for b in labels.boxes]) if len(labels.boxes) else labels.boxes
        both = np.concatenate([labels.boxes, moved])
        pseudo = pl.combine(case.case_id, case.mask.shape, both, sam.segment_boxes(case.image, both))
        flagged = {f.index for f in qc.check_boxes(case.case_id, both, pseudo, thresholds)}
        k = len(labels.boxes)
        counts[0] += k
        counts[1] += sum(i in flagged for i in range(k))
        counts[2] += sum(i in flagged for i in range(k, 2 * k))
        fg = np.where(labels.scribbles == 1, 1, -1).astype(np.int8)
        shifted = np.full_like(fg, -1)
        shifted[scribble_shift:] = fg[:-scribble_shift]
        strokes = len({f.index for f in qc.check_scribbles(case.case_id, case.image, fg, thresholds)})
        moved_strokes = len({f.index for f in qc.check_scribbles(case.case_id, case.image, shifted, thresholds)})
        from scipy import ndimage

        n = ndimage.label(fg == 1, structure=np.ones((3, 3), bool))[1]
        counts[3] += n
        counts[4] += strokes
        counts[5] += moved_strokes
    return QCRates(cases[0].structure if cases else "", *(int(c) for c in counts))
