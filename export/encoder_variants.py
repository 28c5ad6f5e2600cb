"""Faster CPU variants of the LiteMedSAM image encoder, each behind the dev Dice guard.

* ``medsam_lite_int8``: ONNX Runtime dynamic quantisation of the encoder's MatMul/Gemm weights
  (int8, activations quantised per call; VNNI u8s8 kernels). Convolutions stay fp32: static
  QDQ of the whole encoder broke the embeddings (measured, docs/BENCHMARKS.md).
* ``medsam_lite_bf16``: the fp32 ONNX file run by OpenVINO with BF16 inference precision
  (``inference_runtime: openvino``, ``inference_precision: bf16`` in config.pbtxt): matrix
  products in BF16 on CPUs with AVX512-BF16 or AMX, accumulation and sensitive ops in fp32.

Each is served as its own model sharing the fp32 prompt decoder, and is written only if it
passes its guard (:func:`export.dice_guard.guard_variant`): with the dev cases, a mean Dice
(reference-box prompts) at most ``MAX_DICE_DROP`` below the fp32 encoder's; on a bare clone
without them, a mean agreement (Dice) of at least ``MIN_AGREEMENT`` with the fp32 model's masks
on the images shipped with pydicom. The guard prints which evidence it used. Both are CPU
variants: on GPU nodes the TensorRT FP16 engines play this role.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from export.dev_cases import check_evidence
from export.dice_guard import MAX_DICE_DROP, MIN_AGREEMENT, guard_variant
from export.medsam_lite import export_medsam_lite, medsam_lite_entries
from export.options import ExportOptions
from export.triton_config import write_config
from service.backends.repository import ONNX_FILENAME, RuntimeParameters

log = logging.getLogger(__name__)


def _quantize_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


@dataclass(frozen=True)
class EncoderVariant:
    name: str                       # gateway model name; the encoder entry is NAME_encoder
    version_suffix: str             # appended to the fp32 model's version
    description: str                # appended to the fp32 description
    write: Callable[[Path, Path], None]  # (fp32 ONNX, output ONNX)
    runtime: RuntimeParameters      # how the runtimes run the entry (see service/backends/runtimes.py)


VARIANTS = {
    "medsam_lite_int8": EncoderVariant(
        "medsam_lite_int8", "-int8", "INT8 encoder (dynamic MatMul quantisation, ONNX Runtime) for CPUs with VNNI",
        _quantize_int8, RuntimeParameters()),
    "medsam_lite_bf16": EncoderVariant(
        "medsam_lite_bf16", "-bf16", "BF16 encoder (OpenVINO, BF16 inference precision) for CPUs with AVX512-BF16 "
        "or AMX", shutil.copyfile, RuntimeParameters(runtime="openvino", precision="bf16")),
}


def export_encoder_variant(variant: EncoderVariant, opts: ExportOptions, data_dir: Path | None = None,
                           limit: int | None = None) -> list[Path]:
    """Write ``variant``'s encoder entry next to the fp32 LiteMedSAM entries (exported first if
    missing) if it passes its guard on ``limit`` images (all by default) of the evidence found
    for ``data_dir`` (default: ``opts.data_dir``, else ``../shared/data/dev``; without dev cases
    the shipped images); raises ``RuntimeError`` (nothing written) if it fails."""
    if opts.target != "cpu":
        raise ValueError(f"{variant.name} is a CPU variant; on GPU nodes use medsam_lite_tensorrt")
    fp32_entry, decoder_entry = medsam_lite_entries()
    fp32 = opts.repository / fp32_entry.name / str(opts.version) / ONNX_FILENAME
    decoder = opts.repository / decoder_entry.name / str(opts.version) / ONNX_FILENAME
    if not (fp32.is_file() and decoder.is_file()):
        export_medsam_lite(replace(opts, force=False))
    fp32_gateway = fp32_entry.gateway
    entry = replace(fp32_entry, name=f"{variant.name}_encoder", runtime=variant.runtime, gateway=replace(
        fp32_gateway, model=variant.name, decoder=decoder_entry.name,
        version=fp32_gateway.version + variant.version_suffix,
        description=f"{fp32_gateway.description}; {variant.description}"))
    out = opts.repository / entry.name / str(opts.version) / ONNX_FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    variant.write(fp32, tmp)
    from service.inference.predictor import SamPredictor

    fp32_predictor = SamPredictor.from_repository(opts.repository, "medsam_lite", version=opts.version)
    try:
        evidence = check_evidence(data_dir if data_dir is not None else opts.data_dir, limit)
        score = guard_variant(fp32_predictor, fp32_predictor.with_encoder(entry, tmp), evidence, f"{variant.name} guard")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    passed = (f"mean Dice within {MAX_DICE_DROP} of fp32 on {evidence.images} dev cases (drop {score:+.4f})"
              if evidence.kind == "dev" else
              f"no dev cases at export: mean mask Dice {score:.4f} (>= {MIN_AGREEMENT}) with fp32 on "
              f"{len(evidence.items)} prompts of {evidence.images} images shipped with pydicom")
    entry = replace(entry, gateway=replace(entry.gateway, description=f"{entry.gateway.description}, {passed}"))
    tmp.replace(out)
    return [out, write_config(opts.repository, entry, opts.target, version=opts.version)]
