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


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def matmul_gflops(threads: int = 2, n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM throughput of PyTorch on this machine (2*n^3 FLOP per product)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n**3 / best / 1e9


def encoder_gflop() -> float:
    """FLOPs of one LiteMedSAM encoder forward (batch 1), counted by PyTorch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from export.medsam_lite import load_pretrained

    net = load_pretrained(Path(__file__).resolve().parents[1] / ".cache")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.image_encoder(torch.rand(1, 3, 256, 256))
    return counter.get_total_flops() / 1e9


def model_time(repository: Path, image: np.ndarray, window: tuple[float, float], box: tuple,
               encoder: str = "medsam_lite_encoder") -> dict:
    """Median in-process time of what the gateway runs per new-image request, step by step."""
    import onnxruntime as ort

    from service import sam_transforms as st
    from service.domain import Box, ImageInput, Prompt, RawPixels, Window
    from service.imageio import decode_image
    from service.prompts import decoder_batches

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    enc = ort.InferenceSession(str(repository / encoder / "1" / "model.onnx"), opts)
    dec = ort.InferenceSession(str(repository / "medsam_lite_decoder/1/model.onnx"), opts)
    raw = ImageInput(raw=RawPixels("int16", image.shape, image.tobytes()), window=Window(*window))
    state: dict = {}

    def decode():
        state["pixels"] = decode_image(raw).pixels

    def prep():
        state["tensor"], state["frame"] = st.model_input(state["pixels"], 256)

    def encode():
        state["emb"] = enc.run(None, {"image": state["tensor"]})[0]

    def decode_masks():
        _, feeds = next(decoder_batches([Prompt(box=Box(*box))], state["frame"], (256, 256)))
        state["low"] = dec.run(None, {"image_embeddings": state["emb"], **feeds})[0]

    def post():
        st.upsample_logits(state["low"][:, 0], state["frame"])

    steps = {"decode_image": decode, "preprocess": prep, "encoder": encode, "mask_decoder": decode_masks,
             "postprocess": post}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(12):
        for name, fn in steps.items():
            t = timed(fn, 1)[0]
            if i >= 2:
                times[name].append(t)
    return {k: float(np.median(v)) for k, v in times.items()}


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


def stage_means(metrics: str) -> dict:
    sums, counts = {}, {}
    for line in metrics.splitlines():
        m = re.match(r'medseg_stage_duration_seconds_(sum|count)\{.*stage="(\w+)".*\} ([0-9.e+-]+)', line)
        if m:
            (sums if m.group(1) == "sum" else counts)[m.group(2)] = float(m.group(3))
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


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


def render_markdown(r: dict) -> str:
    runs = r["runs"]
    names = {"pytorch_reference": "(a) PyTorch reference, in process", "gateway_embedded": "(b) gateway, embedded ORT",
             "gateway_triton": "(c) gateway, Triton", "gateway_embedded_int8": "(b') gateway, embedded ORT, INT8 encoder"}
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
        rss = f"{run.get('peak_rss_mb', 0):.0f}"
        if "triton_peak_rss_mb" in run:
            rss += f" (+ tritonserver {run['triton_peak_rss_mb']:.0f})"
        follow = _fmt(run["follow_up"]) + (" (re-runs all)" if "follow_up_note" in run else "")
        lines.append(f"| {names[key]} | {_fmt(run['new_image'])} | {follow} | {rss} |")
    ref = runs["pytorch_reference"]["new_image"]["p50_ms"]
    lines += ["", "## Throughput, new images (bounded number of requests)", "",
              "| path | concurrency | requests | req/s | p50 ms | p95 ms |", "|---|---:|---:|---:|---:|---:|"]
    for key, run in runs.items():
        for c, t in run.get("throughput", {}).items():
            lines.append(f"| {names[key]} | {c} | {t['requests']} | {t['req_per_s']:.2f} | {t['p50_ms']:.0f} | "
                         f"{t['p95_ms']:.0f} |")
    mt = r["model_time"]
    model_ms = (mt["encoder"] + mt["mask_decoder"]) * 1000
    lines += ["", "## Where the time goes (embedded, in-process medians, ms)", "",
              "| decode image | preprocess | encoder | mask decoder | postprocess |", "|---:|---:|---:|---:|---:|",
              "| " + " | ".join(f"{mt[k] * 1000:.1f}" for k in ("decode_image", "preprocess", "encoder",
                                                                    "mask_decoder", "postprocess")) + " |"]
    gflop, peak = r["encoder_gflop"], r["matmul_gflops"]
    achieved = gflop / mt["encoder"]
    lines += ["", "## Targets (issue 6), from this run", "", "| figure | value | target |", "|---|---:|---|"]
    if "gateway_embedded" in runs:
        emb = runs["gateway_embedded"]
        speedup = ref / emb["new_image"]["p50_ms"]
        overhead = emb["new_image"]["p50_ms"] - model_ms
        lines += [f"| new-image Segment speed-up, embedded vs PyTorch reference (p50) | {speedup:.2f}x | >= 2.5x |",
                  f"| follow-up prompt p50 end to end (embedded) | {emb['follow_up']['p50_ms']:.1f} ms | <= 60 ms |",
                  f"| gateway overhead (p50 request - model time {model_ms:.0f} ms), 512x512 | {overhead:.0f} ms "
                  f"({100 * overhead / model_ms:.1f}% of model time) | <= 10% |"]
    if "gateway_triton" in runs:
        tri = runs["gateway_triton"]
        lines.append(f"| Triton: new image p50 / follow-up p50 | {tri['new_image']['p50_ms']:.0f} / "
                     f"{tri['follow_up']['p50_ms']:.1f} ms | (side by side) |")
        b = tri.get("triton_batching", {})
        if b:
            lines.append(f"| Triton encoder mean batch size over the run | {b['mean_batch']:.2f} | (dynamic batching) |")
    lines += [f"| encoder FLOPs (FlopCounterMode, batch 1) | {gflop:.1f} GFLOP | |",
              f"| encoder achieved throughput | {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of fp32 "
              f"matmul ({peak:.0f} GFLOP/s, 2048², 2 threads) | >= 70% |",
              f"| fp32 floor for the encoder (FLOPs / matmul peak) | {1000 * gflop / peak:.0f} ms | |"]
    if "model_time_int8" in r:
        t8 = r["model_time_int8"]["encoder"] * 1000
        lines.append(f"| INT8 encoder time (in process) vs fp32 {mt['encoder'] * 1000:.0f} ms | {t8:.0f} ms "
                     f"({'below' if t8 < 1000 * gflop / peak else 'above'} the fp32 floor) | or: INT8 below the floor |")
    lines.append("")
    return "\n".join(lines)
