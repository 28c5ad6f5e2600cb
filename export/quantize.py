"""INT8 variant of the LiteMedSAM image encoder for CPUs with VNNI, behind a Dice guard.

ONNX Runtime dynamic quantisation of the encoder's MatMul/Gemm weights (int8, activations
quantised per call; VNNI u8s8 kernels). Convolutions stay fp32: quantising them dynamically
is slower here and static QDQ of the whole encoder broke the embeddings (measured,
docs/BENCHMARKS.md). The variant is served as its own model, ``medsam_lite_int8``, sharing
the fp32 prompt decoder, and is written only if its mean Dice on the dev cases (reference-box
prompts) is at most ``MAX_DICE_DROP`` below the fp32 encoder's.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.dev_cases import SHARED_DATA, dice, load_cases, reference_box
from export.onnx_io import run_onnx
from export.registry import ExportOptions, export_medsam_lite, medsam_lite_entries
from export.triton_config import ONNX_FILENAME, write_config

log = logging.getLogger(__name__)
MAX_DICE_DROP = 0.005
NAME = "medsam_lite_int8"


def dev_dice(encoder: Path, decoder: Path, data_dir: Path, limit: int | None = None) -> list[float]:
    """Per-case Dice of encoder+decoder ONNX files on dev cases, prompted with the reference box."""
    from export.reference import raw_input
    from service import sam_transforms as st
    from service.imageio import decode_image

    scores = []
    for case in load_cases(data_dir, limit):
        tensor, frame = st.model_input(decode_image(raw_input(case.image)).pixels, 256)
        box = st.box_to_model(reference_box(case.mask), frame).reshape(1, 2, 2)
        (emb,) = run_onnx(encoder, {"image": tensor}, ["image_embeddings"])
        low, _ = run_onnx(decoder, {"image_embeddings": emb, "point_coords": box,
                                    "point_labels": np.array([[2.0, 3.0]], np.float32),
                                    "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                                    "has_mask_input": np.zeros((1, 1), np.float32)},
                          ["low_res_masks", "iou_predictions"])
        scores.append(dice(st.upsample_logits(low[:, 0], frame)[0] > 0, case.mask))
    return scores


def export_medsam_lite_int8(opts: ExportOptions, data_dir: Path = SHARED_DATA / "dev") -> list[Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_entry, decoder_entry = medsam_lite_entries()
    fp32 = opts.repository / fp32_entry.name / str(opts.version) / ONNX_FILENAME
    decoder = opts.repository / decoder_entry.name / str(opts.version) / ONNX_FILENAME
    if not (fp32.is_file() and decoder.is_file()):
        export_medsam_lite(replace(opts, force=False))
    entry = replace(fp32_entry, name=f"{NAME}_encoder", parameters={
        **fp32_entry.parameters, "medseg.model": NAME, "medseg.decoder": decoder_entry.name,
        "medseg.version": fp32_entry.parameters["medseg.version"] + "-int8",
        "medseg.description": fp32_entry.parameters["medseg.description"]
        + "; INT8 encoder (dynamic MatMul quantisation) for CPUs with VNNI, mean Dice within "
        f"{MAX_DICE_DROP} of fp32 on the dev cases"})
    out = opts.repository / entry.name / str(opts.version) / ONNX_FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    base, quant = dev_dice(fp32, decoder, data_dir), dev_dice(tmp, decoder, data_dir)
    drop = float(np.mean(base) - np.mean(quant))
    print(f"int8 guard on {len(base)} dev cases: mean Dice fp32 {np.mean(base):.4f}, int8 {np.mean(quant):.4f}, "
          f"drop {drop:+.4f} (limit {MAX_DICE_DROP})")
    if drop > MAX_DICE_DROP:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"INT8 encoder loses {drop:.4f} mean Dice (> {MAX_DICE_DROP}); not written")
    tmp.replace(out)
    return [out, write_config(opts.repository, entry, opts.target, version=opts.version)]
