"""Faster CPU variants of LiteMedSAM, each behind the dev Dice guard.

* ``medsam_lite_int8``: ONNX Runtime dynamic quantisation of the encoder's MatMul/Gemm weights
  (int8, activations quantised per call; VNNI u8s8 kernels). Convolutions stay fp32: static
  QDQ of the whole encoder broke the embeddings (measured, docs/BENCHMARKS.md). It shares the
  fp32 prompt decoder (``medsam_lite_decoder``).
* ``medsam_lite_int8_static``: static post-training INT8 of the encoder by NNCF (weights and
  activations; transformer mode: softmax, layer norms and the like stay in floating point;
  calibrated on the images shipped with pydicom, so a bare clone writes the same file), saved
  as OpenVINO IR (``model.xml`` + ``model.bin``: OpenVINO does not read NNCF's QDQ ONNX of
  this encoder) and run by OpenVINO with BF16 for what is not quantised; VNNI u8s8 kernels.
  Measured ~0.75-0.8x the BF16 encoder's time on an AVX512-VNNI CPU (docs/BENCHMARKS.md).
  SmoothQuant is off: with it the dev Dice drop was +0.0083 against +0.0034 without. Its own
  BF16 prompt decoder, as ``medsam_lite_bf16``.
* ``medsam_lite_bf16``: the fp32 ONNX files run by OpenVINO with BF16 inference precision
  (``inference_runtime: openvino``, ``inference_precision: bf16`` in config.pbtxt): matrix
  products in BF16 on CPUs with AVX512-BF16 or AMX, accumulation and sensitive ops in fp32.
  Both its image encoder and its prompt decoder: it has its own decoder entry
  ``medsam_lite_bf16_decoder``, a copy of the fp32 decoder's file (:attr:`EncoderVariant.decoder_runtime`;
  bench/bf16_decoder.py measures that decoder against the fp32 one).

Each is served as its own model (its encoder entry names its decoder in ``medseg.decoder``), and
is written only if it passes its guard (:func:`export.dice_guard.guard_variant`), which runs the
whole variant (its encoder, and its own decoder where it has one): with the dev cases, a mean
Dice (reference-box prompts) at most ``MAX_DICE_DROP`` below the fp32 model's; on a bare clone
without them, a mean agreement (Dice) of at least ``MIN_AGREEMENT`` with the fp32 model's masks
on the images shipped with pydicom. The guard prints which evidence it used; a failed guard
writes nothing (neither file). Both are CPU variants: on GPU nodes the TensorRT FP16 engines
play this role.
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
from export.memory_probe import write_measured_config
from service.backends.repository import ONNX_FILENAME, RepositoryEntry, RuntimeParameters
from service.core.geometry import model_input

log = logging.getLogger(__name__)


def _quantize_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


OPENVINO_IR = "model.xml"  # + model.bin beside it
CALIBRATION_IMAGES = 24
# The encoder's convolutional first stage (TinyViT's patch embedding and MBConv stage 0) is not
# quantised: it stays in BF16. Measured side by side on the 24 calibration images' first image,
# the 75 shipped-image prompts and the 40 dev cases (one probe run, this machine): quantising
# everything gave a relative embedding error of 0.28, agreement with fp32 0.851 (below the bare
# clone's guard, 0.87) and dev drop +0.0034; with the first stage in BF16: 0.12, 0.955, +0.0029,
# at 0.81x the BF16 encoder's time (0.76x quantising everything). Leaving out only the patch
# embedding did not help (0.35, 0.855); leaving out every convolution: 0.08, 0.966, 0.86x.
FLOAT_SCOPE = (r".*/patch_embed/.*", r".*/layers\.0/.*")  # node name patterns (regular expressions)


def _quantize_static(fp32: Path, out: Path) -> None:
    """NNCF post-training INT8 of the encoder ``fp32`` (ONNX) into OpenVINO IR ``out`` (.xml,
    with its .bin), calibrated on the shipped images as the gateway prepares them; the nodes
    matching ``FLOAT_SCOPE`` stay in floating point (BF16 when OpenVINO runs it)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from export.dev_cases import shipped_images

    logging.getLogger("nncf").setLevel(logging.WARNING)  # not a line per node left out of FLOAT_SCOPE
    model = ov.Core().read_model(str(fp32))
    port = model.inputs[0]
    size = port.get_partial_shape()[-1].get_length()
    calibration = [model_input(pixels, size)[0] for _, pixels in shipped_images(CALIBRATION_IMAGES)]
    name = port.get_any_name()
    quantized = nncf.quantize(
        model, nncf.Dataset(calibration, lambda tensor: {name: tensor}), subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(patterns=list(FLOAT_SCOPE)),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    ov.save_model(quantized, str(out), compress_to_fp16=False)


def _siblings(path: Path) -> list[Path]:
    """``path`` and, for OpenVINO IR, its weights file."""
    return [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])


@dataclass(frozen=True)
class EncoderVariant:
    name: str                       # gateway model name; the encoder entry is NAME_encoder
    version_suffix: str             # appended to the fp32 model's version (and its decoder's, if it has its own)
    description: str                # appended to the fp32 description
    write: Callable[[Path, Path], None]  # (fp32 ONNX, output ONNX)
    runtime: RuntimeParameters      # how the runtimes run the entry (see service/backends/runtimes.py)
    # None: the variant shares the fp32 prompt decoder. Set: it has its own decoder entry
    # NAME_decoder, run this way (e.g. OpenVINO BF16), written by decoder_write from the fp32
    # decoder's ONNX file (default: a copy of it).
    decoder_runtime: RuntimeParameters | None = None
    decoder_write: Callable[[Path, Path], None] = shutil.copyfile


OPENVINO_BF16 = RuntimeParameters(runtime="openvino", precision="bf16")
VARIANTS = {
    "medsam_lite_int8_static": EncoderVariant(
        "medsam_lite_int8_static", "-int8s", "static INT8 encoder (NNCF post-training quantisation, OpenVINO, BF16 "
        "elsewhere) and BF16 prompt decoder for CPUs with VNNI", _quantize_static,
        replace(OPENVINO_BF16, onnx_filename=OPENVINO_IR), decoder_runtime=OPENVINO_BF16),
    "medsam_lite_int8": EncoderVariant(
        "medsam_lite_int8", "-int8", "INT8 encoder (dynamic MatMul quantisation, ONNX Runtime) for CPUs with VNNI",
        _quantize_int8, RuntimeParameters()),
    "medsam_lite_bf16": EncoderVariant(
        "medsam_lite_bf16", "-bf16", "BF16 encoder and prompt decoder (OpenVINO, BF16 inference precision) for CPUs "
        "with AVX512-BF16 or AMX", shutil.copyfile, OPENVINO_BF16, decoder_runtime=OPENVINO_BF16),
}


def variant_entries(variant: EncoderVariant, fp32_encoder: RepositoryEntry, fp32_decoder: RepositoryEntry
                    ) -> tuple[RepositoryEntry, RepositoryEntry | None]:
    """``variant``'s encoder entry and its own decoder entry (``None``: it shares ``fp32_decoder``,
    which its encoder then names), derived from the fp32 LiteMedSAM entries."""
    decoder = None
    if variant.decoder_runtime is not None:
        g = fp32_decoder.gateway
        decoder = replace(fp32_decoder, name=f"{variant.name}_decoder", runtime=variant.decoder_runtime,
                          gateway=replace(g, model=variant.name, version=g.version + variant.version_suffix))
    g = fp32_encoder.gateway
    encoder = replace(fp32_encoder, name=f"{variant.name}_encoder", runtime=variant.runtime, gateway=replace(
        g, model=variant.name, decoder=(decoder or fp32_decoder).name, version=g.version + variant.version_suffix,
        description=f"{g.description}; {variant.description}"))
    return encoder, decoder


def _staged(out: Path) -> tuple[Path, list[Path]]:
    """The temporary file beside ``out`` to write first, and the folders made for it (removed
    again, if still empty, when the variant is refused)."""
    made = [d for d in (out.parent.parent, out.parent) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_suffix(".tmp" + out.suffix), made


def export_encoder_variant(variant: EncoderVariant, opts: ExportOptions, data_dir: Path | None = None,
                           limit: int | None = None) -> list[Path]:
    """Write ``variant``'s encoder entry (and its own decoder entry, if it has one) next to the
    fp32 LiteMedSAM entries (exported first if missing) if the whole variant passes its guard on
    ``limit`` images (all by default) of the evidence found for ``data_dir`` (default:
    ``opts.data_dir``, else ``../shared/data/dev``; without dev cases the shipped images); raises
    ``RuntimeError`` (nothing written) if it fails."""
    if opts.target != "cpu":
        raise ValueError(f"{variant.name} is a CPU variant; on GPU nodes use medsam_lite_tensorrt")
    fp32_entry, decoder_entry = medsam_lite_entries()
    fp32 = opts.repository / fp32_entry.name / str(opts.version) / ONNX_FILENAME
    decoder = opts.repository / decoder_entry.name / str(opts.version) / ONNX_FILENAME
    if not (fp32.is_file() and decoder.is_file()):
        export_medsam_lite(replace(opts, force=False))
    entry, own_decoder = variant_entries(variant, fp32_entry, decoder_entry)
    # (entry, source ONNX, writer): the encoder, then the variant's own decoder
    parts = [(entry, fp32, variant.write)] + ([(own_decoder, decoder, variant.decoder_write)] if own_decoder else [])
    staged: list[tuple[RepositoryEntry, Path, Path]] = []  # (entry, temporary file, final file)
    made: list[Path] = []
    from service.inference.predictor import SamPredictor

    try:
        for part, source, write in parts:
            out = opts.repository / part.name / str(opts.version) / part.runtime.onnx_filename
            tmp, folders = _staged(out)
            made += folders
            staged.append((part, tmp, out))
            write(source, tmp)
        fp32_predictor = SamPredictor.from_repository(opts.repository, "medsam_lite", version=opts.version)
        candidate = fp32_predictor.with_encoder(entry, staged[0][1])
        if own_decoder is not None:
            candidate = candidate.with_decoder(own_decoder, staged[1][1])
        evidence = check_evidence(data_dir if data_dir is not None else opts.data_dir, limit)
        score = guard_variant(fp32_predictor, candidate, evidence, f"{variant.name} guard")
    except BaseException:
        for _, tmp, _ in staged:
            for path in _siblings(tmp):
                path.unlink(missing_ok=True)
        # Folders this export made go whole (a bare clone's failed guard left config.pbtxt files
        # behind, and the gateway then refused to start on the half entry).
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    passed = (f"mean Dice within {MAX_DICE_DROP} of fp32 on {evidence.images} dev cases (drop {score:+.4f})"
              if evidence.kind == "dev" else
              f"no dev cases at export: mean mask Dice {score:.4f} (>= {MIN_AGREEMENT}) with fp32 on "
              f"{len(evidence.items)} prompts of {evidence.images} images shipped with pydicom")
    entry = replace(entry, gateway=replace(entry.gateway, description=f"{entry.gateway.description}, {passed}"))
    for _, tmp, out in staged:
        for path, final in zip(_siblings(tmp), _siblings(out)):
            path.replace(final)
    # Its own decoder first: the encoder entry, once written, makes the model servable and names it.
    written = [out for _, _, out in staged]
    for part in ([own_decoder] if own_decoder is not None else []) + [entry]:
        written.append(write_measured_config(opts.repository, part, opts.target, opts.version))
    return written
