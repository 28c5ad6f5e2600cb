"""Volume pseudo-labels from one box (training/volume_pseudo_labels.py) measured on colin27_t1:
full propagation with 1 and 3 key slices on three compact structures; 3-D Dice against the
reference, the uncertain fraction (of all voxels and of label + reference), Dice on the certain
voxels, wall seconds (the 3-key run reuses the 1-key run's slice embeddings), QC drift flags.

Prints one JSON row per run and writes them to ``bench/volume_pseudo_labels.json``; the table in
docs/TRAINING.md ("Volume pseudo-labels from one box") is these rows::

    .venv/bin/python bench/volume_pseudo_labels.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.core.volume import VolumeSource, load_volume  # noqa: E402
from service.inference.predictor import SamPredictor  # noqa: E402
from service.inference.volume_predictor import VolumePredictor  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
CASE = SHARED / "volumes" / "colin27_t1"
STRUCTURES = ("thalamus_left", "putamen_right", "caudate_left")


def main() -> None:
    vol = load_volume(VolumeSource("nifti", data=(CASE / "image.nii.gz").read_bytes()))
    pred = SamPredictor.from_repository(REPO / "model_repository", "medsam_lite", threads=2)
    rows = []
    for s in STRUCTURES:
        refv = load_volume(VolumeSource("nifti", data=(CASE / "masks" / f"{s}.nii.gz").read_bytes()))
        ref = vpl.reference_slices(refv, vol)
        refg = vol.mask_array({k: ref[k] for k in range(len(ref)) if ref[k].any()}) > 0
        vp = VolumePredictor(pred, vol)   # fresh per structure: the 1-key run is cold
        for n in (1, 3):
            t = time.perf_counter()
            pl = vpl.volume_pseudo_label(vp, vol, refv, key_slices=n, name=s)
            wall = time.perf_counter() - t
            c = ~pl.uncertain
            row = dict(structure=s, key_slices=n, keys=list(pl.key_slices), dice=dice(pl.label > 0, refg),
                       uncertain=float(pl.uncertain.mean()),
                       unc_in_union=float(pl.uncertain[(pl.label > 0) | refg].mean()),
                       certain_dice=dice(pl.label[c] > 0, refg[c]), seconds=wall,
                       slices=[pl.records[0].slice_index, pl.records[-1].slice_index], ref=list(pl.reference_extent),
                       stops=[s_.reason for s_ in pl.stops], flags=len(vpl.drift_flags(pl, vol.depth)))
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(__file__).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
