"""The start-up memory check (service/inference/memory_fit.py) on entries with measured and
unmeasured needs, a configured limit and cgroup limit files."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.backends.repository import GatewayParameters, RepositoryEntry, TensorSpec
from service.inference import memory_fit

MiB = 2**20


def _entry(name: str, memory: int = 0, tmp=None, file_bytes: int = 0) -> RepositoryEntry:
    entry = RepositoryEntry(name=name, inputs=(TensorSpec("x", (1,)),), outputs=(TensorSpec("y", (1,)),),
                            gateway=GatewayParameters(model=name, role="image_encoder", input_size=8,
                                                      memory_bytes=memory))
    if tmp is not None:
        path = tmp / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\0" * file_bytes)
        entry = replace(entry, path=tmp / name)
    return entry


def test_models_that_fit_are_summarised():
    line = memory_fit.check([_entry("a", 100 * MiB), _entry("b", 50 * MiB)], configured_limit=1024 * MiB,
                            resident=200 * MiB)
    assert line == "models need about 150 MiB of the 824 MiB left under 1,024 MiB (--memory-limit-bytes)"


def test_models_that_do_not_fit_are_refused_naming_the_largest():
    with pytest.raises(ValueError) as info:
        memory_fit.check([_entry("sam_vit_h_encoder", 6000 * MiB), _entry("medsam_lite_encoder", 250 * MiB)],
                         configured_limit=4096 * MiB, resident=1000 * MiB)
    message = str(info.value)
    assert message.startswith("the models need about 6,250 MiB loaded (sam_vit_h_encoder 6,000 MiB, "
                              "medsam_lite_encoder 250 MiB")
    assert "3,096 MiB of the 4,096 MiB memory limit (--memory-limit-bytes) are left" in message
    assert "--memory-limit-bytes" in message


def test_an_unmeasured_entry_is_estimated_from_its_file(tmp_path):
    need = memory_fit.entry_need(_entry("old", tmp=tmp_path, file_bytes=1000))
    assert need == memory_fit.Need("old", memory_fit.UNMEASURED_FACTOR * 1000, False)
    line = memory_fit.check([_entry("old", tmp=tmp_path / "x", file_bytes=MiB)], configured_limit=100 * MiB,
                            resident=0)
    assert line.startswith(f"models need about {memory_fit.UNMEASURED_FACTOR} MiB")


def test_the_limit_comes_from_the_setting_then_the_cgroup_then_the_machine(tmp_path, monkeypatch):
    v2 = tmp_path / "memory.max"
    monkeypatch.setattr(memory_fit, "_CGROUP_FILES", (v2,))
    v2.write_text("max\n")  # no cgroup limit
    ram, source = memory_fit.memory_limit()
    assert source == "the machine's RAM" and ram > 0
    v2.write_text(f"{512 * MiB}\n")
    assert memory_fit.memory_limit() == (512 * MiB, f"the container's cgroup limit ({v2})")
    assert memory_fit.memory_limit(64 * MiB) == (64 * MiB, "--memory-limit-bytes")
