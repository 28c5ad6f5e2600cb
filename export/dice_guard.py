"""Dice of an encoder + decoder pair on the dev cases, and the guard every faster variant passes.

A variant (INT8 or BF16 encoder, TensorRT engines) is kept only if its mean Dice on the dev
cases, each prompted with its reference box, is within ``MAX_DICE_DROP`` of the fp32 models'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from export.dev_cases import dice, load_cases, reference_box

MAX_DICE_DROP = 0.005

# feeds by input name -> outputs by output name
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def session_runner(path: Path, parameters: dict[str, str] | None = None, batch_axis: bool = False) -> Runner:
    """A runner on the gateway's own runtime module (ONNX Runtime unless ``parameters`` say
    ``inference_runtime: openvino``), so the guard measures what is served."""
    from service.backends.runtimes import open_session

    session = open_session(path, parameters or {}, batch_axis=batch_axis)
    return lambda feeds: dict(zip(session.output_names, session.run(session.output_names, feeds)))


def dev_dice(encoder: Runner, decoder: Runner, data_dir: Path, limit: int | None = None) -> list[float]:
    """Per-case Dice against the reference masks, prompted with each case's reference box."""
    from export.reference import raw_input
    from service.core import geometry as st
    from service.core.imageio import decode_image

    scores = []
    for case in load_cases(data_dir, limit):
        tensor, frame = st.model_input(decode_image(raw_input(case.image)).pixels, 256)
        box = st.box_to_model(reference_box(case.mask), frame).reshape(1, 2, 2)
        emb = encoder({"image": tensor})["image_embeddings"]
        low = decoder({"image_embeddings": emb, "point_coords": box,
                       "point_labels": np.array([[2.0, 3.0]], np.float32),
                       "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                       "has_mask_input": np.zeros((1, 1), np.float32)})["low_res_masks"]
        scores.append(dice(st.upsample_logits(low[:, 0], frame)[0] > 0, case.mask))
    return scores


def check_drop(base: list[float], variant: list[float], what: str, limit: float = MAX_DICE_DROP,
               two_sided: bool = False) -> float:
    """Mean Dice drop of ``variant`` against ``base``; raises ``RuntimeError`` past ``limit``
    (``two_sided``: a gain that large fails too, as for engines that must equal the base)."""
    drop = float(np.mean(base) - np.mean(variant))
    print(f"{what} on {len(base)} dev cases: mean Dice base {np.mean(base):.4f}, variant {np.mean(variant):.4f}, "
          f"drop {drop:+.4f} (limit {limit})")
    if drop > limit or (two_sided and abs(drop) > limit):
        raise RuntimeError(f"{what}: mean Dice changes by {-drop:+.4f} on the dev cases (limit {limit})")
    return drop
