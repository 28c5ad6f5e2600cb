"""The one LiteMedSAM-style predictor: embed an image once, then predict masks per prompt.

Modelled on segment-anything's ``SamPredictor`` and written *sans-IO*: every step that needs
a model returns a :class:`ModelCall` (repository model name, feeds, output names) and a
second step turns that call's outputs into the next value. Whoever holds a runtime runs the
calls:

* the gateway's async :class:`service.inference.pipeline.SamPipeline` with
  ``await backend.infer(call.model, call.inputs, call.outputs, timeout)``;
* the synchronous API here (:meth:`SamPredictor.embed`, :meth:`SamPredictor.predict`) with a
  :data:`Run` (sessions opened by :func:`service.backends.runtimes.open_session`, or any
  callable feeds -> outputs, such as a TensorRT engine runner), used by the export checks
  (parity, Dice guard), the pseudo-labels of ``training/`` and the benchmarks.

So all of them run the same preprocessing, prompt validation, decoder feeds and upsampling.
Tensor names, the input size, the low-resolution mask size and the embedding output all come
from the model's repository entries (``config.pbtxt``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from service.backends.repository import RepositoryEntry, SamModel, discover
from service.backends.runtimes import ModelSession, open_session
from service.core import prompts as prompt_rules
from service.core.domain import Prompt
from service.core.geometry import Frame, model_input, upsample_logits

DECODER_PROMPT_INPUTS = ("point_coords", "point_labels", "mask_input", "has_mask_input")

# (repository model name, feeds by input name, output names) -> outputs by name
Run = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]
# a session (``run(output_names, feeds) -> list``) or a callable feeds -> outputs by name
Runner = Union[ModelSession, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Embedding:
    """The encoder's output for one image and how that image sits in the model input."""

    tensor: np.ndarray
    frame: Frame


@dataclass(frozen=True)
class ModelCall:
    """One model run to make: ``outputs`` of repository model ``model`` on ``inputs``."""

    model: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]


def open_entry(entry: RepositoryEntry, path: Path | None = None, threads: int = 0, version: int = 1) -> ModelSession:
    """A session on ``path`` (default: the entry's own ONNX file) as the gateway opens it: the
    runtime the entry's parameters name, a batch axis when ``max_batch_size > 0``."""
    path = Path(path) if path is not None else entry.onnx_path(version)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m export` first (e.g. `python -m export "
                                f"{entry.gateway.model or 'medsam_lite'}`)")
    return open_session(path, entry.parameters, threads, batch_axis=entry.max_batch_size > 0)


def sessions_run(sessions: Mapping[str, Runner]) -> Run:
    """A :data:`Run` over ``{repository model name: session or callable}``."""
    sessions = dict(sessions)

    def run(model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        target = sessions.get(model)
        if target is None:
            raise KeyError(f"no session for repository model {model!r} (have {sorted(sessions)})")
        if hasattr(target, "run"):
            return dict(zip(outputs, target.run(list(outputs), feeds)))
        got = target(feeds)
        return {name: got[name] for name in outputs}

    return run


class SamPredictor:
    """Image encoder + prompt decoder of one :class:`SamModel`, step by step.

    ``run`` executes :class:`ModelCall` s for the synchronous API; without it only the sans-IO
    steps (:meth:`encoder_call`, :meth:`embedding`, :meth:`decoder_calls`, :meth:`logits_from`,
    :meth:`upsample`) are available.
    """

    def __init__(self, model: SamModel, run: Run | None = None) -> None:
        enc, dec = model.encoder, model.decoder
        missing = set(DECODER_PROMPT_INPUTS) - set(dec.input_names)
        if missing:
            raise ValueError(f"{dec.name}/config.pbtxt lacks decoder inputs {sorted(missing)}")
        mask_dims = tuple(next(t for t in dec.inputs if t.name == "mask_input").dims[-2:])
        if len(mask_dims) != 2 or min(mask_dims) <= 0:
            raise ValueError(f"{dec.name}/config.pbtxt: mask_input dims {mask_dims} do not fix the low-res size")
        self.model = model
        self.info = model.info
        self.input_size: int = model.info.input_size
        self.low_res: tuple[int, int] = (int(mask_dims[0]), int(mask_dims[1]))
        self._image_input = enc.inputs[0].name
        self._embedding_output = enc.outputs[0].name
        self._embedding_input = dec.inputs[0].name
        self._mask_output, self._iou_output = dec.output_names[:2]
        self._run = run

    # --- constructors -------------------------------------------------------------------

    @classmethod
    def from_repository(cls, repository: Path, name: str = "medsam_lite", threads: int = 0,
                        version: int = 1) -> "SamPredictor":
        """Model ``name`` of a model repository, both sessions opened as the embedded backend does."""
        models = discover(Path(repository), name)
        model = models.get(name)
        if not isinstance(model, SamModel):
            sams = sorted(k for k, v in models.items() if isinstance(v, SamModel))
            raise FileNotFoundError(f"{repository} has no promptable model {name!r} (it has {sams or 'none'}): "
                                    f"run `python -m export {name}`")
        entries = (model.encoder, model.decoder)
        return cls(model, sessions_run({e.name: open_entry(e, threads=threads, version=version) for e in entries}))

    def with_encoder(self, entry: RepositoryEntry, encoder: Runner | Path | None = None) -> "SamPredictor":
        """The same decoder (and its runner) behind another image encoder ``entry`` (a variant
        under test), run by ``encoder``: a session or callable, or an ONNX file to open with the
        entry's parameters (default: the entry's own file)."""
        if encoder is None and entry == self.model.encoder:
            return self
        if encoder is None or isinstance(encoder, (str, Path)):
            encoder = open_entry(entry, None if encoder is None else Path(encoder))
        encoder_run, rest = sessions_run({entry.name: encoder}), self._require_run()

        def run(model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            return (encoder_run if model == entry.name else rest)(model, feeds, outputs)

        return SamPredictor(SamModel(self.info, entry, self.model.decoder), run)

    # --- sans-IO steps ------------------------------------------------------------------

    def preprocess(self, pixels: np.ndarray) -> tuple[np.ndarray, Frame]:
        """Decoded pixels (float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1]) -> encoder input + frame."""
        return model_input(pixels, self.input_size)

    def tensor_call(self, tensor: np.ndarray) -> ModelCall:
        """The encoder call on a prepared input tensor."""
        return ModelCall(self.model.encoder.name, {self._image_input: tensor}, [self._embedding_output])

    def encoder_call(self, pixels: np.ndarray) -> tuple[ModelCall, Frame]:
        tensor, frame = self.preprocess(pixels)
        return self.tensor_call(tensor), frame

    def embedding(self, outputs: Mapping[str, np.ndarray], frame: Frame) -> Embedding:
        return Embedding(outputs[self._embedding_output], frame)

    def check_prompts(self, prompts: Sequence[Prompt], frame: Frame, max_prompts: int | None = None) -> list[Prompt]:
        """Checked prompts (boxes clipped to the image) or the gateway's client error
        (:class:`service.core.errors.InvalidPrompt` / ``UnsupportedPrompt``)."""
        limit = sys.maxsize if max_prompts is None else max_prompts
        return prompt_rules.validate(tuple(prompts), frame, self.info, limit, self.low_res)

    def decoder_calls(self, embedding: Embedding, checked: list[Prompt]) -> Iterator[tuple[list[int], ModelCall]]:
        """Decoder calls for already checked prompts (one per group of equal sparse length),
        each with the indices of the prompts it answers."""
        outputs = [self._mask_output, self._iou_output]
        for indices, feeds in prompt_rules.decoder_batches(checked, embedding.frame, self.low_res):
            feeds[self._embedding_input] = embedding.tensor
            yield indices, ModelCall(self.model.decoder.name, feeds, outputs)

    def logits_from(self, results: Iterable[tuple[list[int], Mapping[str, np.ndarray]]],
                    n: int) -> tuple[np.ndarray, np.ndarray]:
        """Gather the decoder calls' outputs into float32 ``(n, h, w)`` low-res logits and ``(n,)`` IoUs."""
        logits: np.ndarray | None = None
        ious = np.empty(n, dtype=np.float32)
        for indices, out in results:
            masks = out[self._mask_output][:, 0]
            if logits is None:
                logits = np.empty((n, *masks.shape[-2:]), dtype=np.float32)
            logits[indices] = masks
            ious[indices] = out[self._iou_output][:, 0]
        if logits is None:
            logits = np.empty((n, *self.low_res), dtype=np.float32)
        return logits, ious

    def upsample(self, low_res: np.ndarray, frame: Frame) -> np.ndarray:
        """float32 ``(P, h, w)`` low-res logits -> ``(P, H, W)`` logits at input-image size."""
        return upsample_logits(low_res, frame)

    def masks(self, low_res: np.ndarray, frame: Frame) -> np.ndarray:
        """bool ``(P, H, W)``: the upsampled logits above 0."""
        return self.upsample(low_res, frame) > 0.0

    # --- synchronous API ----------------------------------------------------------------

    def _require_run(self) -> Run:
        if self._run is None:
            raise RuntimeError("this SamPredictor has no Run: build it with SamPredictor.from_repository(...) "
                               "or pass run=sessions_run({...})")
        return self._run

    def call(self, call: ModelCall) -> dict[str, np.ndarray]:
        return self._require_run()(call.model, call.inputs, call.outputs)

    def embed(self, pixels: np.ndarray) -> Embedding:
        """Preprocess decoded pixels and run the encoder."""
        call, frame = self.encoder_call(pixels)
        return self.embedding(self.call(call), frame)

    def embed_tensor(self, tensor: np.ndarray, frame: Frame) -> Embedding:
        """Run the encoder on an input tensor prepared elsewhere (``frame``: how prompts map to it)."""
        return self.embedding(self.call(self.tensor_call(tensor)), frame)

    def decode(self, embedding: Embedding, checked: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits float32 ``(P, h, w)`` and IoUs float32 ``(P,)`` for checked prompts."""
        results = [(indices, self.call(call)) for indices, call in self.decoder_calls(embedding, checked)]
        return self.logits_from(results, len(checked))

    def predict(self, embedding: Embedding, prompts: Sequence[Prompt],
                max_prompts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Check ``prompts`` (API coordinates of the embedded image) and decode them:
        float32 ``(P, h, w)`` low-res logits and float32 ``(P,)`` predicted IoUs."""
        return self.decode(embedding, self.check_prompts(prompts, embedding.frame, max_prompts))
