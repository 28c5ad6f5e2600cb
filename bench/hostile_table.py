"""Hostile and heavy requests against one real gateway: status, kept serving, peak RSS delta, RSS after.

One gateway process (embedded backend, default settings, fp32 pinned so every row runs the same
model) on 127.0.0.1; before each case its peak RSS is reset (``/proc/PID/clear_refs`` = 5), then
the case is sent over gRPC, then ``VmHWM`` and ``VmRSS`` are read from ``/proc/PID/status`` and a
small normal Segment must still answer. Cases: one ``bomb`` of every codec kind of
:mod:`bench.fuzz_cases` (payloads that inflate far beyond what they declare), a DICOM whose
JPEG frame header says 60000 x 60000, a raw array over the pixel limit, an answer over the send
limit, and the worst admitted shape (40 megapixels, 32 boxes, PNG masks)::

    .venv/bin/python bench/hostile_table.py   # prints the table, writes bench/hostile_results.json
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fuzz_cases import KINDS, make_case  # noqa: E402
from bench.harness import GatewayProcess, ensure_models, proc_status, reset_peak  # noqa: E402
from bench.measure import machine  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc  # noqa: E402

MIB = 1 << 20
H, W = 5000, 8000


def encoded(data: bytes, boxes=((8, 8, 40, 40),)) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=pb.Image(encoded=data),
                             prompts=[pb.Prompt(box=pb.Box(x0=a, y0=b, x1=c, y1=d)) for a, b, c, d in boxes])


def raw(pixels: np.ndarray, boxes, encoding=pb.MASK_ENCODING_BITS) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=list(pixels.shape),
                                                            data=pixels.tobytes())),
                             prompts=[pb.Prompt(box=pb.Box(x0=a, y0=b, x1=c, y1=d)) for a, b, c, d in boxes],
                             encoding=encoding)


def sof_lie_dicom() -> bytes:
    """A 64x64 8-bit grey DICOM (JPEG baseline) whose one frame's SOF header says 60000x60000."""
    from pydicom.encaps import encapsulate  # noqa: PLC0415
    from pydicom.uid import JPEGBaseline8Bit  # noqa: PLC0415

    from bench.fuzz_cases import _dataset, _tiny_jpeg, _write  # noqa: PLC0415 - the campaign's builders

    frame = bytearray(_tiny_jpeg(False))
    sof = next(i for i in range(len(frame) - 1) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC1, 0xC2))
    frame[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    ds = _dataset(JPEGBaseline8Bit)
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return _write(ds)


def cases() -> list[tuple[str, pb.SegmentRequest]]:
    out = []
    for kind in KINDS:
        case = make_case(1, kind, "bomb")
        out.append((f"{kind} bomb ({len(case.data)} bytes in)", encoded(case.data)))
    out.append(("DICOM JPEG frame whose SOF says 60000x60000 (64x64 declared)", encoded(sof_lie_dicom())))
    out.append(("raw 10000x10000 uint8 (over --max-image-pixels)",
                raw(np.zeros((10000, 10000), np.uint8), [(0, 0, 100, 100)])))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    big = ((np.sin(xx / 300.0) + np.cos(yy / 200.0) + 2.0) * 60.0).astype(np.uint8)
    rng = np.random.default_rng(14)
    boxes = []
    for _ in range(32):
        x0, y0 = int(rng.integers(0, W - 2000)), int(rng.integers(0, H - 2000))
        boxes.append((x0, y0, x0 + int(rng.integers(200, 2000)), y0 + int(rng.integers(200, 2000))))
    out.append(("answer over the send limit (40 MP, 32 boxes, bit-packed = 160 MB)", raw(big, boxes)))
    out.append(("worst admitted shape: 40 MP, 32 boxes, PNG masks", raw(big, boxes, pb.MASK_ENCODING_PNG)))
    return out


def main() -> int:
    ensure_models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gateway = GatewayProcess(Path(tmp), "--backend", "embedded", "--default-model", "medsam_lite")
        with gateway.serving():
            pid = gateway.proc.pid
            options = [("grpc.max_send_message_length", 128 * MIB), ("grpc.max_receive_message_length", 128 * MIB)]
            with grpc.insecure_channel(gateway.target, options=options) as channel:
                stub = pb_grpc.SegmentationStub(channel)
                small = raw(np.tile(np.arange(64, dtype=np.uint8), (64, 1)), [(8, 8, 40, 40)])
                stub.Segment(small, timeout=60)
                baseline = proc_status(pid)["VmRSS"]
                for name, request in cases():
                    before = proc_status(pid)
                    if not reset_peak(pid):
                        raise SystemExit("cannot reset the gateway's peak RSS (/proc/PID/clear_refs)")
                    try:
                        stub.Segment(request, timeout=600)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    peak, after = proc_status(pid)["VmHWM"], proc_status(pid)["VmRSS"]
                    try:
                        serving = len(stub.Segment(small, timeout=60).masks) == 1
                    except grpc.RpcError:
                        serving = False
                    rows.append({"case": name, "status": code, "kept_serving": serving,
                                 "peak_rss_delta_mib": round((peak - before["VmRSS"]) / MIB, 1),
                                 "rss_after_vs_baseline_mib": round((after - baseline) / MIB, 1)})
                    print(rows[-1], flush=True)
    result = {"machine": machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python bench/hostile_table.py", "baseline_rss_mib": round(baseline / MIB), "rows": rows}
    (REPO / "bench" / "hostile_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| case | status | kept serving | peak RSS delta MiB | RSS after vs baseline MiB |\n|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['status']} | {'yes' if r['kept_serving'] else 'NO'} | "
              f"{r['peak_rss_delta_mib']:.0f} | {r['rss_after_vs_baseline_mib']:+.0f} |")
    return 0 if all(r["kept_serving"] and r["status"] != "INTERNAL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
