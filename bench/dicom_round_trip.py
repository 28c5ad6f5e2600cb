"""The DICOM round trip against segmenting alone, side by side in one run, and the SEG writing
time; writes ``docs/DICOM_ROUND_TRIP.md``.

A real Orthanc (bench/orthanc.py: DICOMweb, authentication on) gets the 108-file CT series of
``../shared/data/volumes/dicom`` by STOW-RS; one real gateway (``--pacs-url`` to it) then, for
each round, in this order:

* **segment alone**: the series uploaded once beforehand (UploadVolume, not timed), one box
  on slice 54 through ``SegmentVolume`` (propagated through the whole series);
* **upload + segment + SEG**: what a client without a PACS link does: UploadVolume of the 108
  files, SegmentVolume, GetSegmentMask with the SEG;
* **round trip**: ``SegmentStudy`` by the series' UIDs with ``store``: WADO-RS retrieve,
  decode, the same segmentation, the SEG written and stored back by STOW-RS (its own per-step
  timings are reported too).

Medians over ``--rounds`` (default 3) of each, wall-clock seen by the client. Plus the SEG
writer alone (bench/seg_bench.py: the 'head' reference of all 108 slices). Run on a quiet
machine::

    .venv/bin/python bench/dicom_round_trip.py [--rounds 3] [--out docs/DICOM_ROUND_TRIP.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import nibabel as nib  # noqa: E402
import pydicom  # noqa: E402

from bench import measure  # noqa: E402
from bench.harness import GatewayProcess, ensure_models  # noqa: E402
from bench.orthanc import OrthancProcess  # noqa: E402
from bench.seg_bench import HEAD, SERIES, time_seg  # noqa: E402
from medseg_client import SegmentationClient  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402
from medseg_client._generated import volumes_pb2 as vpb  # noqa: E402
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc  # noqa: E402

SLICE = 54


def head_box() -> tuple[float, float, float, float]:
    head = np.asarray(nib.load(HEAD).dataobj)
    mask = head[::-1, ::-1, SLICE].T > 0      # file SLICE+1's own rows/columns (dicom/index.json)
    rows, cols = np.nonzero(mask)
    return (max(0, cols.min() - 3), max(0, rows.min() - 3), cols.max() + 4, rows.max() + 4)


def run(rounds: int, out: Path) -> dict:
    files = sorted(SERIES.glob("*.dcm"))
    first = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    box = head_box()
    pbox = pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3])
    ensure_models()
    rows: dict[str, list[float]] = {"segment": [], "upload_segment_seg": [], "round_trip": []}
    steps: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, OrthancProcess(Path(tmp)) as pacs:
        start = time.perf_counter()
        pacs.stow(files)
        stow_s = time.perf_counter() - start
        gw = GatewayProcess(Path(tmp), "--backend", "embedded", "--pacs-url", pacs.url, "--pacs-username",
                            pacs.username, "--pacs-password-file", str(pacs.password_file))
        try:
            gw.start().wait_serving()
            with SegmentationClient(gw.target, timeout=600, max_message_mb=64) as client, \
                    grpc.insecure_channel(gw.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                volumes = vpb_grpc.VolumesStub(ch)
                model = next(m.name for m in client.list_models() if m.is_default)
                kept = client.upload_volume(SERIES)
                slices = 0
                for _ in range(rounds):
                    t = time.perf_counter()
                    stream = client.segment_volume(kept.volume_id, slice_index=SLICE, box=box)
                    for _ in stream:
                        pass
                    rows["segment"].append(time.perf_counter() - t)
                    slices = stream.summary.last_slice - stream.summary.first_slice + 1

                    t = time.perf_counter()
                    info = client.upload_volume(SERIES)
                    stream = client.segment_volume(info.volume_id, slice_index=SLICE, box=box)
                    for _ in stream:
                        pass
                    volumes.GetSegmentMask(vpb.GetSegmentMaskRequest(
                        volume_id=info.volume_id, segment_id=stream.summary.segment_id, dicom_seg=True), timeout=600)
                    rows["upload_segment_seg"].append(time.perf_counter() - t)
                    client.delete_volume(info.volume_id)

                    t = time.perf_counter()
                    answer = volumes.SegmentStudy(vpb.SegmentStudyRequest(
                        study_instance_uid=study, series_instance_uid=series, slice_index=SLICE, box=pbox,
                        store=True), timeout=600)
                    rows["round_trip"].append(time.perf_counter() - t)
                    assert answer.stored
                    steps.append(dict(answer.timings_ms))
                client.delete_volume(kept.volume_id)
        finally:
            gw.stop()
    seg = time_seg(3)
    results = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": measure.machine(),
               "command": "python bench/dicom_round_trip.py " + " ".join(sys.argv[1:]), "model": model,
               "rounds": rounds, "slices_segmented": slices, "stow_setup_s": stow_s,
               "median_s": {k: statistics.median(v) for k, v in rows.items()}, "runs_s": rows,
               "round_trip_steps_ms": {k: statistics.median(s[k] for s in steps) for k in steps[0]}, "seg_writer": seg}
    out.write_text(render(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def render(r: dict) -> str:
    m, steps, seg = r["median_s"], r["round_trip_steps_ms"], r["seg_writer"]
    base = m["segment"]
    lines = [
        "# DICOM round trip: WADO-RS + segment + SEG + STOW-RS, against segmenting alone", "",
        f"Machine: {r['machine']}. Date: {r['date']}. Command: `{r['command']}`. Model: the gateway's default "
        f"(`{r['model']}`). One box on slice {SLICE} of the 108-slice CT series "
        f"(`../shared/data/volumes/dicom/promed_ct_0051`), propagated over {r['slices_segmented']} slices; a real "
        "Orthanc 1.10 (DICOMweb plugin, basic authentication) on loopback; medians of "
        f"{r['rounds']} rounds, the three calls one after another in each round (side by side), wall-clock as "
        "the client sees it.", "",
        "| call | median s | runs (s) | vs segment alone |", "|---|---|---|---|",
    ]
    names = {"segment": "SegmentVolume on an uploaded volume (segment alone)",
             "upload_segment_seg": "UploadVolume (108 files) + SegmentVolume + GetSegmentMask(dicom_seg)",
             "round_trip": "SegmentStudy: WADO-RS + decode + segment + SEG + STOW-RS"}
    for key, name in names.items():
        runs = ", ".join(f"{v:.2f}" for v in r["runs_s"][key])
        lines.append(f"| {name} | {m[key]:.2f} | {runs} | {m[key] / base:.2f}x |")
    order = [k for k in ("retrieve", "decode", "segment", "write_seg", "store", "total") if k in steps]
    dicom_ms = sum(steps.get(k, 0.0) for k in ("retrieve", "decode", "write_seg", "store"))
    lines += ["", "SegmentStudy's own steps (median ms, from its answer's timings_ms):", "",
              "| " + " | ".join(order) + " |", "|" + "---|" * len(order),
              "| " + " | ".join(f"{steps[k]:.0f}" for k in order) + " |", "",
              f"The DICOM steps of the round trip (retrieve + decode + write_seg + store) take {dicom_ms:.0f} ms, "
              f"{100 * dicom_ms / steps['segment']:.1f}% of its segment step: the model's slices dominate, and the "
              "run-to-run spread of segmenting is larger than the whole PACS exchange.", "",
              f"The DICOM SEG writer alone (`bench/seg_bench.py`, the 'head' reference of all {seg['slices']} slices, "
              f"{seg['frames']} non-empty frames, {seg['voxels']} voxels, {seg['bytes']} bytes, BINARY): "
              f"**{seg['seg_s']:.3f} s** median of {len(seg['runs'])} "
              f"({seg['with_headers_s']:.3f} s with the kept headers parsed first).", "",
              f"Setting up: STOW-RS of the 108 files into Orthanc by the benchmark took {r['stow_setup_s']:.2f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "DICOM_ROUND_TRIP.md")
    parser.add_argument("--render", action="store_true", help="only re-render the report from its .json")
    args = parser.parse_args()
    if args.render:
        text = render(json.loads(args.out.with_suffix(".json").read_text()))
        args.out.write_text(text)
        print(text)
        return 0
    print(render(run(args.rounds, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
