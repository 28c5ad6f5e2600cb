"""Quality control flags weak annotations that disagree with the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the training extra (requirements/training.txt) is not installed")

from training import pseudo_labels as pl  # noqa: E402
from training import qc  # noqa: E402
from training.data import load_npz_folder  # noqa: E402
from training.weak_labels import tight_boxes  # noqa: E402

from .helpers import synthetic_case  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def fake_answer(mask: np.ndarray, iou: float) -> pl.BoxMask:
    return pl.BoxMask(np.where(mask, 10.0, -10.0).astype(np.float32), iou)


def test_box_fitting_its_pseudo_mask_is_not_flagged_but_a_wrong_box_is():
    case = synthetic_case()
    good = tight_boxes(case.mask)
    wrong = np.array([[0.0, 50.0, 30.0, 64.0]], np.float32)  # background corner
    boxes = np.concatenate([good, wrong])
    answers = [fake_answer(case.mask & pl.box_region(b, case.mask.shape), 0.9) for b in good]
    answers.append(fake_answer(np.zeros_like(case.mask), 0.1))
    pseudo = pl.combine(case.case_id, case.mask.shape, boxes, answers)
    flags = qc.check_boxes(case.case_id, boxes, pseudo)
    assert {f.index for f in flags} == {len(good)}
    assert {f.check for f in flags} == {"empty_pseudo_mask"}


def test_box_much_larger_than_its_object_is_flagged_as_mismatch():
    case = synthetic_case()
    box = np.array([[0.0, 0.0, 80.0, 64.0]], np.float32)  # whole image around a small disk
    disk = case.mask.copy()
    disk[:, 35:] = False
    pseudo = pl.combine(case.case_id, case.mask.shape, box, [fake_answer(disk, 0.9)])
    (flag,) = qc.check_boxes(case.case_id, box, pseudo)
    assert flag.check == "box_mismatch" and flag.value < 0.5


def test_rejected_boxes_become_uncertain_in_the_pseudo_label():
    case = synthetic_case()
    boxes = tight_boxes(case.mask)
    answers = [fake_answer(case.mask & pl.box_region(b, case.mask.shape), 0.9) for b in boxes]
    pseudo = pl.combine(case.case_id, case.mask.shape, boxes, answers, rejected=np.array([True, False]))
    inside_first = pl.box_region(boxes[0], case.mask.shape)
    assert (pseudo.labels[inside_first] == -1).all()
    assert (pseudo.labels[~inside_first & case.mask] == 1).all()


def test_scribble_crossing_into_another_tissue_is_flagged():
    image = np.full((40, 60), 50, np.uint8)
    image[:, 30:] = 200
    scribbles = np.full(image.shape, -1, np.int8)
    scribbles[10, 5:25] = 1      # stays in the dark half
    scribbles[30, 10:50] = 1     # crosses the edge at column 30
    flags = qc.check_scribbles("s", image, scribbles)
    assert [(f.check, f.index) for f in flags] == [("scribble_crosses_edge", 1)]


def test_report_lists_flags_and_writes_pictures(tmp_path):
    case = synthetic_case()
    flag = qc.Flag(case.case_id, "box_mismatch", 0, 0.2, 0.5, "detail")
    pictures = {case.case_id: qc.overlay(case.image, tight_boxes(case.mask), case.mask, None)}
    report = qc.write_report([qc.CaseQC(case.case_id, [flag]), qc.CaseQC("ok_case")], tmp_path, pictures)
    text = report.read_text()
    assert "1 of 2 cases flagged" in text and "box_mismatch" in text
    assert (tmp_path / f"{case.case_id}.png").is_file() and (tmp_path / "qc.json").is_file()


@pytest.mark.slow
def test_litemedsam_flags_a_deliberately_wrong_box_on_a_real_case(shared_data):
    if not (REPOSITORY / "medsam_lite_encoder" / "1" / "model.onnx").is_file():
        pytest.skip("LiteMedSAM ONNX files missing: run `python -m export medsam_lite --check-cases 0`")
    case = next(c for c in load_npz_folder(shared_data / "dev") if c.structure == "brain")
    good = tight_boxes(case.mask)[:1]
    h, w = case.mask.shape
    wrong = np.array([[0.0, 0.0, w * 0.9, 12.0]], np.float32)  # a strip of background along the top
    boxes = np.concatenate([good, wrong])
    sam = pl.LiteMedSAM(REPOSITORY)
    pseudo = pl.combine(case.case_id, case.mask.shape, boxes, sam.segment_boxes(case.image, boxes))
    flagged = {f.index for f in qc.check_boxes(case.case_id, boxes, pseudo)}
    assert 1 in flagged and 0 not in flagged


def test_benchmark_moves_boxes_off_their_object_inside_the_image():
    from training.qc_benchmark import moved_box

    assert moved_box(np.array([10, 0, 30, 10]), 100).tolist() == [30, 0, 50, 10]
    assert moved_box(np.array([60, 0, 90, 10]), 100).tolist() == [30, 0, 60, 10]
