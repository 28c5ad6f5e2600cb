"""Prompt validation against the image and the model, and the decoder's input tensors."""

from __future__ import annotations

import math

import numpy as np

from service.core import errors
from service.core.domain import Box, ModelInfo, Prompt, PromptKind
from service.core.geometry import Frame, box_to_model, points_to_model

_KIND_NAMES = {PromptKind.BOX: "box", PromptKind.POINT: "point", PromptKind.MASK: "mask"}


def _names(kinds) -> str:
    return ", ".join(sorted(_KIND_NAMES[k] for k in kinds)) or "none"


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def check_box(box: Box, index: int, height: int, width: int) -> Box:
    """Reject NaN, zero/negative area and boxes entirely outside the image; clip the rest."""
    if not _finite(box.x0, box.y0, box.x1, box.y1):
        raise errors.InvalidPrompt(f"prompt {index}: box has a non-finite coordinate")
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise errors.InvalidPrompt(f"prompt {index}: box ({box.x0:g}, {box.y0:g}, {box.x1:g}, {box.y1:g}) has "
                                   "zero or negative area; send XYXY with x0 < x1 and y0 < y1")
    if box.x1 <= 0 or box.y1 <= 0 or box.x0 >= width or box.y0 >= height:
        raise errors.InvalidPrompt(f"prompt {index}: box ({box.x0:g}, {box.y0:g}, {box.x1:g}, {box.y1:g}) lies "
                                   f"outside the {width}x{height} image (coordinates are input-image pixels)")
    return Box(max(box.x0, 0.0), max(box.y0, 0.0), min(box.x1, float(width)), min(box.y1, float(height)))


def validate(prompts: tuple[Prompt, ...], frame: Frame, model: ModelInfo, max_prompts: int,
             low_res: tuple[int, int]) -> list[Prompt]:
    """Checked prompts (boxes clipped to the image), or a client error explaining what is wrong."""
    if not prompts:
        raise errors.InvalidPrompt("at least one prompt is required")
    if len(prompts) > max_prompts:
        raise errors.InvalidPrompt(f"{len(prompts)} prompts in one request; the limit is {max_prompts}")
    out = []
    for i, prompt in enumerate(prompts):
        kinds = prompt.kinds()
        if not kinds:
            raise errors.InvalidPrompt(f"prompt {i} is empty; give a box, points or a mask_input")
        unsupported = kinds - model.prompt_kinds
        if unsupported:
            raise errors.UnsupportedPrompt(
                f"prompt {i}: model {model.name!r} does not accept {_names(unsupported)} prompts; "
                f"it accepts {_names(model.prompt_kinds)} (see ListModels)")
        missing = model.required_prompt_kinds - kinds
        if missing:
            raise errors.UnsupportedPrompt(f"prompt {i}: model {model.name!r} needs a {_names(missing)} "
                                           "in every prompt (it was trained with them)")
        box = None if prompt.box is None else check_box(prompt.box, i, frame.height, frame.width)
        for p in prompt.points:
            if not _finite(p.x, p.y) or not (0 <= p.x <= frame.width and 0 <= p.y <= frame.height):
                raise errors.InvalidPrompt(f"prompt {i}: point ({p.x:g}, {p.y:g}) is outside the "
                                           f"{frame.width}x{frame.height} image")
        mask = prompt.mask_input
        if mask is not None:
            if mask.shape != low_res:
                raise errors.InvalidPrompt(f"prompt {i}: mask_input is {mask.shape[0]}x{mask.shape[1]}; model "
                                           f"{model.name!r} takes {low_res[0]}x{low_res[1]} low-res logits")
            if not np.isfinite(mask).all():
                raise errors.InvalidPrompt(f"prompt {i}: mask_input contains NaN or infinity")
        out.append(Prompt(box=box, points=prompt.points, mask_input=mask))
    return out


def sparse_points(prompt: Prompt, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """SAM's sparse input of one prompt: points first, then the box as corners labelled 2 and 3;
    without a box a padding point (label -1) is appended, as SAM's own predictor does."""
    coords, labels = points_to_model(prompt.points, frame)
    if prompt.box is not None:
        coords = np.concatenate([coords, box_to_model(prompt.box, frame).reshape(2, 2)])
        labels = np.concatenate([labels, np.array([2.0, 3.0], dtype=np.float32)])
    else:
        coords = np.concatenate([coords, np.zeros((1, 2), dtype=np.float32)])
        labels = np.concatenate([labels, np.array([-1.0], dtype=np.float32)])
    return coords, labels


def decoder_batches(prompts: list[Prompt], frame: Frame, low_res: tuple[int, int]):
    """Group prompts with the same number of sparse points into one decoder call each.

    Yields ``(indices, feeds)`` with feeds ``point_coords (P, N, 2)``, ``point_labels (P, N)``,
    ``mask_input (P, 1, h, w)`` and ``has_mask_input (P, 1)``.
    """
    groups: dict[int, list[int]] = {}
    sparse = [sparse_points(p, frame) for p in prompts]
    for i, (coords, _) in enumerate(sparse):
        groups.setdefault(len(coords), []).append(i)
    for indices in groups.values():
        masks = np.zeros((len(indices), 1, *low_res), dtype=np.float32)
        has = np.zeros((len(indices), 1), dtype=np.float32)
        for j, i in enumerate(indices):
            if prompts[i].mask_input is not None:
                masks[j, 0], has[j, 0] = prompts[i].mask_input, 1.0
        yield indices, {
            "point_coords": np.stack([sparse[i][0] for i in indices]),
            "point_labels": np.stack([sparse[i][1] for i in indices]),
            "mask_input": masks,
            "has_mask_input": has,
        }
