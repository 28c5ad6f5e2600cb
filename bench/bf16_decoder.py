"""The LiteMedSAM prompt decoder, fp32 (ONNX Runtime) vs BF16 (OpenVINO), in process.

What ``medsam_lite_bf16`` runs per box prompt after its encoder. Both are the same ONNX file
(``medsam_lite_decoder``'s; ``medsam_lite_bf16_decoder`` is a copy of it), opened as the embedded
backend opens an entry (:func:`service.inference.predictor.open_entry`, ``--threads`` like
``--ort-threads``): fp32 by ONNX Runtime, BF16 by OpenVINO with BF16 inference precision (the
repository's ``medsam_lite_bf16_decoder`` entry when it has one, else the entry
``python -m export medsam_lite_bf16`` would write). They run through the gateway's own predictor
steps (:class:`service.inference.predictor.SamPredictor`, the BF16 one from ``with_decoder``).

Inputs: real embeddings, the dev cases of ``../shared/data/dev`` (``--data-dir``; on a bare clone
the images shipped with pydicom, :func:`export.dev_cases.check_evidence`), each embedded once by
the fp32 encoder (``--encoder bf16``: by the BF16 one, as served) and prompted with its reference
box (shipped images: centred boxes). Timing: ``--runs`` decoder calls of each, one single-box
prompt each, interleaved (fp32 then BF16, the next run BF16 then fp32) and cycling over the
cases, after a warm-up; the median ms per call (only the model call: feeds built before).
Agreement: the mean Dice between the two decoders' full-size masks per prompt (and, on dev
cases, each one's mean Dice against the reference masks).

Prints the table and writes it as the section of ``docs/BENCHMARKS.md`` between
``<!-- bf16-decoder:begin -->`` and ``<!-- bf16-decoder:end -->`` (the rest of the file is kept)::

    .venv/bin/python bench/bf16_decoder.py [--runs 50] [--cases 8] [--threads 0] [--encoder fp32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from bench import measure  # noqa: E402

SECTION = "bf16-decoder"  # docs/BENCHMARKS.md markers (bench.docs)
BF16 = "medsam_lite_bf16"
WARMUP = 3


def predictors(repository: Path, threads: int, encoder: str):
    """(fp32 predictor, the same with the BF16 decoder, the predictor that embeds, BF16 entry source)."""
    from export.encoder_variants import OPENVINO_BF16, VARIANTS, variant_entries
    from service.backends.repository import SamModel, discover
    from service.inference.predictor import SamPredictor, open_entry

    base = SamPredictor.from_repository(repository, "medsam_lite", threads=threads)
    served = discover(repository, "medsam_lite").get(BF16)
    if isinstance(served, SamModel) and served.decoder.name != base.model.decoder.name:
        entry, path, source = served.decoder, served.decoder.onnx_path(), f"`{served.decoder.name}` entry"
    else:  # not exported here (or an old export sharing the fp32 decoder): the entry the export writes
        _, entry = variant_entries(VARIANTS[BF16], base.model.encoder, base.model.decoder)
        path, source = base.model.decoder.onnx_path(), "fp32 decoder file with the BF16 variant's runtime parameters"
    bf16 = base.with_decoder(entry, open_entry(entry, path, threads=threads))
    embedder = base
    if encoder == "bf16":
        enc = replace(base.model.encoder, runtime=OPENVINO_BF16)
        embedder = base.with_encoder(enc, open_entry(enc, base.model.encoder.onnx_path(), threads=threads))
    return base, bf16, embedder, source


def measure_decoders(repository: Path, runs: int, cases: int | None, threads: int, encoder: str,
                     data_dir: Path | None) -> dict:
    from export.dev_cases import check_evidence, dice
    from service.core.domain import Prompt

    base, bf16, embedder, source = predictors(repository, threads, encoder)
    evidence = check_evidence(data_dir, cases)
    sides = {"fp32": base, "bf16": bf16}
    prepared = []  # per prompt: its frame, the checked prompts and each side's decoder call
    for item in evidence.items:
        embedding = embedder.embed(item.pixels)
        checked = base.check_prompts([Prompt(box=item.box)], embedding.frame)
        calls = {k: next(iter(p.decoder_calls(embedding, checked))) for k, p in sides.items()}
        prepared.append((item, embedding.frame, checked, calls))

    def masks(side: str, i: int) -> np.ndarray:
        _, frame, checked, calls = prepared[i]
        indices, call = calls[side]
        low, _ = sides[side].logits_from([(indices, sides[side].call(call))], checked)
        return sides[side].masks(low, frame)[0]

    got = {k: [masks(k, i) for i in range(len(prepared))] for k in sides}
    agreement = [dice(a, b) for a, b in zip(got["fp32"], got["bf16"])]
    truth = {k: [dice(m, item.mask) for m, (item, *_) in zip(v, prepared)] for k, v in got.items()
             } if evidence.kind == "dev" else {}
    for side, predictor in sides.items():  # warm-up (OpenVINO compiles the dynamic shapes lazily)
        for _ in range(WARMUP):
            predictor.call(prepared[0][3][side][1])
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(runs):
        calls = prepared[r % len(prepared)][3]
        for side in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            call = calls[side][1]
            start = time.perf_counter()
            sides[side].call(call)
            seconds[side].append(time.perf_counter() - start)
    return {"seconds": seconds, "agreement": agreement, "truth": truth, "evidence": evidence.describe(),
            "kind": evidence.kind, "prompts": len(prepared), "bf16_source": source}


def _ms(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q))


def render_section(r: dict) -> str:
    fp32, bf16 = (r["seconds"][k] for k in ("fp32", "bf16"))
    m32, m16 = 1000 * statistics.median(fp32), 1000 * statistics.median(bf16)
    lines = ["## Prompt decoder: fp32 (ONNX Runtime) vs BF16 (OpenVINO)", "",
             f"- Machine: {r['machine']}; native BF16 (avx512_bf16 or amx_bf16): {'yes' if r['native'] else 'NO'}",
             f"- Date: {r['date']}", f"- Command: `{r['command']}`",
             f"- Load average (1/5/15 min) at start: {r['load_start']}, at end: {r['load_end']}",
             f"- In process, the `medsam_lite_decoder` ONNX file run as the embedded backend opens it (threads: "
             f"{r['threads'] or 'all cores'}); BF16: the {r['bf16_source']}. Embeddings of the {r['encoder']} "
             f"encoder on {r['evidence']}. One single-box prompt per call; {len(fp32)} timed calls of each, "
             f"interleaved, cycling over the {r['prompts']} prompts, after {WARMUP} warm-up calls each.", "",
             "| decoder | runtime | median ms per single-box call | p10 - p90 ms | timed calls |",
             "|---|---|---:|---:|---:|",
             f"| fp32 | ONNX Runtime, fp32 | {m32:.1f} | {_ms(fp32, 10):.1f} - {_ms(fp32, 90):.1f} | {len(fp32)} |",
             f"| BF16 | OpenVINO, BF16 inference precision | {m16:.1f} | {_ms(bf16, 10):.1f} - {_ms(bf16, 90):.1f} | "
             f"{len(bf16)} |", "",
             f"BF16 takes {m16 / m32:.2f}x the fp32 time: {abs(m32 - m16):.1f} ms "
             f"{'saved' if m16 <= m32 else 'lost'} per decoder call, i.e. per new-image request of one box.", "",
             "| mask agreement | value |", "|---|---:|",
             f"| mean Dice of the BF16 decoder's masks with the fp32 decoder's ({r['prompts']} prompts) | "
             f"{np.mean(r['agreement']):.4f} |",
             f"| worst prompt | {min(r['agreement']):.4f} |"]
    if r["truth"]:
        t = r["truth"]
        lines.append(f"| mean Dice vs the reference masks: fp32 / BF16 decoder | {np.mean(t['fp32']):.4f} / "
                     f"{np.mean(t['bf16']):.4f} |")
    start = float(r["load_start"].split("/")[0])
    if start > 0.5:
        lines += ["", f"Note: the 1-minute load average was {start:.1f} at the start on {r['cores']} cores: other "
                      "jobs shared the CPU, so the times are inflated and noisier than on a quiet machine."]
    return "\n".join(lines) + "\n"



def main(argv: list[str] | None = None) -> int:
    from service.inference.model_choice import cpu_flags, runs_natively

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed decoder calls of each (default 50)")
    parser.add_argument("--cases", type=int, default=8, help="images (dev cases or shipped images; default 8)")
    parser.add_argument("--threads", type=int, default=0, help="threads per call, as --ort-threads (0: all cores)")
    parser.add_argument("--encoder", choices=("fp32", "bf16"), default="fp32", help="which encoder embeds the images")
    parser.add_argument("--data-dir", type=Path, default=None, help="dev cases (default ../shared/data/dev)")
    parser.add_argument("--repository", type=Path, default=REPO / "model_repository")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.runs < 1 or args.cases < 1:
        parser.error("--runs and --cases must be at least 1")
    shown = sys.argv[1:] if argv is None else argv
    results = {"machine": measure.machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python bench/bf16_decoder.py", *shown]), "load_start": measure.load_average(),
               "native": runs_natively(BF16, cpu_flags()), "threads": args.threads, "encoder": args.encoder,
               "cores": os.cpu_count()}
    results.update(measure_decoders(args.repository, args.runs, args.cases, args.threads, args.encoder,
                                    args.data_dir))
    results["load_end"] = measure.load_average()
    section = render_section(results)
    write_section(args.out, SECTION, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
