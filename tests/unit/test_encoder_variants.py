"""The encoder variants' repository entries (no model files needed): the BF16 variant has its own
prompt decoder, run by OpenVINO in BF16, named by its encoder; the INT8 variant shares the fp32
decoder; the repository serves both, the gateway loads each entry once, and
``SamPredictor.with_decoder`` puts another decoder behind the same encoder (what the guard runs)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from export.encoder_variants import VARIANTS, variant_entries
from export.medsam_lite import medsam_lite_entries
from export.triton_config import write_config
from service.backends import runtimes
from service.backends.repository import RepositoryEntry, Role, RuntimeParameters, SamModel, discover
from service.core.domain import Box, Prompt
from service.inference import predictor as predictor_module
from service.inference.gateway import Gateway
from service.inference.observer import NullObserver
from service.inference.predictor import SamPredictor, sessions_run
from service.settings import Settings
from tests.unit.fake_sam import zero_answer

BF16, INT8, INT8_STATIC = "medsam_lite_bf16", "medsam_lite_int8", "medsam_lite_int8_static"


def test_the_bf16_variant_has_its_own_openvino_bf16_decoder_named_by_its_encoder():
    fp32_encoder, fp32_decoder = medsam_lite_entries()
    encoder, decoder = variant_entries(VARIANTS[BF16], fp32_encoder, fp32_decoder)
    assert decoder is not None and decoder.name == f"{BF16}_decoder"
    assert decoder.runtime == RuntimeParameters(runtime="openvino", precision="bf16")
    assert (decoder.gateway.model, decoder.gateway.role) == (BF16, Role.PROMPT_DECODER)
    assert decoder.gateway.version == fp32_decoder.gateway.version + "-bf16"
    # the same tensors as the fp32 decoder: it is the same file, run another way
    assert (decoder.inputs, decoder.outputs, decoder.max_batch_size) == (
        fp32_decoder.inputs, fp32_decoder.outputs, fp32_decoder.max_batch_size)
    assert encoder.name == f"{BF16}_encoder" and encoder.gateway.decoder == decoder.name
    assert encoder.runtime == decoder.runtime and encoder.gateway.version == fp32_encoder.gateway.version + "-bf16"
    # what config.pbtxt says, read back as the embedded backend and Triton's model.py read it
    back = RepositoryEntry.parse(decoder.render("cpu"))
    assert back.runtime == decoder.runtime and back.gateway.role == Role.PROMPT_DECODER
    assert back.parameters == {runtimes.RUNTIME: "openvino", runtimes.PRECISION: "bf16"}
    triton_params = {k: v.string_value for k, v in decoder.to_config("cpu").parameters.items()}
    assert triton_params[runtimes.RUNTIME] == "openvino" and triton_params[runtimes.PRECISION] == "bf16"


def test_the_int8_variant_shares_the_fp32_decoder():
    fp32_encoder, fp32_decoder = medsam_lite_entries()
    encoder, decoder = variant_entries(VARIANTS[INT8], fp32_encoder, fp32_decoder)
    assert decoder is None and VARIANTS[INT8].decoder_runtime is None
    assert encoder.gateway.decoder == fp32_decoder.name and encoder.gateway.version.endswith("-int8")


@pytest.fixture
def repository(tmp_path) -> Path:
    """config.pbtxt entries of fp32 and every variant, as the exporter derives them (no ONNX files)."""
    fp32_encoder, fp32_decoder = medsam_lite_entries()
    entries = [fp32_encoder, fp32_decoder]
    for variant in VARIANTS.values():
        entries += [e for e in variant_entries(variant, fp32_encoder, fp32_decoder) if e is not None]
    for entry in entries:
        write_config(tmp_path, entry, "cpu")
    return tmp_path


def test_the_repository_serves_the_bf16_variant_with_its_decoder(repository):
    models = discover(repository, "medsam_lite")
    assert set(models) == {"medsam_lite", INT8, BF16, INT8_STATIC}
    bf16 = models[BF16]
    assert isinstance(bf16, SamModel)
    assert bf16.decoder.name == f"{BF16}_decoder" and bf16.decoder.runtime.precision == "bf16"
    assert bf16.decoder.runtime.runtime == "openvino" and bf16.encoder.runtime.runtime == "openvino"
    assert models[INT8].decoder.name == models["medsam_lite"].decoder.name == "medsam_lite_decoder"
    assert models[INT8_STATIC].encoder.onnx_path().name == "model.xml"
    assert models[INT8_STATIC].decoder.name == f"{INT8_STATIC}_decoder"


class RecordingBackend:
    """Records what the gateway asks it to load and which models it runs (zeros as answers)."""

    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.calls: Counter[str] = Counter()

    async def start(self, models: list[str]) -> None:
        self.started += list(models)

    async def infer(self, model, inputs, outputs, timeout=None):
        self.calls[model] += 1
        return zero_answer(inputs, outputs)

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def test_the_gateway_loads_each_repository_entry_once_and_runs_the_bf16_decoder(repository):
    backend = RecordingBackend()
    gateway = Gateway(Settings(model_repository=repository, default_model="medsam_lite"), backend, NullObserver())
    asyncio.run(gateway.start())
    assert sorted(backend.started) == sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    assert len(backend.started) == len(set(backend.started)) == 7
    # warm-up: one encoder and one decoder call per model; the shared fp32 decoder twice
    assert backend.calls == {"medsam_lite_encoder": 1, f"{INT8}_encoder": 1, f"{BF16}_encoder": 1,
                             f"{INT8_STATIC}_encoder": 1, "medsam_lite_decoder": 2, f"{BF16}_decoder": 1,
                             f"{INT8_STATIC}_decoder": 1}


def _fake_predictor(repository: Path, calls: Counter) -> SamPredictor:
    model = discover(repository, "medsam_lite")["medsam_lite"]

    def encoder(feeds):
        calls["encoder"] += 1
        return {"image_embeddings": np.zeros((1, 256, 64, 64), np.float32)}

    def fp32_decoder(feeds):
        calls["fp32 decoder"] += 1
        return {"low_res_masks": np.full((1, 1, 256, 256), -5.0, np.float32),
                "iou_predictions": np.zeros((1, 1), np.float32)}

    return SamPredictor(model, sessions_run({model.encoder.name: encoder, model.decoder.name: fp32_decoder}))


def test_with_decoder_puts_another_decoder_behind_the_same_encoder(repository):
    calls: Counter[str] = Counter()
    base = _fake_predictor(repository, calls)
    entry = discover(repository, "medsam_lite")[BF16].decoder

    def bf16_decoder(feeds):
        calls["bf16 decoder"] += 1
        return {"low_res_masks": np.full((1, 1, 256, 256), 5.0, np.float32),
                "iou_predictions": np.ones((1, 1), np.float32)}

    variant = base.with_decoder(entry, bf16_decoder)
    assert variant.model.decoder == entry and variant.model.encoder == base.model.encoder
    embedding = variant.embed(np.zeros((64, 64), np.float32))
    low, iou = variant.predict(embedding, [Prompt(box=Box(8, 8, 40, 40))])
    assert calls == {"encoder": 1, "bf16 decoder": 1}  # the base's encoder runner, the new decoder's
    assert (low > 0).all() and iou[0] == 1.0
    base.predict(embedding, [Prompt(box=Box(8, 8, 40, 40))])
    assert calls["fp32 decoder"] == 1  # the base predictor is unchanged
    assert base.with_decoder(base.model.decoder) is base


def test_with_decoder_opens_an_onnx_file_with_the_entrys_runtime(repository, tmp_path, monkeypatch):
    base = _fake_predictor(repository, Counter())
    entry = discover(repository, "medsam_lite")[BF16].decoder
    opened = []

    def fake_open(path, parameters, threads=0, batch_axis=False):
        opened.append((Path(path), dict(parameters), batch_axis))
        return lambda feeds: {}

    monkeypatch.setattr(predictor_module, "open_session", fake_open)
    staged = tmp_path / "model.tmp.onnx"
    staged.write_bytes(b"not read: open_session is faked")
    base.with_decoder(entry, staged)
    assert opened == [(staged, {runtimes.RUNTIME: "openvino", runtimes.PRECISION: "bf16"}, False)]


def test_the_static_int8_variant_is_openvino_ir_with_its_own_bf16_decoder():
    fp32_encoder, fp32_decoder = medsam_lite_entries()
    encoder, decoder = variant_entries(VARIANTS[INT8_STATIC], fp32_encoder, fp32_decoder)
    assert encoder.runtime.onnx_filename == "model.xml" and encoder.runtime.runtime == "openvino"
    assert encoder.runtime.precision == "bf16"  # what NNCF left in floating point runs in BF16
    assert decoder is not None and decoder.name == f"{INT8_STATIC}_decoder" == encoder.gateway.decoder
    assert decoder.runtime.onnx_filename == "model.onnx" and decoder.runtime.precision == "bf16"
    assert encoder.gateway.version.endswith("-int8s") and decoder.gateway.version.endswith("-int8s")
    # Triton's python backend and the embedded runtimes find the IR by the entry's file name
    assert "model.xml" in encoder.render("cpu")


def test_an_ir_file_is_staged_and_moved_with_its_weights(tmp_path):
    from export.encoder_variants import _siblings

    assert _siblings(tmp_path / "model.tmp.xml") == [tmp_path / "model.tmp.xml", tmp_path / "model.tmp.bin"]
    assert _siblings(tmp_path / "model.tmp.onnx") == [tmp_path / "model.tmp.onnx"]
