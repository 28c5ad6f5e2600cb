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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np

from service.backends.repository import RepositoryEntry, SamModel, discover, mask_candidates
from service.backends.runtimes import ModelSession, open_session
from service.core import prompts as prompt_rules
from service.core.domain import Prompt
from service.core.geometry import Frame, frame_of, model_input, upsample_logits

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


def ambiguous(prompt: Prompt) -> bool:
    """A prompt that says too little for one mask: a single click, with no box or previous mask."""
    return prompt.box is None and prompt.mask_input is None and len(prompt.points) <= 1


def choose(prompt: Prompt, scores: np.ndarray) -> int:
    """Which of SAM's four decoder outputs answers ``prompt`` (``scores``: their predicted IoUs):
    for an :func:`ambiguous` prompt the best of the three multimask candidates by predicted IoU,
    else the single-mask token 0, trained for prompts that pin the object down. This is SAM's
    own rule (``SamPredictor``'s advice, ``SamOnnxModel.select_masks``)."""
    if ambiguous(prompt):
        return 1 + int(np.argmax(scores[1:4]))
    return 0


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
        self.preprocessing: str = enc.gateway.preprocessing
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
        return SamPredictor(SamModel(self.info, entry, self.model.decoder), self._run_with(entry, encoder))

    def with_decoder(self, entry: RepositoryEntry, decoder: Runner | Path | None = None) -> "SamPredictor":
        """The same encoder (and its runner) in front of another prompt decoder ``entry`` (a
        variant's own decoder, e.g. the fp32 file run by OpenVINO in BF16), run by ``decoder``:
        a session or callable, or an ONNX file to open with the entry's parameters (default: the
        entry's own file). Chain it with :meth:`with_encoder` to put a whole variant under test:
        ``base.with_encoder(enc, enc_file).with_decoder(dec, dec_file)``."""
        if decoder is None and entry == self.model.decoder:
            return self
        info = replace(self.info, mask_candidates=mask_candidates(entry))
        return SamPredictor(SamModel(info, self.model.encoder, entry), self._run_with(entry, decoder))

    def _run_with(self, entry: RepositoryEntry, runner: Runner | Path | None) -> Run:
        """This predictor's :data:`Run` with ``entry``'s calls sent to ``runner`` instead."""
        if runner is None or isinstance(runner, (str, Path)):
            runner = open_entry(entry, None if runner is None else Path(runner))
        swapped, rest = sessions_run({entry.name: runner}), self._require_run()

        def run(model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            return (swapped if model == entry.name else rest)(model, feeds, outputs)

        return run

    # --- sans-IO steps ------------------------------------------------------------------

    def frame(self, height: int, width: int) -> Frame:
        """How an image of this size sits in the model input (prompts map through it)."""
        return frame_of(height, width, self.input_size, self.preprocessing)

    def preprocess(self, pixels: np.ndarray) -> tuple[np.ndarray, Frame]:
        """Decoded pixels (float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1]) -> encoder input + frame."""
        return model_input(pixels, self.input_size, self.preprocessing)

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
                    prompts: Sequence[Prompt], candidates: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Gather the decoder calls' outputs for the checked ``prompts`` into float32 low-res
        logits ``(P, h, w)`` and IoUs ``(P,)``: one mask per prompt, chosen by :func:`choose`.
        With ``candidates`` (a multimask model only): all of them, ``(P, K, h, w)`` and ``(P, K)``."""
        n, k = len(prompts), self.info.mask_candidates
        if candidates and k == 1:
            raise ValueError(f"model {self.info.name!r} answers one mask per prompt")
        logits = np.empty((n, k if candidates else 1, *self.low_res), dtype=np.float32)
        ious = np.empty((n, logits.shape[1]), dtype=np.float32)
        for indices, out in results:
            masks, scores = out[self._mask_output], out[self._iou_output]
            if k == 1:
                logits[indices, 0], ious[indices, 0] = masks[:, 0], scores[:, 0]
                continue
            for j, i in enumerate(indices):  # SAM's 4 outputs: the single-mask token, then 3 candidates
                if candidates:
                    logits[i], ious[i] = masks[j, 1:], scores[j, 1:]
                else:
                    c = choose(prompts[i], scores[j])
                    logits[i, 0], ious[i, 0] = masks[j, c], scores[j, c]
        return (logits, ious) if candidates else (logits[:, 0], ious[:, 0])

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

    def decode(self, embedding: Embedding, checked: list[Prompt], candidates: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits float32 ``(P, h, w)`` and IoUs float32 ``(P,)`` for checked prompts
        (with ``candidates``: every candidate, ``(P, K, h, w)`` and ``(P, K)``)."""
        results = [(indices, self.call(call)) for indices, call in self.decoder_calls(embedding, checked)]
        return self.logits_from(results, checked, candidates)

    def predict(self, embedding: Embedding, prompts: Sequence[Prompt], max_prompts: int | None = None,
                candidates: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Check ``prompts`` (API coordinates of the embedded image) and decode them:
        float32 ``(P, h, w)`` low-res logits and float32 ``(P,)`` predicted IoUs (with
        ``candidates``: all of a multimask model's, ``(P, K, h, w)`` and ``(P, K)``)."""
        return self.decode(embedding, self.check_prompts(prompts, embedding.frame, max_prompts), candidates)
