"""The synchronous 3-D predictor: :mod:`service.inference.propagation` on one
:class:`service.core.volume.Volume` with a :class:`SamPredictor` (sessions in this process).

What the evaluation (``bench/evaluate_volumes.py``) and the volume pseudo-labels of
``training/`` run: the same pieces, rules, prompts, masks and feature check as the
gateway's :class:`service.inference.volumes.VolumeService`, which drives the same
generators through its backend. Slice embeddings are kept (all of them, or the ``keep``
most recent) so that corrections and other structures of the same volume reuse them.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from service.core.domain import Prompt
from service.core.volume import Volume
from service.inference import propagation as prop
from service.inference.predictor import Embedding, SamPredictor


class VolumePredictor:
    def __init__(self, predictor: SamPredictor, volume: Volume, rules: prop.Rules = prop.Rules(),
                 keep: int | None = None) -> None:
        self.predictor, self.volume, self.rules = predictor, volume, rules
        self._embeddings: OrderedDict[int, Embedding] = OrderedDict()
        self._keep = keep
        self.encoder_s: dict[int, float] = {}   # seconds the encoder took per slice (first time)
        self.decode_s = 0.0
        self.decodes = 0

    def embed(self, k: int) -> Embedding:
        emb = self._embeddings.get(k)
        if emb is not None:
            self._embeddings.move_to_end(k)
            return emb
        start = time.perf_counter()
        emb = self.predictor.embed(self.volume.slice_pixels(k))
        self.encoder_s.setdefault(k, time.perf_counter() - start)
        self._embeddings[k] = emb
        if self._keep is not None and len(self._embeddings) > self._keep:
            self._embeddings.popitem(last=False)
        return emb

    def decode(self, k: int, embedding: Embedding, prompt: Prompt) -> prop.Decoded:
        start = time.perf_counter()
        logits, ious = self.predictor.predict(embedding, [prompt])
        mask = self.predictor.masks(logits, embedding.frame)[0]
        out = prop.Decoded(mask, float(np.clip(ious[0], 0.0, 1.0)), logits[0],
                           prop.mask_feature(embedding.tensor, logits[0]))
        self.decode_s += time.perf_counter() - start
        self.decodes += 1
        return out

    def box_mask(self, k: int, prompt: Prompt) -> np.ndarray:
        """bool ``(H, W)``: slice ``k`` segmented with ``prompt`` alone (model orientation)."""
        return self.decode(k, self.embed(k), prompt).mask

    def run(self, state: prop.State, done: dict[tuple, prop.PieceResult] | None = None
            ) -> dict[tuple, prop.PieceResult]:
        """The piece results of ``state`` (reusing ``done``'s)."""
        return prop.drive(prop.run_state(state, self.rules, self.volume.slice_shape, done or {}),
                          self.embed, self.decode)

    def masks(self, results: dict[tuple, prop.PieceResult]) -> np.ndarray:
        """bool ``(Z, H, W)`` in model orientation."""
        out = np.zeros((self.volume.depth, *self.volume.slice_shape), dtype=bool)
        for k, r in prop.slices_of(results.values()).items():
            out[k] = r.mask
        return out


class Segment:
    """One structure's interactions on a :class:`VolumePredictor`, like a gateway session."""

    def __init__(self, vp: VolumePredictor, bounds: tuple[int, int] | None = None) -> None:
        self.vp = vp
        self.state = prop.State(bounds=bounds or (0, vp.volume.depth - 1))
        self.done: dict[tuple, prop.PieceResult] = {}
        self.results: dict[tuple, prop.PieceResult] = {}

    def apply(self, step: prop.Interaction) -> np.ndarray:
        """Apply ``step`` (clicks: in model-orientation pixels of their slice); returns the
        segment's bool ``(Z, H, W)`` masks (model orientation). A step the model refuses (e.g.
        clicks for a model without point prompts: ``UnsupportedPrompt``) leaves the segment
        as it was."""
        state = self.state.apply(step, self.slices())
        results = self.vp.run(state, self.done)
        self.state, self.results = state, results
        self.done.update(results)
        return self.vp.masks(results)

    def slices(self) -> dict[int, prop.SliceResult]:
        """The segment's slices now (those with a result)."""
        return prop.slices_of(self.results.values())
