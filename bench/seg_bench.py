"""Time to write one DICOM SEG of the whole real CT series (service/core/dicom_seg.py).

The 108-file series ``../shared/data/volumes/dicom/promed_ct_0051`` is loaded as a volume
(service.core.volume), and the 'head' reference mask (``promed_ct_0051/masks/head.nii.gz``,
through the documented voxel mapping: file k+1's pixel (r, c) is voxel (nx-1-c, ny-1-r, k);
106 of the 108 slices hold foreground, 2.3 M voxels) is written as one BINARY SEG with
:func:`write_seg`, three times; the median seconds are printed, for the SEG alone and for
:meth:`Volume.dicom_headers` (parsing the kept headers) + the SEG, and the SEG's size.
``--kind labelmap`` times a LABELMAP SEG instead::

    .venv/bin/python bench/seg_bench.py [--kind binary|labelmap] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.core.dicom_seg import Algorithm, SegmentSpec, write_seg  # noqa: E402
from service.core.volume import VolumeSource, load_volume  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
SERIES = SHARED / "volumes" / "dicom" / "promed_ct_0051"
HEAD = SHARED / "volumes" / "promed_ct_0051" / "masks" / "head.nii.gz"


def time_seg(runs: int = 3, kind: str = "binary") -> dict:
    """Median seconds of writing the 'head' SEG of the whole CT series (and with the kept
    headers parsed first), the SEG's bytes, frames and voxels."""
    files = tuple(p.read_bytes() for p in sorted(SERIES.glob("*.dcm")))
    volume = load_volume(VolumeSource(format="dicom_series", files=files))
    head = np.asarray(nib.load(HEAD).dataobj)
    masks = {k: np.ascontiguousarray(head[::-1, ::-1, k].T != 0) for k in range(head.shape[2])}
    segments, algorithm = [SegmentSpec("head")], Algorithm("LiteMedSAM", "1.0.0")
    seg_only, with_headers, size = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        headers = volume.dicom_headers()
        parsed = time.perf_counter()
        data = write_seg(headers, masks, segments, algorithm, kind=kind)
        done = time.perf_counter()
        seg_only.append(done - parsed)
        with_headers.append(done - start)
        size = len(data)
    return {"kind": kind, "slices": len(files), "frames": sum(1 for m in masks.values() if m.any()),
            "voxels": sum(int(m.sum()) for m in masks.values()), "bytes": size, "runs": seg_only,
            "seg_s": statistics.median(seg_only), "with_headers_s": statistics.median(with_headers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("binary", "labelmap"), default="binary")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    r = time_seg(args.runs, args.kind)
    print(f"DICOM SEG ({r['kind']}) of {r['slices']} CT slices, 'head' reference ({r['frames']} non-empty frames, "
          f"{r['voxels']} voxels), {r['bytes']} bytes")
    print(f"write_seg: median {r['seg_s']:.3f} s of {args.runs} ({', '.join(f'{t:.3f}' for t in r['runs'])})")
    print(f"dicom_headers + write_seg: median {r['with_headers_s']:.3f} s")


if __name__ == "__main__":
    main()
