"""The one predictor (service/inference/predictor.py): what the export checks, the pseudo-labels
and the benchmarks run is what the gateway's pipeline runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from export.dev_cases import load_cases, reference_box
from export.reference import raw_input
from medseg_client.masks import decode_mask
from service.backends.embedded import EmbeddedBackend
from service.backends.repository import discover
from service.core import errors
from service.core import prompts as prompt_rules
from service.core.domain import Box, ImageLimits, Point, Prompt, SegmentRequest
from service.core.geometry import Frame
from service.core.imageio import decode_image
from service.inference.cache import ImageCache
from service.inference.observer import NullObserver
from service.inference.pipeline import SamPipeline
from service.inference.predictor import ModelCall, SamPredictor, sessions_run
from tests.harness import ensure_models

THREADS = 2
MAX_PROMPTS = 16


# --------------------------------------------------------------------------- a fake model
def _tensor(name: str, dims: tuple[int, ...]) -> str:
    return f'{{\n  name: "{name}"\n  data_type: TYPE_FP32\n' + "".join(f"  dims: {d}\n" for d in dims) + "}\n"


def _params(**kv: str) -> str:
    return "".join(f'parameters {{\n  key: "medseg.{k}"\n  value {{\n    string_value: "{v}"\n  }}\n}}\n'
                   for k, v in kv.items())


def _write_fake_repository(repo: Path, input_size: int = 64, low: int = 16, embedding: str = "features") -> Path:
    """A promptable model whose tensor names and sizes are all unlike LiteMedSAM's."""
    enc, dec = repo / "fake_encoder", repo / "fake_decoder"
    enc.mkdir(parents=True)
    dec.mkdir(parents=True)
    (enc / "config.pbtxt").write_text(
        'name: "fake_encoder"\nmax_batch_size: 2\n'
        + "input " + _tensor("pixels", (3, input_size, input_size))
        + "output " + _tensor(embedding, (8, 4, 4))
        + _params(model="fake", role="image_encoder", version="7", input_size=str(input_size),
                  prompt_kinds="box,mask", required_prompt_kinds="box"))
    (dec / "config.pbtxt").write_text(
        'name: "fake_decoder"\n'
        + "input " + _tensor(embedding, (1, 8, 4, 4))
        + "input " + _tensor("point_coords", (-1, -1, 2))
        + "input " + _tensor("point_labels", (-1, -1))
        + "input " + _tensor("mask_input", (-1, 1, low, low))
        + "input " + _tensor("has_mask_input", (-1, 1))
        + "output " + _tensor("masks", (-1, 1, low, low))
        + "output " + _tensor("scores", (-1, 1))
        + _params(model="fake", role="prompt_decoder", version="7"))
    return repo


class FakeRun:
    """Records every call; the 'decoder' answers +5 in the top half of its low-res grid (of the
    image's valid region, rows < half of the crop) and -5 elsewhere, IoU 0.25 per prompt."""

    def __init__(self, low: int = 16) -> None:
        self.low = low
        self.calls: list[ModelCall] = []

    def __call__(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        self.calls.append(ModelCall(model, feeds, outputs))
        if model == "fake_encoder":
            return {"features": np.full((feeds["pixels"].shape[0], 8, 4, 4), 0.5, np.float32)}
        p = feeds["point_coords"].shape[0]
        logits = np.full((p, 1, self.low, self.low), -5.0, np.float32)
        logits[:, :, : self.low // 8] = 5.0
        return {"masks": logits, "scores": np.full((p, 1), 0.25, np.float32)}


@pytest.fixture
def fake(tmp_path):
    model = discover(_write_fake_repository(tmp_path / "repo"), "fake")["fake"]
    run = FakeRun()
    return SamPredictor(model, run), run


def test_tensor_names_and_sizes_come_from_the_repository_entries(fake):
    predictor, run = fake
    assert predictor.input_size == 64 and predictor.low_res == (16, 16)
    pixels = np.random.default_rng(0).random((32, 64), dtype=np.float32)  # H x W: the long side is 64

    call, frame = predictor.encoder_call(pixels)
    assert call.model == "fake_encoder" and list(call.inputs) == ["pixels"] and call.outputs == ["features"]
    assert call.inputs["pixels"].shape == (1, 3, 64, 64) and frame == Frame(32, 64, 64)

    embedding = predictor.embed(pixels)
    assert embedding.tensor.shape == (1, 8, 4, 4) and embedding.frame == frame
    low, ious = predictor.predict(embedding, [Prompt(box=Box(0, 0, 64, 32)), Prompt(box=Box(8, 8, 24, 24))])
    dec = run.calls[-1]
    assert dec.model == "fake_decoder" and dec.outputs == ["masks", "scores"]
    assert dec.inputs["features"] is embedding.tensor
    assert dec.inputs["mask_input"].shape == (2, 1, 16, 16) and dec.inputs["point_coords"].shape == (2, 2, 2)
    assert low.shape == (2, 16, 16) and low.dtype == np.float32
    assert ious.dtype == np.float32 and ious.tolist() == [0.25, 0.25]
    # The valid region of a 32x64 image is the top 8 of the 16 low-res rows; the fake decoder's
    # positive top 2 rows are a quarter of the image height after upsampling.
    masks = predictor.masks(low, frame)
    assert masks.shape == (2, 32, 64) and masks.dtype == bool
    assert masks[:, :8].all() and not masks[:, 8:].any()


def test_the_low_res_size_of_the_entry_is_what_mask_input_must_have(fake):
    predictor, _ = fake
    embedding = predictor.embed(np.zeros((64, 64), np.float32))
    with pytest.raises(errors.InvalidPrompt, match="takes 16x16 low-res logits"):
        predictor.predict(embedding, [Prompt(box=Box(0, 0, 10, 10), mask_input=np.zeros((256, 256), np.float32))])
    low, _ = predictor.predict(embedding, [Prompt(box=Box(0, 0, 10, 10), mask_input=np.zeros((16, 16), np.float32))])
    assert low.shape == (1, 16, 16)


def test_sans_io_steps_need_no_runtime_and_the_sync_api_says_what_is_missing(tmp_path):
    model = discover(_write_fake_repository(tmp_path / "repo", input_size=32, low=8), "fake")["fake"]
    predictor = SamPredictor(model)
    call, frame = predictor.encoder_call(np.zeros((10, 20), np.float32))
    assert call.inputs["pixels"].shape == (1, 3, 32, 32) and predictor.low_res == (8, 8)
    embedding = predictor.embedding({"features": np.zeros((1, 8, 4, 4), np.float32)}, frame)
    checked = predictor.check_prompts([Prompt(box=Box(-5, -5, 30, 8))], frame)
    assert checked[0].box == Box(0, 0, 20, 8)  # clipped to the image, as the gateway does
    ((indices, dec),) = list(predictor.decoder_calls(embedding, checked))
    assert indices == [0] and dec.inputs["mask_input"].shape == (1, 1, 8, 8)
    logits, ious = predictor.logits_from([(indices, {"masks": np.ones((1, 1, 8, 8), np.float32),
                                                     "scores": np.full((1, 1), 0.5, np.float32)})], checked)
    assert logits.shape == (1, 8, 8) and ious.tolist() == [0.5]
    with pytest.raises(RuntimeError, match="no Run"):
        predictor.embed(np.zeros((10, 20), np.float32))


def test_a_decoder_without_the_prompt_inputs_is_refused(tmp_path):
    repo = _write_fake_repository(tmp_path / "repo")
    cfg = repo / "fake_decoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('"has_mask_input"', '"has_mask"'))
    with pytest.raises(ValueError, match="has_mask_input"):
        SamPredictor(discover(repo, "fake")["fake"])


def test_sessions_run_takes_sessions_and_callables_by_model_name():
    class Session:
        def run(self, names, feeds):
            return [feeds["x"] + 1 for _ in names]

    run = sessions_run({"a": Session(), "b": lambda feeds: {"y": feeds["x"] * 2, "unused": feeds["x"]}})
    x = np.ones(2, np.float32)
    assert run("a", {"x": x}, ["y"])["y"].tolist() == [2, 2]
    assert list(run("b", {"x": x}, ["y"])) == ["y"]
    with pytest.raises(KeyError, match="'c'"):
        run("c", {"x": x}, ["y"])


# --------------------------------------------------------------------------- the real LiteMedSAM
@pytest.fixture(scope="module")
def repository() -> Path:
    return ensure_models()


@pytest.fixture(scope="module")
def lite(repository) -> SamPredictor:
    return SamPredictor.from_repository(repository, "medsam_lite", threads=THREADS)


@pytest.fixture(scope="module")
def case(shared_data):
    return next(c for c in load_cases(shared_data / "dev", 6) if c.mask.any())


def _pipeline(repository: Path) -> SamPipeline:
    model = discover(repository, "medsam_lite")["medsam_lite"]
    return SamPipeline(model, EmbeddedBackend(repository, threads=THREADS), ImageCache(1 << 30, 600.0),
                       NullObserver(), ImageLimits(), MAX_PROMPTS, 120.0)


def _serve(repository: Path, steps):
    """Run ``await steps(pipeline)`` on a started SamPipeline over an EmbeddedBackend."""
    async def go():
        pipeline = _pipeline(repository)
        await pipeline._backend.start(list(pipeline.repository_models))
        try:
            return await steps(pipeline)
        finally:
            await pipeline._backend.close()

    return asyncio.run(go())


@pytest.mark.slow
def test_the_predictor_answers_exactly_what_the_gateway_pipeline_answers(repository, lite, case):
    box = reference_box(case.mask)
    prompts = (Prompt(box=box), Prompt(box=Box(box.x0, box.y0, (box.x0 + box.x1) / 2, box.y1)))

    async def steps(pipeline):
        request = SegmentRequest("medsam_lite", prompts, image=raw_input(case.image), return_low_res_logits=True)
        first = await pipeline.segment(request)
        again = await pipeline.segment(SegmentRequest("medsam_lite", prompts, image_id=first.image_id))
        return first, again

    served, cached = _serve(repository, steps)
    embedding = lite.embed(decode_image(raw_input(case.image)).pixels)
    low, ious = lite.predict(embedding, list(prompts))
    masks = lite.masks(low, embedding.frame)
    assert masks.shape == (2, *case.mask.shape) and masks[0].any()
    for result in (served, cached):
        assert (result.height, result.width) == case.mask.shape
        for i, answer in enumerate(result.masks):
            # the pipeline encodes each mask for the wire as soon as it is made (bit-packed here)
            mask = answer.mask if answer.mask is not None else decode_mask(answer.encoded, *case.mask.shape, "bits")
            assert np.array_equal(mask, masks[i])
            assert abs(answer.predicted_iou - float(np.clip(ious[i], 0.0, 1.0))) < 1e-6
    for i, answer in enumerate(served.masks):
        assert np.array_equal(answer.low_res_logits, low[i])


@pytest.mark.slow
def test_a_previous_answer_as_mask_input_changes_the_next_one(lite, case):
    embedding = lite.embed(decode_image(raw_input(case.image)).pixels)
    box = reference_box(case.mask)
    first, first_iou = lite.predict(embedding, [Prompt(box=box)])
    refined, refined_iou = lite.predict(embedding, [Prompt(box=box, mask_input=first[0])])
    assert refined.shape == first.shape == (1, *lite.low_res)
    assert np.abs(refined - first).max() > 0.1
    assert refined_iou[0] != first_iou[0]
    # and the same mask input gives the same answer again (no hidden state)
    again, _ = lite.predict(embedding, [Prompt(box=box, mask_input=first[0])])
    assert np.array_equal(again, refined)


BAD_PROMPTS = [
    (Prompt(box=Box(5, 5, 5, 40)), errors.InvalidPrompt),                      # zero area
    (Prompt(box=Box(-50, -50, -10, -10)), errors.InvalidPrompt),               # outside the image
    (Prompt(box=Box(1, 1, 20, 20), points=(Point(3, 3, True),)), errors.UnsupportedPrompt),  # points
    (Prompt(points=(Point(3, 3, True),)), errors.UnsupportedPrompt),           # no box
    (Prompt(box=Box(1, 1, 20, 20), mask_input=np.zeros((64, 64), np.float32)), errors.InvalidPrompt),
]


@pytest.mark.slow
def test_a_wrong_prompt_raises_the_gateways_own_error(repository, lite, case):
    embedding = lite.embed(decode_image(raw_input(case.image)).pixels)

    async def steps(pipeline):
        out = []
        for prompt, _ in BAD_PROMPTS:
            try:
                await pipeline.segment(SegmentRequest("medsam_lite", (prompt,), image=raw_input(case.image)))
            except errors.InvalidArgument as exc:
                out.append(exc)
            else:
                out.append(None)
        return out

    served = _serve(repository, steps)
    for (prompt, kind), from_gateway in zip(BAD_PROMPTS, served):
        with pytest.raises(kind) as raised:
            lite.predict(embedding, [prompt])
        assert type(from_gateway) is type(raised.value)
        assert str(from_gateway) == str(raised.value)
    with pytest.raises(errors.InvalidPrompt, match="the limit is 1"):
        lite.predict(embedding, [Prompt(box=Box(1, 1, 9, 9))] * 2, max_prompts=1)


@pytest.mark.slow
def test_the_pipeline_checks_a_requests_prompts_once(repository, case, monkeypatch):
    calls = []
    validate = prompt_rules.validate

    def counting(*args, **kwargs):
        calls.append(args[0])
        return validate(*args, **kwargs)

    monkeypatch.setattr(prompt_rules, "validate", counting)
    prompts = (Prompt(box=reference_box(case.mask)),)

    async def steps(pipeline):
        first = await pipeline.segment(SegmentRequest("medsam_lite", prompts, image=raw_input(case.image)))
        after_image = len(calls)
        await pipeline.segment(SegmentRequest("medsam_lite", prompts, image_id=first.image_id))
        return after_image

    after_image = _serve(repository, steps)
    assert after_image == 1 and len(calls) == 2
