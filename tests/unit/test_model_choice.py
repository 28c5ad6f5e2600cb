"""--default-model auto: the choice logic with fake CPU flags and fake timings, and the real
Gateway measuring a fake backend's encoders at start-up (no model files needed)."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest

from export.encoder_variants import VARIANTS
from export.medsam_lite import medsam_lite_entries
from export.triton_config import write_config
from service.core import errors
from service.core.errors import StartupError
from service.inference import model_choice
from service.inference.gateway import Gateway
from service.inference.model_choice import AUTO, BF16, FP32, INT8, choose, cpu_flags
from service.inference.observer import NullObserver
from service.settings import Settings
from tests.unit.fake_sam import zero_answer

ALL = (FP32, INT8, BF16)
EVERY_FLAG = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}


# --------------------------------------------------------------------------- CPU flags
def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512_vnni avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512_vnni avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512_vnni", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_each_variant_needs_its_instructions():
    assert model_choice.runs_natively(FP32, set())
    assert not model_choice.runs_natively(BF16, {"avx512f", "avx512_vnni"})
    assert model_choice.runs_natively(BF16, {"amx_bf16"}) and model_choice.runs_natively(BF16, {"avx512_bf16"})
    assert not model_choice.runs_natively(INT8, {"avx2"})
    assert model_choice.runs_natively(INT8, {"avx_vnni"}) and model_choice.runs_natively(INT8, {"avx512_vnni"})
    assert not model_choice.runs_natively("unet_brain", EVERY_FLAG)  # not a LiteMedSAM variant


# --------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("fastest", ALL)
def test_the_fastest_measured_candidate_wins_whatever_the_preference(fastest):
    seconds = {m: (0.2 if m == fastest else 0.5 + 0.1 * i) for i, m in enumerate(ALL)}
    choice = choose(AUTO, ALL, EVERY_FLAG, seconds)
    assert choice.model == fastest and choice.measured
    assert "fastest measured" in choice.reason and "200 ms" in choice.reason


@pytest.mark.parametrize("flags", [set(), {"avx2", "avx512f"}, {"avx512_vnni"}, {"avx_vnni", "avx2"}])
def test_a_cpu_without_bf16_instructions_never_gets_bf16_as_default(flags):
    fast_bf16 = {BF16: 0.05, INT8: 0.4, FP32: 0.6}
    for seconds in (fast_bf16, None):
        choice = choose(AUTO, ALL, flags, seconds)
        assert choice.model != BF16
        assert choice.model == (INT8 if {"avx512_vnni", "avx_vnni"} & flags else FP32)
    assert "not run natively here: medsam_lite_bf16" in choose(AUTO, ALL, flags, fast_bf16).reason


def test_a_cpu_without_vnni_never_gets_int8():
    choice = choose(AUTO, ALL, {"avx512_bf16"}, {INT8: 0.01, BF16: 0.3, FP32: 0.6})
    assert choice.model == BF16


def test_only_present_variants_are_candidates():
    assert choose(AUTO, (FP32,), EVERY_FLAG, None).model == FP32
    assert choose(AUTO, (FP32, BF16, "unet_brain"), EVERY_FLAG, {FP32: 0.3, BF16: 0.2, INT8: 0.01}).model == BF16


@pytest.mark.parametrize("name", [FP32, INT8, BF16, "unet_brain"])
def test_an_explicit_name_wins(name):
    choice = choose(name, (*ALL, "unet_brain"), EVERY_FLAG, {FP32: 0.9, INT8: 0.1, BF16: 0.2})
    assert choice.model == name and not choice.measured and "pinned" in choice.reason
    assert choose(name, ALL, set(), None).model == name  # even bf16 on a CPU without BF16


def test_unmeasured_candidates_fall_back_to_the_documented_preference_and_say_why():
    choice = choose(AUTO, ALL, EVERY_FLAG, None, "measuring off")
    assert choice.model == BF16 and not choice.measured
    assert "documented preference" in choice.reason and "measuring off" in choice.reason
    partial = choose(AUTO, ALL, EVERY_FLAG, {FP32: 0.1})  # not every candidate timed: no comparison
    assert partial.model == BF16 and not partial.measured


def test_auto_without_litemedsam_variants():
    assert choose(AUTO, ("unet_brain",), EVERY_FLAG).model == "unet_brain"
    with pytest.raises(ValueError, match="--default-model NAME"):
        choose(AUTO, ("unet_brain", "unet_liver"), EVERY_FLAG)


# --------------------------------------------------------------------------- the gateway at start-up
class TimedBackend:
    """A backend whose encoders take a given time each (and whose answers are zeros)."""

    name = "fake"

    def __init__(self, encoder_s: dict[str, float], fail_timed: bool = False) -> None:
        self.encoder_s, self.fail_timed = encoder_s, fail_timed
        self.encoder_calls: dict[str, int] = {}

    async def start(self, models: list[str]) -> None:
        pass

    async def infer(self, model, inputs, outputs, timeout=None):
        if model.endswith("_encoder"):
            n = self.encoder_calls[model] = self.encoder_calls.get(model, 0) + 1
            if self.fail_timed and n > 1:  # warm-up works, the timed runs fail
                raise errors.BackendError("the backend broke")
            await asyncio.sleep(self.encoder_s[model])
        return zero_answer(inputs, outputs)

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """config.pbtxt entries of the three variants of ALL, as the exporters write them (no ONNX files)."""
    repo = tmp_path_factory.mktemp("variants")
    encoder, decoder = medsam_lite_entries()
    for entry in (encoder, decoder):
        write_config(repo, entry, "cpu")
    for name, variant in ((n, VARIANTS[n]) for n in ALL if n != FP32):
        write_config(repo, replace(encoder, name=f"{name}_encoder", runtime=variant.runtime,
                                   gateway=replace(encoder.gateway, model=name, decoder=decoder.name,
                                                   version=encoder.gateway.version + variant.version_suffix)), "cpu")
    return repo


def _start(repository: Path, backend: TimedBackend, flags: set[str], monkeypatch, **settings) -> Gateway:
    monkeypatch.setattr(model_choice, "cpu_flags", lambda: frozenset(flags))
    gateway = Gateway(Settings(model_repository=repository, **settings), backend, NullObserver())
    asyncio.run(gateway.start())
    return gateway


SLOW_BF16 = {"medsam_lite_encoder": 0.1, "medsam_lite_int8_encoder": 0.01, "medsam_lite_bf16_encoder": 0.05}


def test_the_gateway_defaults_to_the_fastest_encoder_it_measured(repository, monkeypatch, caplog):
    backend = TimedBackend(SLOW_BF16)
    with caplog.at_level(logging.INFO, logger="service.inference.gateway"):
        gateway = _start(repository, backend, EVERY_FLAG, monkeypatch)
    assert gateway.default_model == INT8 and gateway.model_name("") == INT8 and gateway.model_name(FP32) == FP32
    defaults = [m for m in gateway.list_models() if m.is_default]
    assert [m.name for m in defaults] == [INT8] and "fastest measured" in defaults[0].description
    assert {m.name for m in gateway.list_models()} == set(ALL)  # every variant stays listed
    # warm-up once, then --default-model-runs (2) timed runs of each candidate
    assert backend.encoder_calls == {name: 3 for name in SLOW_BF16}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("default model:"))
    times = {m: int(ms) for m, ms in re.findall(r"(medsam_lite\w*) (\d+) ms", line)}
    assert set(times) == set(ALL) and times[INT8] >= 10 and times[BF16] >= 50 and times[FP32] >= 100
    assert "best of 2 encoder runs each through the fake backend" in line


def test_the_gateway_never_defaults_to_bf16_without_bf16_instructions(repository, monkeypatch):
    fast_bf16 = {"medsam_lite_encoder": 0.1, "medsam_lite_int8_encoder": 0.03, "medsam_lite_bf16_encoder": 0.0}
    backend = TimedBackend(fast_bf16)
    gateway = _start(repository, backend, {"avx2", "avx512_vnni"}, monkeypatch)
    assert gateway.default_model == INT8
    assert backend.encoder_calls["medsam_lite_bf16_encoder"] == 1  # warmed up, never timed


def test_a_pinned_default_is_not_measured(repository, monkeypatch):
    backend = TimedBackend(SLOW_BF16)
    gateway = _start(repository, backend, EVERY_FLAG, monkeypatch, default_model=FP32)
    assert gateway.default_model == FP32 and [m.name for m in gateway.list_models() if m.is_default] == [FP32]
    assert backend.encoder_calls == {name: 1 for name in SLOW_BF16}


@pytest.mark.parametrize("why", ["runs_off", "backend_fails"])
def test_without_measurements_the_documented_preference_decides_and_says_why(repository, monkeypatch, why):
    backend = TimedBackend(SLOW_BF16, fail_timed=why == "backend_fails")
    gateway = _start(repository, backend, EVERY_FLAG, monkeypatch,
                     **({"default_model_runs": 0} if why == "runs_off" else {}))
    assert gateway.default_model == BF16
    (info,) = [m for m in gateway.list_models() if m.is_default]
    assert "documented preference" in info.description
    if why == "runs_off":
        assert "--default-model-runs 0" in info.description
    else:
        assert "measuring through the fake backend failed: the backend broke" in info.description


def test_an_unknown_pinned_default_is_a_startup_error(repository):
    with pytest.raises(StartupError, match="not in the repository"):
        Gateway(Settings(model_repository=repository, default_model="nope"), TimedBackend(SLOW_BF16), NullObserver())


def test_the_flag_defaults_to_auto_and_pins_by_name():
    assert Settings.from_args([], environ={}).default_model == AUTO
    assert Settings.from_args(["--default-model", FP32], environ={}).default_model == FP32
    assert Settings.from_args([], environ={"MEDSEG_DEFAULT_MODEL_RUNS": "0"}).default_model_runs == 0


def test_the_static_int8_variant_needs_vnni_and_comes_first_when_nothing_is_measured():
    from service.inference.model_choice import INT8_STATIC

    assert model_choice.runs_natively(INT8_STATIC, {"avx512_vnni"}) and model_choice.runs_natively(INT8_STATIC, {"avx_vnni"})
    assert not model_choice.runs_natively(INT8_STATIC, {"avx512_bf16", "avx2"})
    present = (*ALL, INT8_STATIC)
    assert choose(AUTO, present, EVERY_FLAG, None, "measuring off").model == INT8_STATIC
    assert choose(AUTO, present, {"avx512_bf16"}, None, "measuring off").model == BF16  # no VNNI here
    measured = choose(AUTO, present, EVERY_FLAG, {FP32: 0.6, INT8: 0.4, BF16: 0.2, INT8_STATIC: 0.3})
    assert measured.model == BF16 and measured.measured  # the measurement wins over the preference
