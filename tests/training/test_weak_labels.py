"""Simulated weak labels are seeded, deterministic and respect their definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the training extra (requirements/training.txt) is not installed")

from training import weak_labels as wl  # noqa: E402

from .helpers import two_blobs  # noqa: E402


def test_tight_boxes_contain_each_component_exactly():
    mask = two_blobs()
    boxes = wl.tight_boxes(mask)
    assert sorted(boxes.tolist()) == [[10.0, 10.0, 31.0, 31.0], [45.0, 30.0, 70.0, 52.0]]
    covered = np.zeros_like(mask)
    for x0, y0, x1, y1 in boxes.astype(int):
        covered[y0:y1, x0:x1] = True
    assert not (mask & ~covered).any()


def test_noisy_boxes_move_sides_by_at_most_the_noise():
    mask = two_blobs()
    tight = wl.tight_boxes(mask)
    noisy = wl.noisy_boxes(mask, np.random.default_rng(3), noise=0.2)
    size = np.concatenate([tight[:, 2:] - tight[:, :2]] * 2, axis=1)
    assert noisy.shape == tight.shape
    assert (np.abs(noisy - tight) <= 0.2 * size + 1e-4).all()
    assert not np.allclose(noisy, tight)


def test_simulation_is_deterministic_per_seed_and_case():
    mask = two_blobs()
    a = wl.simulate("case_a", mask, seed=7)
    b = wl.simulate("case_a", mask, seed=7)
    c = wl.simulate("case_a", mask, seed=8)
    for name in ("boxes", "scribbles", "points", "point_labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.scribbles, c.scribbles) or not np.array_equal(a.points, c.points)


def test_scribbles_are_inside_for_foreground_and_outside_for_background():
    mask = two_blobs()
    s = wl.scribbles(mask, np.random.default_rng(0))
    assert (s == 1).any() and (s == 0).any()
    assert mask[s == 1].all()
    assert not mask[s == 0].any()
    assert set(np.unique(s)) <= {-1, 0, 1}


def test_points_fall_inside_and_outside_the_mask():
    mask = two_blobs()
    pts, labels = wl.points(mask, np.random.default_rng(0), n_positive=4, n_negative=5)
    assert labels.tolist().count(1) == 4 and labels.tolist().count(0) == 5
    cols, rows = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    assert mask[rows[labels == 1], cols[labels == 1]].all()
    assert not mask[rows[labels == 0], cols[labels == 0]].any()


def test_presence_label_follows_the_mask():
    assert wl.simulate("x", two_blobs()).present is True
    empty = wl.simulate("y", np.zeros((20, 20), bool))
    assert empty.present is False and empty.boxes.shape == (0, 4) and not (empty.scribbles == 1).any()


def test_saved_labels_read_back_identical(tmp_path):
    labels = wl.simulate("case_b", two_blobs(), seed=1)
    wl.save(labels, tmp_path)
    back = wl.load(tmp_path, "case_b")
    assert back.shape == labels.shape and back.present == labels.present
    for name in ("boxes", "scribbles", "points", "point_labels"):
        assert np.array_equal(getattr(back, name), getattr(labels, name))


def test_coco_json_gives_boxes_and_signed_points(tmp_path):
    doc = {"images": [{"id": 3, "file_name": "case_c.png", "height": 40, "width": 50}],
           "annotations": [{"id": 1, "image_id": 3, "bbox": [5, 6, 10, 20]},
                           {"id": 2, "image_id": 3, "keypoints": [12.5, 14.5, 2, 0, 0, 0],
                            "points": [[1.5, 1.5, 0]]}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    labels = wl.load_coco(path, {})["case_c"]
    assert labels.shape == (40, 50)
    assert labels.boxes.tolist() == [[5.0, 6.0, 15.0, 26.0]]
    assert labels.points.tolist() == [[12.5, 14.5], [1.5, 1.5]] and labels.point_labels.tolist() == [1, 0]


def test_scribble_png_maps_label_values(tmp_path):
    from PIL import Image

    values = np.zeros((4, 5), np.uint8)
    values[0, :2] = 2
    values[3, 3:] = 1
    Image.fromarray(values).save(tmp_path / "s.png")
    s = wl.load_scribble_png(tmp_path / "s.png")
    assert s[0, 0] == 1 and s[3, 4] == 0 and s[1, 1] == -1
