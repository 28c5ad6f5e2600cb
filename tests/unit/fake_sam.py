"""A fake, controllable backend behind the real LiteMedSAM repository entries, so the real
pipeline, gateway and servicer run in process without ONNX Runtime: the encoder can be held
on a gate (a slow or hung model), every call is counted, and the decoder answers a box-shaped
blob (or logits the test chooses)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np

from service.backends.repository import SamModel, discover

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def sam_model(name: str = "medsam_lite") -> SamModel:
    model = discover(REPOSITORY, name)[name]
    assert isinstance(model, SamModel)
    return model


class FakeSamBackend:
    """``infer`` of the encoder waits on :attr:`encoder_gate` when set (and records that it
    started in :attr:`encoder_started`); the decoder returns :attr:`logits` (``(h, w)`` float32,
    default a positive square in the middle) for every prompt."""

    name = "fake"
    retry_start = False

    def __init__(self, model: SamModel | None = None) -> None:
        model = model or sam_model()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.calls: Counter[str] = Counter()
        self.encoder_gate: asyncio.Event | None = None
        self.encoder_started: asyncio.Event | None = None
        self.timeouts: list[float | None] = []
        self.fail: Exception | None = None  # raised by the encoder (after its gate)
        low = self.decoder.outputs[0].dims[-2:]
        self.logits = np.full(tuple(low), -8.0, np.float32)
        self.logits[low[0] // 4: 3 * low[0] // 4, low[1] // 4: 3 * low[1] // 4] = 8.0

    async def start(self, models) -> None:
        pass

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def infer(self, model, inputs, outputs, timeout=None):
        self.calls[model] += 1
        self.timeouts.append(timeout)
        if model.endswith("_encoder"):  # an image encoder (a variant may share the decoder or have its own)
            if self.encoder_started is not None:
                self.encoder_started.set()
            if self.encoder_gate is not None:
                await asyncio.wait_for(self.encoder_gate.wait(), timeout)
            if self.fail is not None:
                raise self.fail
            batch = next(iter(inputs.values())).shape[0]
            return {outputs[0]: np.zeros((batch, *self.encoder.outputs[0].dims), np.float32)}
        n = inputs["point_coords"].shape[0]
        masks = np.broadcast_to(self.logits, (n, 1, *self.logits.shape)).copy()
        return {outputs[0]: masks, outputs[1]: np.full((n, 1), 0.9, np.float32)}


def zero_answer(inputs: dict, outputs: list[str], embedding_shape=(256, 64, 64), low_res=(256, 256)) -> dict:
    """What a LiteMedSAM-shaped backend answers with zeros: embeddings for an encoder call (its
    feeds have no ``point_coords``), single-mask logits and IoUs for a decoder call."""
    if "point_coords" not in inputs:
        return {outputs[0]: np.zeros((len(next(iter(inputs.values()))), *embedding_shape), np.float32)}
    prompts = len(inputs["point_coords"])
    return {outputs[0]: np.zeros((prompts, 1, *low_res), np.float32), outputs[1]: np.zeros((prompts, 1), np.float32)}
