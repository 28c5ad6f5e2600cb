"""Measurement helpers for bench/run_benchmarks.py (timing, memory, FLOPs, report)."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def percentiles(seconds: list[float]) -> dict:
    a = np.array(seconds) * 1000
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def matmul_gflops(threads: int = 2, n: int = 2048, repeats: int = 10) -> dict:
    """Best fp32 GEMM throughput (2*n^3 FLOP per product) of PyTorch and of ONNX Runtime's MLAS
    (one MatMul node) on this machine; ``peak`` is the larger, the machine's measured limit."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    torch_best = min(timed(lambda: a @ b, repeats))
    spec = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"A": a.numpy(), "B": b.numpy()}
    session.run(None, feeds)
    ort_best = min(timed(lambda: session.run(None, feeds), repeats))
    out = {"pytorch": 2 * n**3 / torch_best / 1e9, "onnxruntime": 2 * n**3 / ort_best / 1e9}
    return {**out, "peak": max(out.values()), "size": n, "threads": threads}


def encoder_gflop() -> float:
    """FLOPs of one LiteMedSAM encoder forward (batch 1), counted by PyTorch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from export.medsam_lite import IMAGE_SIZE, load_pretrained

    net = load_pretrained(Path(__file__).resolve().parents[1] / ".cache")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.image_encoder(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return counter.get_total_flops() / 1e9


def model_time(repository: Path, image: np.ndarray, window: tuple[float, float], box: tuple,
               encoders: tuple[str, ...] = ("medsam_lite_encoder",), rounds: int = 12) -> dict:
    """Median in-process time of what the gateway runs per new-image request, step by step: the
    gateway's own predictor steps (:class:`service.inference.predictor.SamPredictor`) on the
    runtime each repository entry names (as the embedded backend loads it). Several
    ``encoders`` are timed interleaved, round by round, so they share the machine's state;
    ``encoder`` is the first one's time, ``encoders`` all of them."""
    from service.backends.repository import read_entry
    from service.core.domain import Box, ImageInput, Prompt, RawPixels, Window
    from service.core.imageio import decode_image
    from service.inference.predictor import SamPredictor

    base = SamPredictor.from_repository(repository, "medsam_lite")
    predictors = {name: base.with_encoder(read_entry(repository / name)) for name in encoders}
    raw = ImageInput(raw=RawPixels("int16", image.shape, image.tobytes()), window=Window(*window))
    state: dict = {}

    def decode():
        state["pixels"] = decode_image(raw).pixels

    def prep():
        state["tensor"], state["frame"] = base.preprocess(state["pixels"])

    def encode(name: str):
        state["embedding"] = predictors[name].embed_tensor(state["tensor"], state["frame"])

    def decode_masks():
        state["low"], _ = base.predict(state["embedding"], [Prompt(box=Box(*box))])

    def post():
        base.masks(state["low"], state["frame"])

    steps = {"decode_image": decode, "preprocess": prep,
             **{f"encoder:{name}": (lambda n=name: encode(n)) for name in encoders},
             "mask_decoder": decode_masks, "postprocess": post}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(rounds):
        for name, fn in steps.items():
            t = timed(fn, 1)[0]
            if i >= 2:
                times[name].append(t)
    out = {k: float(np.median(v)) for k, v in times.items() if not k.startswith("encoder:")}
    out["encoders"] = {name: float(np.median(times[f"encoder:{name}"])) for name in encoders}
    out["encoder"] = out["encoders"][encoders[0]]
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def peak_rss_mb(pids: list[int], children: bool = False) -> float:
    """Sum of VmHWM (peak resident memory) of the processes (and their children)."""
    total = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        total += int(match.group(1)) if match else 0
        if children:
            todo += _children(pid)
    return total / 1024


def stage_totals(metrics: str) -> dict[str, list[float]]:
    """``{stage: [seconds, count]}`` from the gateway's stage histogram, all models summed."""
    out: dict[str, list[float]] = {}
    for line in metrics.splitlines():
        m = re.match(r'medseg_stage_duration_seconds_(sum|count)\{.*stage="(\w+)".*\} ([0-9.e+-]+)', line)
        if m:
            out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] += float(m.group(3))
    return out


def stage_means(metrics: str, before: str = "") -> dict:
    """Mean seconds per stage, over the requests between the ``before`` scrape and ``metrics``."""
    now, then = stage_totals(metrics), stage_totals(before)
    out = {}
    for stage, (total, count) in now.items():
        t0, c0 = then.get(stage, [0.0, 0.0])
        if count > c0:
            out[stage] = (total - t0) / (count - c0)
    return out


def triton_batching(metrics: str) -> dict:
    out = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}\{{[^}}]*model="medsam_lite_encoder"[^}}]*\}} ([0-9.e+]+)', metrics, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    out["mean_batch"] = out["nv_inference_count"] / max(out["nv_inference_exec_count"], 1.0)
    return out


def _fmt(p: dict) -> str:
    return f"{p['p50_ms']:.0f} / {p['p95_ms']:.0f} / {p['p99_ms']:.0f}"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


ENCODERS = {  # repository entry -> (label, gateway model, result key of its gateway run)
    "medsam_lite_encoder": ("fp32, ONNX Runtime", "medsam_lite", "gateway_embedded"),
    "medsam_lite_int8_encoder": ("INT8 (dynamic MatMul), ONNX Runtime", "medsam_lite_int8", "gateway_embedded_int8"),
    "medsam_lite_bf16_encoder": ("BF16, OpenVINO", "medsam_lite_bf16", "gateway_embedded_bf16"),
    "medsam_lite_int8_static_encoder": ("static INT8 (NNCF), OpenVINO", "medsam_lite_int8_static",
                                        "gateway_embedded_static"),
}
NAMES = {"pytorch_reference": "(a) PyTorch reference, in process", "gateway_embedded": "(b) gateway, embedded ORT",
         "gateway_embedded_int8": "(b') gateway, embedded, INT8 encoder (ORT)",
         "gateway_embedded_bf16": "(b'') gateway, embedded, BF16 encoder (OpenVINO)",
         "gateway_embedded_static": "(b''') gateway, embedded, static INT8 encoder (NNCF, OpenVINO)",
         "gateway_triton": "(c) gateway, Triton"}


def render_markdown(r: dict) -> str:
    runs = r["runs"]
    lines = ["# Benchmarks", "", f"- Machine: {r['machine']}", f"- Date: {r['date']}", f"- Command: `{r['command']}`",
             f"- Input: {r['input']}; latencies end to end through gRPC for (b) and (c).",
             f"- Load average (1/5/15 min) at start: {r.get('load_start', 'n/a')}, at end: {r.get('load_end', 'n/a')} "
             f"on {os.cpu_count()} cores (the run itself loads both cores; a start value well above 0.5 means other "
             f"jobs shared the CPU and absolute figures are inflated).",
             ""]
    lines += [
             "## Latency (ms, p50 / p95 / p99)", "",
              "| path | new image | follow-up prompt (cached `image_id`) | peak RSS MB |", "|---|---:|---:|---:|"]
    for key, run in runs.items():
        rss = f"{run['peak_rss_mb']:.0f}" if "peak_rss_mb" in run else "(same process as (b))"
        if "triton_peak_rss_mb" in run:
            rss += f" (+ tritonserver {run['triton_peak_rss_mb']:.0f})"
        follow = _fmt(run["follow_up"]) + (" (re-runs all)" if "follow_up_note" in run else "")
        lines.append(f"| {NAMES[key]} | {_fmt(run['new_image'])} | {follow} | {rss} |")
    ref = runs["pytorch_reference"]["new_image"]["p50_ms"]
    lines += ["", "## Throughput, new images (bounded number of requests)", "",
              "| path | concurrency | requests | req/s | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|---:|"]
    for key, run in runs.items():
        for c, t in run.get("throughput", {}).items():
            lines.append(f"| {NAMES[key]} | {c} | {t['requests']} | {t['req_per_s']:.2f} | {t['p50_ms']:.0f} | "
                         f"{t['p95_ms']:.0f} |")
    mt = r["model_time"]
    lines += ["", "## Where the time goes (embedded, in-process medians, ms)", "",
              "| decode image | preprocess | encoder (fp32) | mask decoder | postprocess |", "|---:|---:|---:|---:|---:|",
              "| " + " | ".join(f"{mt[k] * 1000:.1f}" for k in ("decode_image", "preprocess", "encoder",
                                                                    "mask_decoder", "postprocess")) + " |"]
    gflop, mm = r["encoder_gflop"], r["matmul_gflops"]
    peak = mm["peak"]
    floor_ms = 1000 * gflop / peak
    lines += ["", "## Encoder variants (in process, interleaved, median ms)", "",
              f"Machine fp32 matmul peak: {peak:.0f} GFLOP/s (best of PyTorch {mm['pytorch']:.0f} and ONNX Runtime "
              f"MLAS {mm['onnxruntime']:.0f}; {mm['size']}², {mm['threads']} threads). Encoder: {gflop:.1f} GFLOP "
              f"(FlopCounterMode, batch 1), so the fp32 floor is {floor_ms:.0f} ms.", "",
              "| encoder | ms | achieved GFLOP/s | % of fp32 matmul peak | vs fp32 floor | dev Dice drop |",
              "|---|---:|---:|---:|---|---:|"]
    for name, seconds in mt["encoders"].items():
        label = ENCODERS.get(name, (name,))[0]
        drop = r.get("dice_drop", {}).get(name)
        lines.append(f"| {label} | {1000 * seconds:.0f} | {gflop / seconds:.0f} | {100 * gflop / seconds / peak:.0f}% | "
                     f"{'below' if 1000 * seconds < floor_ms else 'above'} | "
                     f"{'' if drop is None else f'{drop:+.4f}'} |")
    lines += ["", "## Targets (issue 6), from this run", "", "| figure | value | target |", "|---|---:|---|"]
    for name, (label, _, key) in ENCODERS.items():
        if key in runs:
            speedup = ref / runs[key]["new_image"]["p50_ms"]
            lines.append(f"| new-image Segment speed-up vs PyTorch reference (p50), embedded, {label} | "
                         f"{speedup:.2f}x | >= 2.5x |")
    if "default_model" in r:  # calls naming no model, on a gateway started with default settings
        d = r["default_model"]
        lines.append(f"| new-image Segment speed-up vs PyTorch reference (p50), embedded, default model "
                     f"(`--default-model auto` chose {d['model']}) | {ref / d['new_image']['p50_ms']:.2f}x | >= 4x |")
    if "gateway_embedded" in runs:
        emb = runs["gateway_embedded"]
        lines.append(f"| follow-up prompt p50 end to end (embedded) | {emb['follow_up']['p50_ms']:.1f} ms | <= 60 ms |")
        for key in runs:
            stages = runs[key].get("new_image_stages")
            if stages:
                inside = 1000 * (stages["encoder"] + stages["mask_decoder"])
                overhead = runs[key]["new_image"]["mean_ms"] - inside
                lines.append(f"| gateway overhead at 512x512, {NAMES[key]}: mean request - mean model time in the "
                             f"gateway, same requests | {overhead:.0f} ms ({100 * overhead / inside:.1f}% of "
                             f"{inside:.0f} ms) | <= 10% |")
    if "gateway_triton" in runs:
        tri = runs["gateway_triton"]
        lines.append(f"| Triton: new image p50 / follow-up p50 | {tri['new_image']['p50_ms']:.0f} / "
                     f"{tri['follow_up']['p50_ms']:.1f} ms | (side by side) |")
        b = tri.get("triton_batching", {})
        if b:
            lines.append(f"| Triton encoder mean batch size over the run | {b['mean_batch']:.2f} | (dynamic batching) |")
    fp32 = mt["encoders"].get("medsam_lite_encoder", mt["encoder"])
    lines.append(f"| fp32 encoder achieved throughput | {gflop / fp32:.0f} GFLOP/s = {100 * gflop / fp32 / peak:.0f}% "
                 f"of the fp32 matmul peak | >= 70% |")
    for name in ("medsam_lite_int8_encoder", "medsam_lite_bf16_encoder"):
        if name in mt["encoders"]:
            ms = 1000 * mt["encoders"][name]
            lines.append(f"| {ENCODERS[name][0]} encoder vs the fp32 floor {floor_ms:.0f} ms | {ms:.0f} ms "
                         f"({'below' if ms < floor_ms else 'above'}) | or: below the floor, Dice drop <= 0.005 |")
    lines.append("")
    return "\n".join(lines)
