"""Pre- and post-processing of a prompt-free segmenter (the trained U-Nets of ``training/``).

One function pair used by training *and* serving, so a served model sees exactly the inputs
it was trained on. numpy + Pillow only (the gateway must not depend on torch or MONAI).

Geometry is the gateway's SAM geometry (:func:`service.core.geometry.model_input`): the
longest side is resized to ``size`` (bilinear), the image is zero-padded at the
bottom/right to ``size x size``; :func:`postprocess` crops the un-padded region of the
logits and resizes it back bilinearly (:func:`service.core.geometry.upsample_logits`).

A *2.5-D* segmenter (``context`` > 0) takes slice ``k`` of a volume with its ``context``
neighbours on each side as channels, ``k - context .. k + context`` in slice order, an index
past the volume's end repeating the edge slice (:func:`context_indices`,
:func:`preprocess_context`): it segments volumes only, never a lone 2-D image.

Intensities are the gateway's decoded pixels (:func:`service.core.imageio.normalise`: native
intensities -> percentile 0.5-99.5 -> [0, 1] for a raw grey array); an RGB image is
averaged to grey.
"""

from __future__ import annotations

import numpy as np

from service.core.geometry import Frame, model_input, upsample_logits

__all__ = ["Frame", "context_indices", "input_channels", "preprocess", "preprocess_context", "postprocess",
           "resize_labels", "slice_inputs", "to_grey"]


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """float32 ``(H, W)``: ``pixels`` ``(H, W)`` unchanged, ``(H, W, 3)`` averaged over channels."""
    if pixels.ndim == 3:
        return np.ascontiguousarray(pixels.mean(axis=2), dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got shape {pixels.shape}")
    return np.ascontiguousarray(pixels, dtype=np.float32)


def preprocess(pixels: np.ndarray, size: int) -> tuple[np.ndarray, Frame]:
    """Decoded pixels -> the segmenter's input.

    ``pixels``: float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1] (the gateway's decoded image).
    Returns float32 ``(1, 1, size, size)`` (tensor ``image`` of the served model) and the
    :class:`Frame` that :func:`postprocess` needs.
    """
    tensor, frame = model_input(to_grey(pixels), size)
    return np.ascontiguousarray(tensor[:, :1]), frame


def input_channels(context: int) -> int:
    """Channels of a segmenter's input with ``context`` neighbouring slices on each side."""
    if context < 0:
        raise ValueError(f"context slices must be >= 0, not {context}")
    return 2 * context + 1


def context_indices(k: int, depth: int, context: int) -> list[int]:
    """The slices a 2.5-D input of slice ``k`` is made of, in channel order:
    ``k - context .. k + context``, each clipped to ``[0, depth - 1]`` (the edge slice repeats)."""
    if not 0 <= k < depth:
        raise ValueError(f"slice {k} is outside a volume of {depth} slices")
    input_channels(context)
    return [min(max(j, 0), depth - 1) for j in range(k - context, k + context + 1)]


def preprocess_context(slices: "list[np.ndarray]", size: int) -> tuple[np.ndarray, Frame]:
    """Neighbouring slices (decoded pixels of equal shape, channel order, the middle one the
    slice segmented) -> float32 ``(1, len(slices), size, size)``: each one as :func:`preprocess`
    places it, stacked as channels; the :class:`Frame` is theirs (all the same)."""
    if not slices:
        raise ValueError("a 2.5-D input needs at least one slice")
    parts = [preprocess(p, size) for p in slices]
    frames = {(f.height, f.width) for _, f in parts}
    if len(frames) != 1:
        raise ValueError(f"the slices of a 2.5-D input differ in shape: {sorted(frames)}")
    return np.ascontiguousarray(np.concatenate([t for t, _ in parts], axis=1)), parts[len(parts) // 2][1]


def slice_inputs(slice_pixels, depth: int, ks: "list[int]", size: int, context: int = 0) -> tuple[np.ndarray, Frame]:
    """A segmenter's batch for slices ``ks`` of a volume of ``depth`` slices, ``slice_pixels(j)``
    giving slice ``j``'s decoded pixels: float32 ``(len(ks), 2 * context + 1, size, size)`` (each
    slice with ``context`` neighbours on each side, :func:`context_indices`; 0: the slice alone)
    and the slices' :class:`Frame`. Each slice the batch needs is read and preprocessed once."""
    if not ks:
        raise ValueError("no slices to segment")
    need = sorted({j for k in ks for j in context_indices(k, depth, context)})
    placed = {j: preprocess(slice_pixels(j), size) for j in need}
    frames = {(f.height, f.width) for _, f in placed.values()}
    if len(frames) != 1:
        raise ValueError(f"the slices of a volume differ in shape: {sorted(frames)}")
    batch = np.concatenate([np.concatenate([placed[j][0] for j in context_indices(k, depth, context)], axis=1)
                            for k in ks])
    return np.ascontiguousarray(batch), placed[ks[0]][1]


def postprocess(logits: np.ndarray, frame: Frame) -> np.ndarray:
    """Served ``logits`` -> bool ``(H, W)`` foreground mask in input-image pixels.

    ``logits``: float32 ``(1, C, size, size)`` or ``(C, size, size)``, channel 0 background.
    C == 1: foreground where the logit > 0; C == 2: where ``logit[1] > logit[0]`` (the
    margin is resized, which equals resizing both channels: bilinear is linear); C > 2:
    any non-background channel wins the arg-max after resizing.
    """
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"postprocess takes one image's logits, got batch {x.shape[0]}")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected (C, S, S) logits, got shape {x.shape}")
    if x.shape[0] == 1:
        return upsample_logits(x, frame)[0] > 0.0
    if x.shape[0] == 2:
        return upsample_logits(x[1:2] - x[0:1], frame)[0] > 0.0
    return np.argmax(upsample_logits(x, frame), axis=0) != 0


def resize_labels(labels: np.ndarray, frame: Frame, ignore: int = -1) -> np.ndarray:
    """Integer label map ``(H, W)`` -> int64 ``(size, size)`` in the model frame.

    Nearest-neighbour resize of the un-padded region (value of the source pixel under
    each target pixel's centre); padding gets ``ignore``. Used for reference masks,
    scribbles and pseudo-labels so every label lives in the same frame as the input.
    """
    h, w = frame.resized_hw
    rows = np.minimum(((np.arange(h) + 0.5) * frame.height / h).astype(np.int64), frame.height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * frame.width / w).astype(np.int64), frame.width - 1)
    out = np.full((frame.size, frame.size), ignore, dtype=np.int64)
    out[:h, :w] = np.asarray(labels)[rows[:, None], cols[None, :]]
    return out
