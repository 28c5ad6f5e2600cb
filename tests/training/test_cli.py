"""The CLI glue: simulate and import write weak labels that train reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the training extra (requirements/training.txt) is not installed")

from training import weak_labels as wl  # noqa: E402
from training.cli import main  # noqa: E402

from .helpers import synthetic_case  # noqa: E402


@pytest.fixture()
def npz_folder(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(2):
        case = synthetic_case(f"c{i}", seed=i)
        np.savez_compressed(folder / f"c{i}.npz", image=case.image, mask=case.mask.astype(np.uint8),
                            meta=np.array(json.dumps({**case.meta, "dev_slice_gap": 5})))
    return folder


def test_simulate_writes_seeded_labels_for_every_case(npz_folder, tmp_path):
    out = tmp_path / "weak"
    assert main(["simulate", "--data", str(npz_folder), "--out", str(out), "--seed", "4"]) == 0
    labels = wl.load(out, "c1")
    assert np.array_equal(labels.scribbles, wl.simulate("c1", synthetic_case("c1", 1).mask, seed=4).scribbles)
    assert json.loads((out / "simulation.json").read_text())["cases"] == 2


def test_import_reads_coco_boxes_and_scribble_pngs(npz_folder, tmp_path):
    from PIL import Image

    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "c0.png", "height": 64, "width": 80}],
                                "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 21, 21]}]}))
    pngs = tmp_path / "scribbles"
    pngs.mkdir()
    values = np.zeros((64, 80), np.uint8)
    values[20, 15:25] = 2
    Image.fromarray(values).save(pngs / "c0.png")
    out = tmp_path / "weak"
    assert main(["import", "--data", str(npz_folder), "--coco", str(coco), "--scribbles", str(pngs),
                 "--out", str(out)]) == 0
    labels = wl.load(out, "c0")
    assert labels.boxes.tolist() == [[10.0, 10.0, 31.0, 31.0]] and (labels.scribbles == 1).sum() == 10
    assert wl.load(out, "c1").boxes is None  # not in the COCO file: not annotated
