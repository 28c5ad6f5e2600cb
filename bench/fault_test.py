"""Fault test on loopback: tritonserver is killed (SIGKILL) and restarted on the same ports
-- or hangs (SIGSTOP, later SIGCONT) -- while a gateway in front of it is under load.

1. A real tritonserver (nvidia-pytriton wheel) and a gateway ``--backend triton`` with the
   embedding cache off (every call runs Triton's encoder and decoder).
2. Reference masks: each of a few real dev-set images (with its reference box) is segmented
   once, before any fault.
3. Open-loop load at ``--rate`` calls/s for ``--duration`` seconds cycling over those images;
   at ``--kill-at`` seconds tritonserver is SIGKILLed and immediately restarted (``--scenario
   kill``), or stopped for ``--hang-s`` seconds (``--scenario hang``); a thread polls the
   gateway's health every 50 ms.
4. Reported: calls by status; time from the kill to the first UNAVAILABLE and to health
   NOT_SERVING (detection); Triton's own restart time; time to health SERVING and to the
   first OK call after the restart (recovery); and every OK mask compared with its image's
   reference (a "wrong mask" is IoU < 0.99 -- there must be none)::

    .venv/bin/python bench/fault_test.py                      # writes docs/RELIABILITY.md
    .venv/bin/python bench/fault_test.py --scenario hang      # likewise, its own section
    .venv/bin/python bench/fault_test.py --duration 25 --kill-at 8 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from grpc_health.v1 import health_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import GatewayProcess, TritonProcess, ensure_models, fp32_repository  # noqa: E402
from bench.docs import write_section  # noqa: E402
from bench.load_test import DOC, open_loop, percentile  # noqa: E402
from export.dev_cases import SHARED_DATA, iou, load_cases, reference_box  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402
from medseg_client import SegmentationClient, image_from_array  # noqa: E402
from medseg_client.masks import MaskEncoding, decode_mask  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
WRONG_IOU = 0.99
DEADLINE_S = {"kill": 20.0, "hang": 5.0}


@dataclass
class FaultResult:
    settings: dict
    calls: int
    codes: dict
    triton_restart_s: float
    first_unavailable_s: float | None
    health_not_serving_s: float | None
    health_serving_again_s: float | None
    first_ok_after_restart_s: float | None
    errors_window_s: float | None
    ok_latency_ms: dict
    masks_checked: int
    wrong_masks: int
    min_iou: float
    exact_masks: int


def reference_images(count: int) -> list[tuple[pb.Image, pb.Prompt]]:
    cases = load_cases(SHARED_DATA / "dev", limit=count)
    out = []
    for case in cases:
        b = reference_box(case.mask)
        out.append((image_from_array(case.image), pb.Prompt(box=pb.Box(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1))))
    return out


class HealthWatch:
    """Polls the gateway's health every ``interval`` s; records (time since start, status) changes."""

    def __init__(self, gw: GatewayProcess, interval: float = 0.05) -> None:
        self.gw, self.interval = gw, interval
        self.changes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = 0.0

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            status = self.gw.health()
            if status != last:
                self.changes.append((time.monotonic() - self.start, status))
                last = status
            self._stop.wait(self.interval)

    def begin(self, start: float) -> None:
        self.start = start
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def first(self, status: int, after: float) -> float | None:
        return next((t for t, s in self.changes if s == status and t >= after), None)


def run_fault(duration: float = 45.0, kill_at: float = 10.0, rate: float = 0.5, images: int = 4,
              scenario: str = "kill", hang_s: float = 8.0, workdir: Path | None = None) -> FaultResult:
    ensure_models()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="medseg-fault-"))
    repository = fp32_repository(tmp)  # the fault path, not the variants: Triton restarts with 2 entries
    triton = TritonProcess(tmp / "triton", repository).start()
    gw = GatewayProcess(tmp / "gw", "--backend", "triton", "--triton-url", triton.grpc_target,
                        "--model-repository", str(repository), "--cache-bytes", "0",
                        "--max-inflight", "4", "--max-queue", "8", "--backend-timeout-s", "30",
                        "--log-level", "WARNING", "--audit-log", str(tmp / "audit.log"))
    watch = HealthWatch(gw)
    timeline: dict[str, float] = {}
    try:
        gw.start().wait_serving()
        pool = reference_images(images)
        with SegmentationClient(gw.target, timeout=60) as client:
            references = [client.segment(image=image, prompts=[prompt]).masks[0] for image, prompt in pool]
        counter = iter(range(10**9))

        def make_request():
            i = next(counter) % len(pool)
            image, prompt = pool[i]
            return pb.SegmentRequest(image=image, prompts=[prompt]), i

        started = threading.Event()
        phase_start: list[float] = []

        def fault() -> None:
            started.wait()
            phase_start.append(time.monotonic())
            watch.begin(phase_start[0])
            time.sleep(kill_at)
            timeline["kill"] = time.monotonic() - phase_start[0]
            if scenario == "kill":
                triton.kill()
                triton.start()  # same ports, fresh process; returns when Triton is ready again
            else:
                os.kill(triton.proc.pid, signal.SIGSTOP)
                try:
                    time.sleep(hang_s)
                finally:
                    os.kill(triton.proc.pid, signal.SIGCONT)
            timeline["triton_ready"] = time.monotonic() - phase_start[0]

        fault_thread = threading.Thread(target=fault, daemon=True)
        fault_thread.start()
        calls = asyncio.run(open_loop(gw.target, rate, duration, make_request, DEADLINE_S[scenario],
                                      keep_responses=True, start_event=started))
        fault_thread.join(120)
        time.sleep(0.5)
    finally:
        watch.stop()
        gw.stop()
        triton.stop()
    kill = timeline["kill"]
    codes = Counter(c.code for c in calls)
    checked = wrong = exact = 0
    min_iou = 1.0
    for c in calls:
        if c.code != "OK":
            continue
        m = c.response.masks[0]
        mask = decode_mask(m.data, m.height, m.width, MaskEncoding.BITS)
        score = iou(mask, references[c.tag])
        checked += 1
        exact += bool(np.array_equal(mask, references[c.tag]))
        min_iou = min(min_iou, score)
        wrong += score < WRONG_IOU
    unavailable = [c.done for c in calls if c.code != "OK" and c.done >= kill]
    ok_after = [c.done for c in calls if c.code == "OK" and c.sent >= kill]
    errors = [c for c in calls if c.code != "OK"]
    window = (max(c.done for c in errors) - min(c.sent for c in errors)) if errors else None

    def since_kill(t: float | None) -> float | None:
        return None if t is None else t - kill

    return FaultResult(
        settings={"scenario": scenario, "rate_per_s": rate, "duration_s": duration, "kill_at_s": kill_at,
                  "hang_s": hang_s if scenario == "hang" else None, "images": images, "cache": "off",
                  "deadline_s": DEADLINE_S[scenario]},
        calls=len(calls), codes=dict(codes), triton_restart_s=timeline["triton_ready"] - kill,
        first_unavailable_s=since_kill(min(unavailable, default=None)),
        health_not_serving_s=since_kill(watch.first(health_pb2.HealthCheckResponse.NOT_SERVING, kill)),
        health_serving_again_s=since_kill(watch.first(SERVING, kill)),
        first_ok_after_restart_s=since_kill(min((t for t in ok_after if t >= timeline["triton_ready"]),
                                                default=None)),
        errors_window_s=window,
        ok_latency_ms={q: percentile([c.latency * 1000 for c in calls if c.code == "OK"], float(q[1:]))
                       for q in ("p50", "p99")},
        masks_checked=checked, wrong_masks=wrong, min_iou=min_iou, exact_masks=exact)


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def markdown(r: FaultResult) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items()))
    kill = r.settings["scenario"] == "kill"
    fault = ("tritonserver SIGKILLed at {:.0f} s and restarted at once on the same ports" if kill else
             "tritonserver SIGSTOPped at {:.0f} s and resumed (SIGCONT) " f"{r.settings['hang_s']:.0f} s later")
    return "\n".join([
        f"Settings: gateway `--backend triton --cache-bytes 0 --max-inflight 4 --max-queue 8`, "
        f"{r.settings['images']} dev-set images with their reference boxes, {r.settings['rate_per_s']:g} call/s "
        f"open loop for {r.settings['duration_s']:.0f} s, {r.settings['deadline_s']:.0f} s client deadline, "
        f"{fault.format(r.settings['kill_at_s'])}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| calls by status | {codes} (of {r.calls}) |",
        f"| fault -> first failed call returned | {_s(r.first_unavailable_s)} |",
        f"| fault -> health NOT_SERVING | {_s(r.health_not_serving_s)} |",
        f"| fault -> tritonserver {'ready again (its own start-up)' if kill else 'resumed'} | "
        f"{_s(r.triton_restart_s)} |",
        f"| fault -> health SERVING again | {_s(r.health_serving_again_s)} |",
        f"| fault -> first OK call after the {'restart' if kill else 'resume'} | {_s(r.first_ok_after_restart_s)} |",
        f"| window in which calls failed | {_s(r.errors_window_s)} |",
        f"| OK latency p50 / p99 | {r.ok_latency_ms['p50']:.0f} / {r.ok_latency_ms['p99']:.0f} ms |",
        f"| masks checked against the reference / wrong (IoU < {WRONG_IOU}) | {r.masks_checked} / {r.wrong_masks} "
        f"(min IoU {r.min_iou:.4f}, {r.exact_masks} pixel-identical) |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("kill", "hang"), default="kill")
    parser.add_argument("--duration", type=float, default=45.0)
    parser.add_argument("--kill-at", type=float, default=10.0, help="when the fault starts, seconds")
    parser.add_argument("--hang-s", type=float, default=8.0, help="how long Triton stays stopped (hang)")
    parser.add_argument("--rate", type=float, default=0.5, help="calls per second (default 0.5, below capacity)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/ or bench/*.json")
    args = parser.parse_args(argv)
    result = run_fault(args.duration, args.kill_at, args.rate, args.images, args.scenario, args.hang_s)
    table = markdown(result)
    print(table)
    if not args.no_write:
        (REPO / "bench" / f"fault_{args.scenario}_results.json").write_text(json.dumps(asdict(result), indent=1))
        flag = "" if args.scenario == "kill" else " --scenario hang"
        write_section(DOC, f"fault_test_{args.scenario}", f"Measured {time.strftime('%Y-%m-%d')} with "
                      f"`.venv/bin/python bench/fault_test.py{flag}`:\n\n{table}")
    ok = set(result.codes) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"} and result.wrong_masks == 0
    return 0 if ok and result.first_ok_after_restart_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
