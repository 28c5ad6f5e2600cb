"""TensorRT engines for GPU nodes: repository entries everywhere, engines where TensorRT + a GPU exist."""

from __future__ import annotations

import importlib.util

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.medsam_lite import medsam_lite_entries
from export.tensorrt_engines import decoder_profile, encoder_profile, require_tensorrt, tensorrt_entries
from export.triton_config import write_config
from service.backends.repository import RepositoryEntry

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_tensorrt_plan_entries_keep_the_served_tensors_and_batch_the_encoder(tmp_path):
    encoder, decoder = tensorrt_entries(*medsam_lite_entries())
    for entry in (encoder, decoder):
        cfg = RepositoryEntry.read(write_config(tmp_path, entry, "tensorrt").parent).to_config("tensorrt")
        assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert not (tmp_path / entry.name / "1" / "model.py").exists()
    enc_cfg = encoder.to_config("tensorrt")
    assert enc_cfg.max_batch_size == encoder_profile()["image"][2][0] and enc_cfg.dynamic_batching.ByteSize() > 0


def test_optimisation_profiles_cover_every_engine_input_in_order():
    encoder, decoder = medsam_lite_entries()
    assert set(encoder_profile()) == {t.name for t in encoder.inputs}
    assert set(decoder_profile()) == {t.name for t in decoder.inputs}
    for profile in (encoder_profile(), decoder_profile()):
        for lo, mid, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, mid, hi))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error_not_an_import_crash():
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        require_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installable on this CPU machine (NVIDIA index only)")
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine")
def test_fp16_engines_match_onnxruntime_on_dev_cases(tmp_path, shared_data):
    from export.registry import ExportOptions
    from export.tensorrt_engines import export_medsam_lite_tensorrt

    written = export_medsam_lite_tensorrt(ExportOptions(repository=tmp_path / "repo", cache_dir=tmp_path / "cache"),
                                          shared_data / "dev")
    assert any(p.name == "model.plan" for p in written)
