"""Overload test of a real gateway on loopback: measure capacity, then offer a multiple of it.

1. Start ``python -m service`` (embedded ONNX Runtime backend, LiteMedSAM) on 127.0.0.1 with
   the admission bounds under test and a small embedding cache (so the cache is full, and
   its byte bound is exercised, from the start).
2. Capacity: closed loop at concurrency 2 (the backend's worker count), every request a new
   image (a cache miss: encoder + decoder), for ``--capacity-s`` seconds -> requests/s.
3. Overload: open loop at ``--factor`` x capacity for ``--duration`` seconds (requests are sent
   on schedule whether or not earlier ones have finished), each with a 30 s deadline.
   Recorded: every status code, latency of accepted (OK) and rejected calls, gateway RSS
   every 0.5 s, the cache's bytes and the admission gauges from /metrics.

Pass criteria (also asserted by ``tests/stress/test_load.py``, the short CI version): every
call ends OK or RESOURCE_EXHAUSTED; accepted p99 within the bound the admission settings
imply; rejections fast; RSS flat; cache bytes within ``--cache-bytes``::

    .venv/bin/python bench/load_test.py                    # 60 s at 4x, writes docs/RELIABILITY.md
    .venv/bin/python bench/load_test.py --duration 10 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from bench.harness import GatewayProcess, ensure_models, metric_value  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc  # noqa: E402

DOC = REPO / "docs" / "RELIABILITY.md"
IMAGE_SIDE = 256
BOX = pb.Box(x0=40, y0=40, x1=200, y1=180)
DEADLINE_S = 30.0
MAX_OUTSTANDING = 512  # client-side bound; never reached when the gateway rejects fast


# --------------------------------------------------------------------------- measurement helpers
def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread: list of (t, MiB)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - start, rss_mib(self.pid)))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Images:
    """A new random image per request (``IMAGE_SIDE``^2 uint8): every request misses the cache."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def request(self) -> pb.SegmentRequest:
        pixels = self.rng.integers(0, 255, (IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        image = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[IMAGE_SIDE, IMAGE_SIDE], data=pixels.tobytes()))
        return pb.SegmentRequest(image=image, prompts=[pb.Prompt(box=BOX)])


@dataclass
class Call:
    sent: float      # seconds since the start of the phase
    latency: float   # seconds
    code: str
    tag: object = None                          # what the caller attached to the request
    response: pb.SegmentResponse | None = None  # kept only when asked for

    @property
    def done(self) -> float:
        return self.sent + self.latency


async def _call(stub, request, started: float, phase_start: float, deadline: float, tag=None,
                keep: bool = False) -> Call:
    response = None
    try:
        response = await stub.Segment(request, timeout=deadline)
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return Call(started - phase_start, time.monotonic() - started, code, tag, response if keep else None)


async def closed_loop(target: str, seconds: float, concurrency: int, images: Images) -> tuple[float, list[Call]]:
    """Requests/s at ``concurrency`` outstanding calls for ``seconds``."""
    calls: list[Call] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        start = time.monotonic()

        async def worker():
            while time.monotonic() - start < seconds:
                calls.append(await _call(stub, images.request(), time.monotonic(), start, DEADLINE_S))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    ok = sum(c.code == "OK" for c in calls)
    return ok / elapsed, calls


async def open_loop(target: str, rate: float, seconds: float, make_request, deadline: float = DEADLINE_S,
                    keep_responses: bool = False, start_event: threading.Event | None = None) -> list[Call]:
    """Send ``make_request()`` at ``rate``/s for ``seconds`` regardless of completions.

    ``make_request`` returns a request, or ``(request, tag)`` to label the :class:`Call`.
    ``start_event`` is set when the first request is sent (phase time 0).
    """
    calls: list[Call] = []
    pending: set[asyncio.Task] = set()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        start = time.monotonic()
        if start_event is not None:
            start_event.set()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= MAX_OUTSTANDING:
                calls.append(Call(time.monotonic() - start, 0.0, "CLIENT_SKIPPED"))
                continue
            made = make_request()
            request, tag = made if isinstance(made, tuple) else (made, None)
            task = asyncio.create_task(_call(stub, request, time.monotonic(), start, deadline, tag, keep_responses))
            pending.add(task)

            def done(t: asyncio.Task) -> None:
                pending.discard(t)
                calls.append(t.result())

            task.add_done_callback(done)
        while pending:
            await asyncio.wait(set(pending))
    return sorted(calls, key=lambda c: c.sent)


# --------------------------------------------------------------------------- the test
@dataclass
class LoadResult:
    settings: dict
    capacity_rps: float
    offered_rps: float
    duration_s: float
    codes: dict
    accepted_rps: float
    accepted_ms: dict
    rejected_ms: dict
    p99_bound_ms: float
    rss_mib: dict
    cache_bytes: float
    cache_limit: int
    rss_samples: list = field(default_factory=list)

    @property
    def only_ok_or_exhausted(self) -> bool:
        return set(self.codes) <= {"OK", "RESOURCE_EXHAUSTED"}


def run_load(duration: float = 60.0, factor: float = 4.0, capacity_s: float = 15.0, max_inflight: int = 2,
             max_queue: int = 2, cache_bytes: int = 32 << 20, workdir: Path | None = None) -> LoadResult:
    ensure_models()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="medseg-load-"))
    gw = GatewayProcess(tmp, "--backend", "embedded", "--max-inflight", str(max_inflight), "--max-queue",
                        str(max_queue), "--cache-bytes", str(cache_bytes), "--log-level", "WARNING",
                        "--audit-log", str(tmp / "audit.log"))
    gw.start().wait_serving()
    try:
        images = Images()
        asyncio.run(closed_loop(gw.target, 0.1, 2, images))  # warm-up: one call per worker
        capacity, _ = asyncio.run(closed_loop(gw.target, capacity_s, 2, images))
        rate = factor * capacity
        with RssSampler(gw.proc.pid) as rss:
            calls = asyncio.run(open_loop(gw.target, rate, duration, images.request))
        metrics = gw.metrics_text()
    finally:
        gw.stop()
    codes = Counter(c.code for c in calls)
    ok = [c.latency * 1000 for c in calls if c.code == "OK"]
    rejected = [c.latency * 1000 for c in calls if c.code == "RESOURCE_EXHAUSTED"]
    samples = rss.samples
    tenth = max(1, len(samples) // 10)
    # Accepted calls wait for at most max_queue calls ahead of them plus their own run,
    # served max_inflight at a time at the measured rate; x2 and +2 s for noise on a shared CPU.
    bound_ms = 1000 * (2 * (max_queue + max_inflight) / capacity + 2.0)
    return LoadResult(
        settings={"max_inflight": max_inflight, "max_queue": max_queue, "cache_bytes": cache_bytes,
                  "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} uint8, new per call", "deadline_s": DEADLINE_S},
        capacity_rps=capacity, offered_rps=rate, duration_s=duration, codes=dict(codes),
        accepted_rps=len(ok) / duration,
        accepted_ms={"p50": percentile(ok, 50), "p95": percentile(ok, 95), "p99": percentile(ok, 99),
                     "max": max(ok, default=float("nan"))},
        rejected_ms={"p50": percentile(rejected, 50), "p99": percentile(rejected, 99)},
        p99_bound_ms=bound_ms,
        rss_mib={"first_10pct": float(np.median([s[1] for s in samples[:tenth]])),
                 "last_10pct": float(np.median([s[1] for s in samples[-tenth:]])),
                 "max": max(s[1] for s in samples)},
        cache_bytes=metric_value(metrics, "medseg_embedding_cache_bytes"), cache_limit=cache_bytes,
        rss_samples=[(round(t, 1), round(m, 1)) for t, m in samples])


def markdown(r: LoadResult) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(r.codes.items()))
    growth = r.rss_mib["last_10pct"] - r.rss_mib["first_10pct"]
    return "\n".join([
        f"Settings: `--max-inflight {r.settings['max_inflight']} --max-queue {r.settings['max_queue']} "
        f"--cache-bytes {r.settings['cache_bytes']}`, embedded backend, {r.settings['image']}, "
        f"one box, {r.settings['deadline_s']:.0f} s client deadline.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| capacity (closed loop, concurrency 2) | {r.capacity_rps:.2f} req/s |",
        f"| offered (open loop) | {r.offered_rps:.2f} req/s for {r.duration_s:.0f} s ({sum(r.codes.values())} calls) |",
        f"| status counts | {codes} |",
        f"| accepted throughput | {r.accepted_rps:.2f} req/s |",
        f"| accepted latency p50 / p95 / p99 / max | {r.accepted_ms['p50']:.0f} / {r.accepted_ms['p95']:.0f} / "
        f"{r.accepted_ms['p99']:.0f} / {r.accepted_ms['max']:.0f} ms (bound {r.p99_bound_ms:.0f} ms) |",
        f"| rejection latency p50 / p99 | {r.rejected_ms['p50']:.1f} / {r.rejected_ms['p99']:.1f} ms |",
        f"| gateway RSS first 10% / last 10% / max | {r.rss_mib['first_10pct']:.0f} / {r.rss_mib['last_10pct']:.0f} / "
        f"{r.rss_mib['max']:.0f} MiB (growth {growth:+.0f} MiB) |",
        f"| embedding cache at the end | {r.cache_bytes / 2**20:.0f} MiB of {r.cache_limit / 2**20:.0f} MiB |",
    ])



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="overload phase, seconds (default 60)")
    parser.add_argument("--factor", type=float, default=4.0, help="offered load / capacity (default 4)")
    parser.add_argument("--capacity-s", type=float, default=15.0, help="capacity measurement, seconds")
    parser.add_argument("--max-inflight", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=2)
    parser.add_argument("--cache-bytes", type=int, default=32 << 20)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "load_results.json")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/ or --json")
    args = parser.parse_args(argv)
    result = run_load(args.duration, args.factor, args.capacity_s, args.max_inflight, args.max_queue,
                      args.cache_bytes)
    table = markdown(result)
    print(table)
    if not args.no_write:
        args.json.write_text(json.dumps(asdict(result), indent=1))
        stamp = time.strftime("%Y-%m-%d")
        write_section(DOC, "load_test", f"Measured {stamp} with `.venv/bin/python bench/load_test.py` "
                      f"(--duration {args.duration:g} --factor {args.factor:g}):\n\n{table}")
    ok = (result.only_ok_or_exhausted and result.accepted_ms["p99"] <= result.p99_bound_ms
          and result.cache_bytes <= result.cache_limit)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
