"""SAM ViT-B from a checkpoint on this machine: export time and peak memory, encoder latency fp32
(ONNX Runtime) and BF16 (OpenVINO), decoder latency, what the gateway's start-up check reads.

No checkpoint can be downloaded here: the checkpoint is the real ViT-B architecture randomly
initialised (``export.sam.random_checkpoint``), which costs what a real one costs. The steps:

1. write the random checkpoint; 2. ``python -m export sam --checkpoint ... --variant vit_b
--check-cases 1`` as a child process (wall seconds; peak RSS of the export and its children from
``getrusage(RUSAGE_CHILDREN)``); 3. open the exported encoder as the gateway does, fp32 (its
config.pbtxt: ONNX Runtime) and BF16 (the same file under OpenVINO with BF16 inference precision),
and time them interleaved on one real image (a dev case when ../shared is there, else a shipped
pydicom image), beside the LiteMedSAM fp32 encoder of the main repository as the machine's yardstick
(ratios compare across machines, seconds do not); 4. the prompt decoder on a click and on a box.

Prints a table and writes it to docs/SAM_CHECKPOINTS.md (the "Measured" section) and the raw
figures to bench/sam_vit_b.json::

    .venv/bin/python bench/sam_vit_b.py [--runs 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.measure import machine  # noqa: E402

DOC = REPO / "docs" / "SAM_CHECKPOINTS.md"
RESULTS = REPO / "bench" / "sam_vit_b.json"
MARK = "<!-- measured by bench/sam_vit_b.py -->"


def export(checkpoint: Path, repository: Path) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "export", "sam", "--checkpoint", str(checkpoint), "--variant", "vit_b",
                          "--repository", str(repository), "--check-cases", "1"], cwd=REPO, capture_output=True,
                         text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"export failed: {out.stderr[-3000:]}")
    parity = [line for line in out.stdout.splitlines() if "parity: worst mask IoU" in line]
    return {"export_s": seconds, "export_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "parity": parity[-1] if parity else "", "onnx_bytes": {
                p.parent.parent.name: p.stat().st_size for p in repository.glob("sam_vit_b_*/1/model.onnx")}}


def image() -> tuple[str, np.ndarray]:
    from export.dev_cases import check_evidence

    evidence = check_evidence(None, 1)
    item = evidence.items[0]
    return f"{evidence.kind}: {item.case_id}", item.pixels


def time_encoders(repository: Path, pixels: np.ndarray, runs: int) -> dict:
    from dataclasses import replace

    from service.backends.repository import RepositoryEntry, RuntimeParameters
    from service.core.geometry import model_input
    from service.inference.predictor import open_entry

    fp32 = RepositoryEntry.read(repository / "sam_vit_b_encoder")
    bf16 = replace(fp32, runtime=RuntimeParameters(runtime="openvino", precision="bf16"))
    lite = RepositoryEntry.read(REPO / "model_repository" / "medsam_lite_encoder")
    sessions = {"sam_vit_b fp32 (ONNX Runtime)": (open_entry(fp32), model_input(pixels, 1024, "sam")[0]),
                "sam_vit_b bf16 (OpenVINO)": (open_entry(bf16, fp32.onnx_path()), model_input(pixels, 1024, "sam")[0]),
                "medsam_lite fp32 (ONNX Runtime)": (open_entry(lite), model_input(pixels, 256)[0])}
    seconds: dict[str, list[float]] = {k: [] for k in sessions}
    outputs = {}
    for name, (session, tensor) in sessions.items():  # warm-up (first-run compilation, arena)
        outputs[name] = session.run(["image_embeddings"], {"image": tensor})[0]
    for _ in range(runs):
        for name, (session, tensor) in sessions.items():
            start = time.perf_counter()
            session.run(["image_embeddings"], {"image": tensor})
            seconds[name].append(time.perf_counter() - start)
    a, b = outputs["sam_vit_b fp32 (ONNX Runtime)"], outputs["sam_vit_b bf16 (OpenVINO)"]
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    return {"seconds": seconds, "bf16_relative_embedding_error": rel}


def time_decoder(repository: Path, pixels: np.ndarray, runs: int) -> dict:
    from service.core.domain import Box, Point, Prompt
    from service.inference.predictor import SamPredictor

    predictor = SamPredictor.from_repository(repository, "sam_vit_b")
    embedding = predictor.embed(pixels)
    h, w = pixels.shape[:2]
    prompts = {"click": Prompt(points=(Point(w / 2, h / 2, True),)),
               "box": Prompt(box=Box(w / 4, h / 4, 3 * w / 4, 3 * h / 4))}
    out = {}
    for name, prompt in prompts.items():
        predictor.predict(embedding, [prompt])
        samples = []
        for _ in range(max(runs * 4, 10)):
            start = time.perf_counter()
            predictor.predict(embedding, [prompt])
            samples.append(time.perf_counter() - start)
        out[name] = samples
    return out


def render(r: dict) -> str:
    enc = {k: statistics.median(v) for k, v in r["encoders"]["seconds"].items()}
    lite = enc["medsam_lite fp32 (ONNX Runtime)"]
    fp32, bf16 = enc["sam_vit_b fp32 (ONNX Runtime)"], enc["sam_vit_b bf16 (OpenVINO)"]
    gib = 2**30
    lines = [
        MARK,
        f"Machine: {r['machine']}. Date: {r['date']}. Command: `{r['command']}` ({r['runs']} timed runs per encoder, "
        f"interleaved, after one warm-up; image: {r['image']}). Checkpoint: the real ViT-B architecture randomly "
        "initialised (none can be downloaded here; a real checkpoint has the same shapes and costs).",
        "",
        "| what | figure |",
        "|---|---|",
        f"| export (`python -m export sam --variant vit_b --check-cases 1`: load, 2 ONNX files, ONNX Runtime checks, "
        f"batch-2 check, memory probes, PyTorch parity on 1 image) | {r['export']['export_s']:.0f} s |",
        f"| peak RSS of the export (its process and children) | {r['export']['export_peak_rss_bytes'] / gib:.1f} GiB |",
        f"| ONNX files | encoder {r['export']['onnx_bytes'].get('sam_vit_b_encoder', 0) / 2**20:.0f} MiB, decoder "
        f"{r['export']['onnx_bytes'].get('sam_vit_b_decoder', 0) / 2**20:.0f} MiB |",
        f"| parity after export | {r['export']['parity'].split(': ', 1)[-1].replace('|', '')} |",
        f"| memory the gateway's start-up check reads (`medseg.memory_bytes`, measured at export) | encoder "
        f"{r['memory']['encoder'] / gib:.2f} GiB, decoder {r['memory']['decoder'] / gib:.2f} GiB |",
        f"| encoder fp32, ONNX Runtime (median) | {fp32:.2f} s ({fp32 / lite:.1f}x LiteMedSAM's) |",
        f"| encoder BF16, OpenVINO (median) | {bf16:.2f} s ({fp32 / bf16:.2f}x faster than fp32; relative embedding "
        f"error vs fp32 {r['encoders']['bf16_relative_embedding_error']:.4f}) |",
        f"| LiteMedSAM encoder fp32, same run (yardstick) | {lite:.3f} s |",
        f"| prompt decoder, one click (median) | {statistics.median(r['decoder']['click']) * 1000:.0f} ms |",
        f"| prompt decoder, one box (median) | {statistics.median(r['decoder']['box']) * 1000:.0f} ms |",
        "",
        "Encoder runs (s): " + "; ".join(f"{k}: {', '.join(f'{x:.2f}' for x in v)}"
                                         for k, v in r["encoders"]["seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else ""
    if MARK in text:
        head, rest = text.split(MARK, 1)
        tail = rest.split("\n## ", 1)
        text = head + section + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text + "\n## Measured: ViT-B on this machine\n\n" + section
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="keep the checkpoint and repository here")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from bench/sam_vit_b.json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_doc(render(json.loads(RESULTS.read_text())))
        return 0
    from export.sam import random_checkpoint
    from service.backends.repository import RepositoryEntry

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sam_vit_b_"))
    try:
        checkpoint = random_checkpoint("vit_b", work / "sam_vit_b_random.pth")
        repository = work / "repository"
        result = {"machine": machine(), "date": dt.date.today().isoformat(), "runs": args.runs,
                  "command": "python bench/sam_vit_b.py" + (f" --runs {args.runs}" if args.runs != 5 else ""),
                  "export": export(checkpoint, repository)}
        label, pixels = image()
        result["image"] = label
        result["memory"] = {role: RepositoryEntry.read(repository / f"sam_vit_b_{role}").gateway.memory_bytes
                            for role in ("encoder", "decoder")}
        result["encoders"] = time_encoders(repository, pixels, args.runs)
        result["decoder"] = time_decoder(repository, pixels, args.runs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    section = render(result)
    print(section)
    if not args.no_doc:
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
