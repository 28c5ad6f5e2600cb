"""The served prompt decoder of every SAM-family model: SAM's prompt encoder + mask decoder
taking exactly the gateway's tensors (:mod:`service.core.prompts` feeds them).

Inputs ``image_embeddings`` ``(1, 256, 64, 64)``, ``point_coords`` ``(P, N, 2)`` in the model's
pixel-index frame, ``point_labels`` ``(P, N)`` (1 foreground, 0 background, 2/3 box top-left /
bottom-right corner, -1 padding), ``mask_input`` ``(P, 1, 256, 256)`` low-res logits,
``has_mask_input`` ``(P, 1)`` 0/1; outputs ``low_res_masks`` ``(P, K, 256, 256)`` logits and
``iou_predictions`` ``(P, K)``, where K is 1 (the single-mask token: LiteMedSAM, MedSAM) or 4
(SAM: the single-mask token, then the three multimask candidates; the gateway picks one,
:func:`service.inference.predictor.choose`, or returns the three).

A box given as two corner points labelled 2 and 3 embeds exactly as the prompt encoder's own
box path, so a box-only prompt reproduces the model's ``forward`` bit for bit. No control
flow depends on the inputs, so one graph serves every prompt shape.
"""

from __future__ import annotations

import torch
from torch import nn

from service.backends.repository import GatewayParameters, RepositoryEntry, Role, TensorSpec

INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUTS = ("low_res_masks", "iou_predictions")
DYNAMIC_AXES = {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
                "mask_input": {0: "prompts"}, "has_mask_input": {0: "prompts"},
                "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}


class PromptDecoderForExport(nn.Module):
    """``net``'s prompt encoder and mask decoder for an ``input_size`` square input, answering
    ``outputs`` masks per prompt (1: token 0 only; 4: all of SAM's mask tokens)."""

    def __init__(self, net: nn.Module, input_size: int, outputs: int = 1) -> None:
        super().__init__()
        if outputs not in (1, 4):
            raise ValueError("a prompt decoder answers 1 mask per prompt or all 4 of SAM's mask tokens")
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        if outputs > self.mask_decoder.num_mask_tokens:
            raise ValueError(f"the mask decoder has {self.mask_decoder.num_mask_tokens} mask tokens, not {outputs}")
        self.input_size, self.outputs = input_size, outputs
        self.register_buffer("image_pe", net.prompt_encoder.get_dense_pe().detach(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (coords + 0.5) / self.input_size
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
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(self.outputs)],
                            dim=1)  # (P, K, C')
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, self.outputs, h, w)
        iou = md.iou_prediction_head(iou_token_out)[:, : self.outputs]
        return masks, iou


def example_inputs(input_size: int, embed_shape: tuple[int, int, int] = (256, 64, 64), low_res: int = 256,
                   prompts: int = 2, points: int = 3) -> dict[str, torch.Tensor]:
    """Export/check inputs: a click, a box and padding per prompt; the first with a mask."""
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(prompts, points, 2, generator=g) * input_size
    labels = torch.tensor([[1.0] + [2.0, 3.0] + [-1.0] * (points - 3)] * prompts)[:, :points]
    return {
        "image_embeddings": torch.randn(1, *embed_shape, generator=g),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": torch.randn(prompts, 1, low_res, low_res, generator=g),
        "has_mask_input": torch.tensor([[1.0]] + [[0.0]] * (prompts - 1)),
    }


def decoder_entry(model: str, version: str, outputs: int = 1, embed_shape: tuple[int, int, int] = (256, 64, 64),
                  low_res: int = 256) -> RepositoryEntry:
    """The repository entry ``MODEL_decoder`` of a :class:`PromptDecoderForExport` file."""
    return RepositoryEntry(
        name=f"{model}_decoder",
        inputs=(
            TensorSpec("image_embeddings", (1, *embed_shape)),
            TensorSpec("point_coords", (-1, -1, 2)),
            TensorSpec("point_labels", (-1, -1)),
            TensorSpec("mask_input", (-1, 1, low_res, low_res)),
            TensorSpec("has_mask_input", (-1, 1)),
        ),
        outputs=(TensorSpec("low_res_masks", (-1, outputs, low_res, low_res)),
                 TensorSpec("iou_predictions", (-1, outputs))),
        gateway=GatewayParameters(model=model, role=Role.PROMPT_DECODER, version=version),
    )
