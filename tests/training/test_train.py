"""Training runs: resumable, and a CI smoke run that learns, exports and serves."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")

import torch  # noqa: E402

from training import data  # noqa: E402
from training.evaluate import onnx_predictor, predict, scores, torch_predictor  # noqa: E402
from training.model import NetworkConfig  # noqa: E402
from training.samples import model_image, prepare  # noqa: E402
from training import losses  # noqa: E402
from training.train import ALL_METHODS, METHODS, TrainConfig, batch_loss, load_model, train  # noqa: E402
from training.weak_labels import simulate  # noqa: E402

from .helpers import synthetic_case  # noqa: E402

TINY = NetworkConfig(channels=(4, 8), num_res_units=0)


def tiny_samples(size: int = 32):
    cases = [synthetic_case(f"synth_{i:03d}", seed=i) for i in range(3)]
    weak = {c.case_id: simulate(c.case_id, c.mask, seed=0) for c in cases}
    return prepare(cases, size, weak)


@pytest.mark.parametrize("method", ["full", "box", "dice_ce"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, method):
    samples = tiny_samples()
    cfg = TrainConfig(method=method, size=32, iterations=6, batch_size=2, threads=1, checkpoint_every=2,
                      network=TINY)
    whole = train(cfg, samples, tmp_path / "whole", progress=False)
    first = train(cfg, samples, tmp_path / "split", stop_after=3, progress=False)
    assert first.iterations == 3
    resumed = train(cfg, samples, tmp_path / "split", progress=False)
    assert resumed.iterations == 6
    assert resumed.history == pytest.approx(whole.history, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resuming_with_another_configuration_is_refused(tmp_path):
    samples = tiny_samples()
    cfg = TrainConfig(size=32, iterations=2, batch_size=2, threads=1, network=TINY)
    train(cfg, samples, tmp_path, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train(replace(cfg, lr=0.5), samples, tmp_path, progress=False)


def test_dice_ce_is_ce_plus_batch_dice_on_the_scribbles_channel_and_not_an_experiment_default():
    assert "dice_ce" not in METHODS and "dice_ce" in ALL_METHODS      # the 2-D experiment's runs are unchanged
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="dice")
    # two 1x2 images: p_fg = sigmoid(margin); image 1 is labelled empty, one pixel of image 0 is ignored
    margin = torch.tensor([[[2.0, -1.0]], [[0.5, -3.0]]], dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(margin), margin], dim=1)
    b = {"scribbles": torch.tensor([[[1, -1]], [[0, 0]]]), "masks": torch.zeros((2, 1, 2), dtype=torch.int64)}
    p = torch.sigmoid(margin).tolist()
    ce = -(np.log(p[0][0][0]) + np.log(1 - p[1][0][0]) + np.log(1 - p[1][0][1])) / 3
    s = losses.BATCH_DICE_SMOOTH
    dice = 1 - (2 * p[0][0][0] + s) / (p[0][0][0] + p[1][0][0] + p[1][0][1] + 1 + s)
    got = batch_loss(TrainConfig(method="dice_ce"), logits, b)
    assert got.item() == pytest.approx(ce + dice, abs=1e-9)
    # the masks channel is not read (it is the reference for `full`, the samples' areas otherwise)
    b["masks"][:] = 1
    assert batch_loss(TrainConfig(method="dice_ce"), logits, b).item() == pytest.approx(ce + dice, abs=1e-9)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, shared_data):
    """CI smoke run: 40 iterations on 6 real brain slices at 64x64, exported with the
    ``unet`` exporter into a temporary model repository (~30 s on 2 cores)."""
    from export.options import ExportOptions
    from export.registry import export_unet

    tmp = tmp_path_factory.mktemp("smoke")
    start = time.monotonic()
    cases = data.select(data.load_npz_folder(shared_data / "train"), "brain", 3)[::12][:6]
    dev = data.select(data.load_npz_folder(shared_data / "dev"), "brain")[:2]
    cfg = TrainConfig(method="full", structure="brain", size=64, iterations=40, batch_size=4, lr=3e-3,
                      threads=2, network=NetworkConfig(channels=(8, 16, 32)))
    result = train(cfg, prepare(cases, 64), tmp / "run", progress=False)
    cache = tmp / "cache"
    (cache / "unet").mkdir(parents=True)
    shutil.copy(tmp / "run" / "checkpoint.pt", cache / "unet" / "unet_smoke.pt")
    written = export_unet(ExportOptions(repository=tmp / "repo", cache_dir=cache))
    model, _ = load_model(tmp / "run" / "checkpoint.pt")
    return {"cfg": cfg, "result": result, "written": written, "repo": tmp / "repo", "dev": dev,
            "torch": torch_predictor(model), "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_smoke_loss_falls_and_export_matches_pytorch(smoke):
    from service.backends.repository import read_entry

    history, cfg = smoke["result"].history, smoke["cfg"]
    assert np.mean(history[-8:]) < 0.8 * np.mean(history[:8])
    assert {p.name for p in smoke["written"]} == {"model.onnx", "config.pbtxt"}
    entry = read_entry(smoke["repo"] / "unet_smoke")
    assert entry.gateway.role == "segmenter" and entry.gateway.input_size == 64
    assert entry.gateway.prompt_kinds == frozenset()
    assert 'key: "medseg.prompt_kinds"' in (smoke["repo"] / "unet_smoke" / "config.pbtxt").read_text()
    assert entry.input_names == ["image"] and entry.output_names == ["logits"]
    onnx_run, torch_run = onnx_predictor(str(entry.onnx_path())), smoke["torch"]
    for case in smoke["dev"]:
        x, _ = model_image(case.image, cfg.size)
        assert np.abs(onnx_run(x[None]) - torch_run(x[None])).max() < 1e-3
        assert scores(predict(onnx_run, case.image, cfg.size), predict(torch_run, case.image, cfg.size),
                      case.spacing_mm)[0] > 0.99
    assert smoke["seconds"] < 180


@pytest.mark.slow
def test_smoke_model_is_served_by_the_gateway_embedded_backend(smoke):
    from service.backends.embedded import EmbeddedBackend

    x, _ = model_image(smoke["dev"][0].image, smoke["cfg"].size)

    async def serve() -> np.ndarray:
        backend = EmbeddedBackend(smoke["repo"], threads=1)
        await backend.start(["unet_smoke"])
        try:
            return (await backend.infer("unet_smoke", {"image": x[None]}, ["logits"]))["logits"]
        finally:
            await backend.close()

    served = asyncio.run(serve())
    assert served.shape == (1, 2, 64, 64)
    assert np.abs(served - smoke["torch"](x[None])).max() < 1e-3


@pytest.mark.slow
def test_smoke_model_is_served_by_a_real_tritonserver(smoke, tmp_path):
    from service.backends.triton import TritonBackend
    from tests.harness import TritonProcess

    x, _ = model_image(smoke["dev"][0].image, smoke["cfg"].size)
    triton = TritonProcess(tmp_path, smoke["repo"]).start()

    async def serve() -> np.ndarray:
        backend = TritonBackend(triton.grpc_target)
        await backend.start(["unet_smoke"])
        try:
            return (await backend.infer("unet_smoke", {"image": x[None]}, ["logits"]))["logits"]
        finally:
            await backend.close()

    try:
        served = asyncio.run(serve())
    finally:
        triton.stop()
    assert served.shape == (1, 2, 64, 64)
    assert np.abs(served - smoke["torch"](x[None])).max() < 1e-3


@pytest.mark.slow
def test_smoke_model_is_listed_and_served_prompt_free_by_a_real_gateway(smoke, tmp_path):
    import grpc

    from medseg_client._generated import segmentation_pb2 as pb
    from medseg_client import SegmentationClient, image_from_array
    from tests.harness import GatewayProcess

    case = smoke["dev"][0]
    gw = GatewayProcess(tmp_path, "--model-repository", str(smoke["repo"]), "--default-model", "unet_smoke").start()
    try:
        gw.wait_serving()
        with SegmentationClient(gw.target) as client:
            (info,) = [m for m in client.list_models() if m.name == "unet_smoke"]
            assert list(info.prompt_kinds) == [] and info.input_size == 64 and info.is_default
            result = client.segment(image=image_from_array(case.image), model="unet_smoke")
            assert len(result.masks) == 1 and result.masks[0].shape == case.image.shape
            onnx_run = onnx_predictor(str(smoke["repo"] / "unet_smoke" / "1" / "model.onnx"))
            expected = predict(onnx_run, case.image, smoke["cfg"].size)
            assert np.mean(result.masks[0] == expected) > 0.999
            with pytest.raises(grpc.RpcError) as info_err:
                client.segment(image_id=result.image_id, model="unet_smoke", boxes=[(1, 1, 20, 20)])
            assert info_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert pb.PROMPT_KIND_BOX not in info.prompt_kinds
    finally:
        gw.stop()


@pytest.mark.slow
def test_smoke_model_segments_every_slice_of_a_volume_as_the_2d_path_does(smoke):
    """A prompt-free segmenter over a volume (SegmentVolume without a box): every slice of the
    range, streamed, each mask the one the 2-D Segment gives for that slice."""
    from service.backends import create_backend
    from service.core.domain import ImageInput, MaskEncoding, RawPixels, SegmentRequest
    from service.core.mask_codec import encode_mask
    from service.core.volume import VolumeSource
    from service.inference.gateway import Gateway
    from service.inference.observer import NullObserver
    from service.inference.volumes import SegmentVolumeRequest, SliceMask, VolumeSummary
    from service.settings import Settings

    images = [np.ascontiguousarray(case.image, dtype=np.float32) for case in smoke["dev"]]
    h, w = images[0].shape[:2]
    stack = np.stack([im if im.shape == (h, w) else np.zeros((h, w), np.float32) for im in images * 2])

    async def run():
        settings = Settings(model_repository=smoke["repo"], default_model="unet_smoke", ort_threads=1)
        gateway = Gateway(settings, create_backend(settings), NullObserver())
        await gateway.start()
        try:
            info = await gateway.volumes.upload(VolumeSource("raw", data=stack.tobytes(), dtype="float32",
                                                             shape=stack.shape, spacing_mm=(1.0, 1.0, 2.0)), "")
            items = [item async for item in gateway.volumes.segment(
                SegmentVolumeRequest(info.volume_id, "unet_smoke", encoding=MaskEncoding.BITS), "")]
            two_d = []
            for k in range(len(stack)):
                raw = RawPixels("float32", (h, w), stack[k].tobytes())
                result = await gateway.segment(SegmentRequest(model="unet_smoke", image=ImageInput(raw=raw), prompts=(),
                                                              encoding=MaskEncoding.BITS))
                two_d.append(result.masks[0].encoded)
            return items, two_d
        finally:
            await gateway.close()

    items, two_d = asyncio.run(run())
    slices = [i for i in items if isinstance(i, SliceMask)]
    assert isinstance(items[-1], VolumeSummary) and items[-1].model == "unet_smoke"
    empty = encode_mask(np.zeros((h, w), bool), MaskEncoding.BITS)
    expected = {k: m for k, m in enumerate(two_d) if m != empty}
    assert {s.slice_index: s.encoded for s in slices} == expected and expected
