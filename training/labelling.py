"""Steps shared by the CLI and the experiment: weak labels for a set of cases, pseudo-labels
with quality control, each cached in a folder (one ``.npz`` per case)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from training import pseudo_labels as pl
from training import qc
from training import weak_labels as wl
from training.data import Case

log = logging.getLogger(__name__)


def simulate_all(cases: list[Case], kinds: tuple[str, ...], seed: int, box_noise: float = 0.1,
                 folder: Path | None = None) -> dict[str, wl.WeakLabels]:
    """Simulated weak labels of every case (written to ``folder`` when given)."""
    out = {}
    for case in cases:
        labels = wl.simulate(case.case_id, case.mask, kinds, seed, box_noise)
        if folder is not None:
            wl.save(labels, folder)
        out[case.case_id] = labels
    return out


def load_all(cases: list[Case], folder: Path) -> dict[str, wl.WeakLabels]:
    """Weak labels saved by :func:`training.weak_labels.save` (cases without a file are skipped)."""
    return {c.case_id: wl.load(folder, c.case_id) for c in cases if (Path(folder) / f"{c.case_id}.npz").is_file()}


def pseudo_label_all(cases: list[Case], weak: dict[str, wl.WeakLabels], repository: Path, out: Path,
                     thresholds: qc.QCThresholds = qc.QCThresholds(), threads: int = 2,
                     reuse: bool = True) -> tuple[dict[str, pl.PseudoLabel], list[qc.CaseQC]]:
    """LiteMedSAM inside every box, QC of boxes and scribbles, pseudo-labels saved to ``out``
    and the QC report to ``out/qc`` (rejected boxes become uncertain)."""
    sam = None
    labels, results, pictures = {}, [], {}
    for case in cases:
        w = weak.get(case.case_id)
        if w is None or w.boxes is None:
            continue
        cached = out / f"{case.case_id}.npz"
        if reuse and cached.is_file():
            pseudo = pl.load(out, case.case_id)
            flags = qc.check_boxes(case.case_id, w.boxes, pseudo, thresholds)
        else:
            if sam is None:
                sam = pl.LiteMedSAM(repository, threads=threads)
            answers = sam.segment_boxes(case.image, w.boxes)
            raw = pl.combine(case.case_id, case.mask.shape, w.boxes, answers)
            flags = qc.check_boxes(case.case_id, w.boxes, raw, thresholds)
            rejected = np.zeros(len(w.boxes), bool)
            rejected[[f.index for f in flags]] = True
            pseudo = pl.combine(case.case_id, case.mask.shape, w.boxes, answers, rejected)
            pl.save(pseudo, out)
        if w.scribbles is not None:
            flags += qc.check_scribbles(case.case_id, case.image, w.scribbles, thresholds)
        result = qc.CaseQC(case.case_id, flags)
        if flags:
            pictures[case.case_id] = qc.overlay(case.image, w.boxes, pseudo.prob > 0.5, w.scribbles)
        labels[case.case_id] = pseudo
        results.append(result)
    qc.write_report(results, out / "qc", pictures, thresholds)
    return labels, results


def pseudo_dice(cases: list[Case], pseudo: dict[str, pl.PseudoLabel]) -> float:
    """Mean Dice of the certain-foreground pseudo-labels against the references."""
    values = []
    for case in cases:
        p = pseudo.get(case.case_id)
        if p is None:
            continue
        fg = p.labels == 1
        denom = fg.sum() + case.mask.sum()
        values.append(1.0 if denom == 0 else 2.0 * (fg & case.mask).sum() / denom)
    return float(np.mean(values)) if values else float("nan")
