"""Faster CPU variants of the LiteMedSAM image encoder, each behind the dev Dice guard.

* ``medsam_lite_int8``: ONNX Runtime dynamic quantisation of the encoder's MatMul/Gemm weights
  (int8, activations quantised per call; VNNI u8s8 kernels). Convolutions stay fp32: static
  QDQ of the whole encoder broke the embeddings (measured, docs/BENCHMARKS.md).
* ``medsam_lite_bf16``: the fp32 ONNX file run by OpenVINO with BF16 inference precision
  (``inference_runtime: openvino``, ``inference_precision: bf16`` in config.pbtxt): matrix
  products in BF16 on CPUs with AVX512-BF16 or AMX, accumulation and sensitive ops in fp32.

Each is served as its own model sharing the fp32 prompt decoder, and is written only if its
mean Dice on the dev cases (reference-box prompts) is at most ``MAX_DICE_DROP`` below the
fp32 encoder's. Both are CPU variants: on GPU nodes the TensorRT FP16 engines play this role.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from export.dev_cases import SHARED_DATA
from export.dice_guard import MAX_DICE_DROP, check_drop, dev_dice, session_runner
from export.registry import ExportOptions, export_medsam_lite, medsam_lite_entries
from export.triton_config import ONNX_FILENAME, write_config

log = logging.getLogger(__name__)


def _quantize_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


@dataclass(frozen=True)
class EncoderVariant:
    name: str                       # gateway model name; the encoder entry is NAME_encoder
    version_suffix: str             # appended to medseg.version
    description: str                # appended to the fp32 description
    write: Callable[[Path, Path], None]  # (fp32 ONNX, output ONNX)
    parameters: dict[str, str]      # runtime parameters of the entry (see service/backends/runtimes.py)


VARIANTS = {
    "medsam_lite_int8": EncoderVariant(
        "medsam_lite_int8", "-int8", "INT8 encoder (dynamic MatMul quantisation, ONNX Runtime) for CPUs with VNNI",
        _quantize_int8, {}),
    "medsam_lite_bf16": EncoderVariant(
        "medsam_lite_bf16", "-bf16", "BF16 encoder (OpenVINO, BF16 inference precision) for CPUs with AVX512-BF16 "
        "or AMX", shutil.copyfile, {"inference_runtime": "openvino", "inference_precision": "bf16"}),
}


def export_encoder_variant(variant: EncoderVariant, opts: ExportOptions, data_dir: Path = SHARED_DATA / "dev",
                           limit: int | None = None) -> list[Path]:
    """Write ``variant``'s encoder entry next to the fp32 LiteMedSAM entries (exported first if
    missing) if it passes the Dice guard on ``limit`` dev cases (all by default)."""
    if opts.target != "cpu":
        raise ValueError(f"{variant.name} is a CPU variant; on GPU nodes use medsam_lite_tensorrt")
    fp32_entry, decoder_entry = medsam_lite_entries()
    fp32 = opts.repository / fp32_entry.name / str(opts.version) / ONNX_FILENAME
    decoder = opts.repository / decoder_entry.name / str(opts.version) / ONNX_FILENAME
    if not (fp32.is_file() and decoder.is_file()):
        export_medsam_lite(replace(opts, force=False))
    params = fp32_entry.parameters
    entry = replace(fp32_entry, name=f"{variant.name}_encoder", parameters={
        **params, **variant.parameters, "medseg.model": variant.name, "medseg.decoder": decoder_entry.name,
        "medseg.version": params["medseg.version"] + variant.version_suffix,
        "medseg.description": f"{params['medseg.description']}; {variant.description}, mean Dice within "
                              f"{MAX_DICE_DROP} of fp32 on the dev cases"})
    out = opts.repository / entry.name / str(opts.version) / ONNX_FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    variant.write(fp32, tmp)
    dec = session_runner(decoder)
    try:
        base = dev_dice(session_runner(fp32, batch_axis=True), dec, data_dir, limit)
        check_drop(base, dev_dice(session_runner(tmp, variant.parameters, batch_axis=True), dec, data_dir, limit),
                   f"{variant.name} guard")
    except RuntimeError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return [out, write_config(opts.repository, entry, opts.target, version=opts.version)]
