"""--default-model auto in a real gateway process: it times the LiteMedSAM variants present in
the repository at start-up, ListModels marks exactly one of them default (one this CPU runs
natively) and says why, a call naming no model gets it, every variant stays selectable, and
``--default-model medsam_lite`` pins the old behaviour."""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np
import pytest

from bench.run_benchmarks import Images, bench_default_model
from medseg_client import SegmentationClient, image_from_array
from service.backends.embedded import LABELS
from service.backends.repository import SamModel, discover
from service.inference.model_choice import AUTO, PREFERENCE, cpu_flags, runs_natively
from tests.harness import GatewayProcess

pytestmark = pytest.mark.slow
IMAGE = image_from_array(np.random.default_rng(7).integers(0, 255, (96, 80), dtype=np.uint8))
BOX = [(10, 12, 70, 80)]


def _present(repository) -> set[str]:
    return {m for m in PREFERENCE if (repository / f"{m}_encoder" / "config.pbtxt").is_file()}


@contextmanager
def _gateway(tmp_path, *args: str):
    gw = GatewayProcess(tmp_path, *args)
    try:
        gw.start().wait_serving()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def auto_gateway(model_repository, tmp_path_factory):
    with _gateway(tmp_path_factory.mktemp("auto-gw")) as gw:  # default settings: --default-model auto
        yield gw


def _ask(gw):
    with SegmentationClient(gw.target, timeout=120) as client:
        models = client.list_models()
        answers = {m.name: client.segment(image=IMAGE, boxes=BOX, model=m.name).model_name
                   for m in models if m.name in PREFERENCE}
        return models, answers, client.segment(image=IMAGE, boxes=BOX).model_name


def test_auto_defaults_to_one_present_variant_this_cpu_runs_natively(model_repository, auto_gateway):
    present = _present(model_repository)
    models, answers, unnamed = _ask(auto_gateway)
    defaults = [m for m in models if m.is_default]
    assert len(defaults) == 1, [m.name for m in models]
    chosen = defaults[0].name
    assert chosen in present and runs_natively(chosen, cpu_flags())
    assert unnamed == chosen
    assert answers == {m: m for m in present}  # every variant listed and selectable by name
    line = next(x for x in auto_gateway.log().splitlines() if "default model: " in x)
    assert f"default model: {chosen} (" in line
    assert "default model on this machine" in defaults[0].description
    natively = [m for m in PREFERENCE if m in present and runs_natively(m, cpu_flags())]
    if len(natively) > 1:  # measured: every candidate's time is in the log, the chosen one the least
        times = {m: int(ms) for m, ms in re.findall(r"(medsam_lite\w*) (\d+) ms", line)}
        assert set(times) == set(natively) and times[chosen] == min(times.values())
        assert "fastest measured" in line and "embedded backend" in line
    print(line)


def test_each_entry_is_loaded_once_on_the_runtime_it_names(model_repository, auto_gateway):
    """Variants sharing the fp32 decoder (INT8) do not load it again; one with its own decoder
    (BF16, OpenVINO) loads that one, on its runtime."""
    loaded = re.findall(r"loaded (\S+) on (ONNX Runtime|OpenVINO)", auto_gateway.log())
    names = [name for name, _ in loaded]
    assert len(names) == len(set(names)), names
    want = {e.name: LABELS[e.runtime.runtime] for m in discover(model_repository, "auto").values()
            if isinstance(m, SamModel) for e in (m.encoder, m.decoder)}
    assert {k: v for k, v in loaded if k in want} == want


def test_the_benchmark_measures_the_model_the_gateway_chose(auto_gateway):
    (chosen,) = [m.name for m in _ask(auto_gateway)[0] if m.is_default]
    run = bench_default_model(auto_gateway.target, Images(np.zeros((512, 512), np.int16)), 2, 2)
    assert run["model"] == chosen and run["new_image"]["p50_ms"] > 0 and run["follow_up"]["p50_ms"] > 0


def test_an_explicit_default_model_pins_fp32(model_repository, tmp_path):
    with _gateway(tmp_path, "--default-model", "medsam_lite") as gw:
        models, _, unnamed = _ask(gw)
        assert [m.name for m in models if m.is_default] == ["medsam_lite"]
        assert unnamed == "medsam_lite"
        assert "default model: medsam_lite (pinned by --default-model)" in gw.log()
        assert AUTO not in {m.name for m in models}


def test_make_models_wrote_the_static_int8_variant_behind_its_guard(model_repository):
    """`make models` (run before the suite) exports the static INT8 variant; like BF16's, a failed
    guard leaves it out, and this test then fails."""
    from service.backends.repository import RepositoryEntry

    encoder = RepositoryEntry.read(model_repository / "medsam_lite_int8_static_encoder")
    decoder = RepositoryEntry.read(model_repository / encoder.gateway.decoder)
    ir = encoder.onnx_path()
    assert ir.name == "model.xml" and ir.is_file() and ir.with_suffix(".bin").is_file()
    assert not list(ir.parent.glob("*.tmp.*"))
    assert decoder.name == "medsam_lite_int8_static_decoder" and decoder.onnx_path().is_file()
    # the guard's verdict, with its evidence, is in the description ListModels shows
    assert ("mean Dice within 0.005 of fp32 on 40 dev cases" in encoder.gateway.description
            or "no dev cases at export" in encoder.gateway.description), encoder.gateway.description
    assert encoder.gateway.memory_bytes > 0 and decoder.gateway.memory_bytes > 0


def _fed_by_fake_quantize(node, hops: int = 3) -> bool:
    """Whether a FakeQuantize op lies within ``hops`` producers above ``node`` (NNCF quantises
    a layer by FakeQuantize on its activation input and on its weights' path)."""
    for port in node.inputs():
        parent = port.get_source_output().get_node()
        if parent.get_type_name() == "FakeQuantize" or (hops > 1 and _fed_by_fake_quantize(parent, hops - 1)):
            return True
    return False


def test_the_static_int8_encoder_keeps_its_first_stage_in_floating_point(model_repository):
    """The written IR quantises the transformer stages but not the convolutional first stage
    (export.encoder_variants.FLOAT_SCOPE: quantised, it made the shipped-image guard fail)."""
    import re

    import openvino as ov

    from export.encoder_variants import FLOAT_SCOPE
    from service.backends.repository import RepositoryEntry

    ir = RepositoryEntry.read(model_repository / "medsam_lite_int8_static_encoder").onnx_path()
    layers = [op for op in ov.Core().read_model(str(ir)).get_ops()
              if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
    in_scope = [op for op in layers if any(re.fullmatch(p, op.get_friendly_name()) for p in FLOAT_SCOPE)]
    assert len(in_scope) >= 10, [op.get_friendly_name() for op in layers][:20]
    assert not [op.get_friendly_name() for op in in_scope if _fed_by_fake_quantize(op)]
    quantised = [op.get_friendly_name() for op in layers if op not in in_scope and _fed_by_fake_quantize(op)]
    assert len(quantised) >= 40, quantised   # the attention and MLP MatMuls of stages 1-3 (60 MatMuls in all)
