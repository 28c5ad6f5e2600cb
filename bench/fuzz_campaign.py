"""Fuzzing campaign of the image decoders: compressed DICOM (RLE, JPEG, JPEG-LS, JPEG 2000:
the pylibjpeg/pyjpegls paths), deflated DICOM, TIFF (tifffile and Pillow codecs), PNG, JPEG
and NIfTI, valid and mutated (bench/fuzz_cases.py), in process and, for a share of the cases,
over real gRPC to a real gateway.

    .venv/bin/python bench/fuzz_campaign.py --cases 12000 --wire-share 0.05

In process every case goes through ``decode_image`` with small limits; its outcome is OK, a
client-error status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) or a failure: INTERNAL (any other
exception, a domain error mapping to another status, or an OK image breaking the output
contract), MEMORY (MemoryError, or a peak RSS over ``--max-case-mib`` above the process's
RSS before the case, measured as VmHWM after resetting it through /proc/self/clear_refs),
SLOW (over ``--max-case-s``). Wire cases are sent as Segment requests to a gateway started
with the same limits (``bench.harness.GatewayProcess``), with a box far outside any image so
that an image that decodes is refused by the prompt check before the encoder runs (plus a few
with a real box, answered with masks); the wire outcome must be the in-process one. The run
fails (exit 1) on any failure, on an INTERNAL/UNKNOWN over the wire, on a traceback in the
gateway's log, or when no case of some kind decoded. Counts go to bench/fuzz_results.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.fuzz_cases import KINDS, MUTATIONS, make_case  # noqa: E402
from service.core.domain import ImageInput, ImageLimits  # noqa: E402
from service.core.errors import ServiceError  # noqa: E402
from service.core.imageio import decode_image, estimate_decode_bytes  # noqa: E402

LIMITS = ImageLimits(max_side=1024, max_pixels=512 * 512, max_encoded_bytes=2 * 1024 * 1024)
CLIENT = {"InvalidArgument": "INVALID_ARGUMENT", "ResourceExhausted": "RESOURCE_EXHAUSTED"}
FAILURES = ("INTERNAL", "MEMORY", "SLOW")


def _status(exc: ServiceError) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in CLIENT:
            return CLIENT[cls.__name__]
    return "INTERNAL"


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_case(data: bytes) -> tuple[str, str, int, float, int | None]:
    """(outcome, detail, peak RSS delta, seconds, estimate) of decoding ``data``."""
    _reset_peak()
    before, _ = _rss()
    start = time.perf_counter()
    estimate = None
    try:
        try:
            estimate = int(estimate_decode_bytes(ImageInput(encoded=data), LIMITS))
        except ServiceError:
            pass
        image = decode_image(ImageInput(encoded=data), LIMITS)
        pixels = image.pixels
        ok = (pixels.dtype == np.float32 and pixels.ndim in (2, 3) and (pixels.ndim == 2 or pixels.shape[2] == 3)
              and pixels.flags.c_contiguous and np.isfinite(pixels).all()
              and (pixels.size == 0 or (pixels.min() >= 0 and pixels.max() <= 1))
              and max(pixels.shape[:2]) <= LIMITS.max_side and pixels.shape[0] * pixels.shape[1] <= LIMITS.max_pixels)
        outcome, detail = ("OK", "") if ok else ("INTERNAL", f"output contract: {pixels.dtype} {pixels.shape}")
    except MemoryError:
        outcome, detail = "MEMORY", "MemoryError"
    except ServiceError as exc:
        outcome, detail = _status(exc), exc.message
    except Exception as exc:  # noqa: BLE001 - a bug: counted and reported
        outcome, detail = "INTERNAL", f"{type(exc).__name__}: {exc}"[:300]
    seconds = time.perf_counter() - start
    _, peak = _rss()
    return outcome, detail, max(0, peak - before), seconds, estimate


def in_process(cases: int, seed: int, max_case_mib: int, max_case_s: float, report_every: int):
    counts: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failures, worst, messages = [], [], collections.Counter()
    under_estimated = 0
    started = time.monotonic()
    for i in range(cases):
        case = make_case(seed + i)
        outcome, detail, peak, seconds, estimate = run_case(case.data)
        if outcome not in FAILURES and peak > max_case_mib << 20:
            outcome, detail = "MEMORY", f"peak {peak >> 20} MiB over {max_case_mib} MiB"
        if outcome not in FAILURES and seconds > max_case_s:
            outcome, detail = "SLOW", f"{seconds:.1f} s"
        if outcome == "OK" and estimate is not None and peak > estimate + (32 << 20):
            under_estimated += 1
        counts[outcome] += 1
        by_kind[case.kind][outcome] += 1
        by_mutation[case.mutation][outcome] += 1
        if outcome not in ("OK",) and detail:
            messages[detail if len(detail) < 90 else detail[:90] + "..."] += 1
        worst.append((peak, case.seed, case.kind, case.mutation, outcome, round(seconds, 3)))
        worst = sorted(worst, reverse=True)[:10]
        if outcome in FAILURES:
            failures.append({"seed": case.seed, "kind": case.kind, "mutation": case.mutation, "outcome": outcome,
                             "detail": detail, "bytes": len(case.data)})
        if report_every and (i + 1) % report_every == 0:
            print(f"  {i + 1}/{cases} cases, {time.monotonic() - started:.0f} s: {dict(counts)}", flush=True)
    return {
        "cases": cases, "seconds": round(time.monotonic() - started, 1), "outcomes": dict(counts),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
        "peak_rss_top": [{"peak_mib": round(p / 2**20, 1), "seed": s, "kind": k, "mutation": m, "outcome": o,
                          "seconds": t} for p, s, k, m, o, t in worst],
        "ok_cases_over_estimate_32mib": under_estimated,
        "top_messages": dict(messages.most_common(25)),
        "failures": failures[:50],
    }


def over_the_wire(cases: int, seed: int, real_boxes: int) -> dict:
    """Send ``cases`` fuzz images to a real gateway; compare each status with in process."""
    import grpc

    from bench.harness import GatewayProcess, ensure_models
    from medseg_client._generated import segmentation_pb2 as pb

    ensure_models()
    counts: collections.Counter[str] = collections.Counter()
    mismatches, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        gateway = GatewayProcess(Path(tmp), "--backend", "embedded", "--max-image-side", str(LIMITS.max_side),
                                 "--max-image-pixels", str(LIMITS.max_pixels),
                                 "--max-request-bytes", str(LIMITS.max_encoded_bytes + 65536))
        try:
            gateway.start().wait_serving()
            channel = grpc.insecure_channel(gateway.target, options=[("grpc.max_receive_message_length", 64 << 20)])
            segment = channel.unary_unary("/medseg.v1.Segmentation/Segment",
                                          request_serializer=pb.SegmentRequest.SerializeToString,
                                          response_deserializer=pb.SegmentResponse.FromString)
            sent_real = 0
            for i in range(cases):
                case = make_case(seed + i)
                local, _, _, _, _ = run_case(case.data)
                real = local == "OK" and sent_real < real_boxes
                box = pb.Box(x0=0, y0=0, x1=1, y1=1) if real else pb.Box(x0=1e6, y0=1e6, x1=1e6 + 5, y1=1e6 + 5)
                request = pb.SegmentRequest(image=pb.Image(encoded=case.data), prompts=[pb.Prompt(box=box)])
                try:
                    segment(request, timeout=60)
                    code, message = "OK", ""
                except grpc.RpcError as exc:
                    code, message = exc.code().name, exc.details() or ""
                sent_real += real
                if local == "OK" and not real:  # decoded, then refused by the prompt check
                    expected = code == "INVALID_ARGUMENT" and "outside" in message
                    counts["decoded (prompt refused)" if expected else code] += 1
                else:
                    expected = code == ("OK" if real else local)
                    counts["OK (masks)" if real and code == "OK" else code] += 1
                if code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    failures.append({"seed": case.seed, "kind": case.kind, "mutation": case.mutation, "code": code})
                elif not expected:
                    mismatches.append({"seed": case.seed, "kind": case.kind, "local": local, "wire": code,
                                       "message": message[:200]})
            channel.close()
            serving = gateway.proc.poll() is None and gateway.health() == 1
            log = gateway.log()
        finally:
            gateway.stop()
    return {"cases": cases, "statuses": dict(counts), "real_box_calls": sent_real, "failures": failures,
            "mismatches_with_in_process": mismatches[:20], "mismatch_count": len(mismatches),
            "still_serving": serving, "traceback_in_log": "Traceback" in log,
            "internal_in_audit": '"status": "INTERNAL"' in log or '"status": "UNKNOWN"' in log}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12000, help="in-process cases")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--wire-share", type=float, default=0.05, help="share of the cases also sent over gRPC")
    parser.add_argument("--real-boxes", type=int, default=20, help="wire cases answered with masks (encoder runs)")
    parser.add_argument("--max-case-mib", type=int, default=200)
    parser.add_argument("--max-case-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "fuzz_results.json")
    args = parser.parse_args(argv)
    print(f"in process: {args.cases} cases", flush=True)
    local = in_process(args.cases, args.seed, args.max_case_mib, args.max_case_s, max(1, args.cases // 10))
    wire_cases = int(args.cases * args.wire_share)
    wire = None
    if wire_cases:
        print(f"over the wire: {wire_cases} cases", flush=True)
        wire = over_the_wire(wire_cases, args.seed, args.real_boxes)
    ok_kinds = {kind: counts.get("OK", 0) for kind, counts in local["by_kind"].items()}
    problems = [f"{local['outcomes'].get(f, 0)} {f}" for f in FAILURES if local["outcomes"].get(f)]
    problems += [f"no {kind} case decoded" for kind in KINDS if not ok_kinds.get(kind)]
    if wire is not None:
        problems += [f"{len(wire['failures'])} server errors over the wire"] if wire["failures"] else []
        problems += ["gateway not serving after the run"] if not wire["still_serving"] else []
        problems += ["traceback in the gateway log"] if wire["traceback_in_log"] else []
        problems += ["INTERNAL in the audit log"] if wire["internal_in_audit"] else []
        problems += [f"{wire['mismatch_count']} wire statuses differ from in process"] if wire["mismatch_count"] else []
    result = {
        "measured": dt.date.today().isoformat(),
        "command": "bench/fuzz_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "limits": {"max_side": LIMITS.max_side, "max_pixels": LIMITS.max_pixels,
                   "max_encoded_bytes": LIMITS.max_encoded_bytes},
        "kinds": list(KINDS), "mutations": list(MUTATIONS),
        "in_process": local, "wire": wire, "problems": problems, "passed": not problems,
        "cpu": os.cpu_count(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"outcomes": local["outcomes"], "wire": wire and wire["statuses"], "problems": problems},
                     indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
