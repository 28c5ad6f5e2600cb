"""CI smoke of volume-scale weak supervision, end to end on real data: one box on a small crop of
colin27 (left thalamus) -> the served LiteMedSAM propagates it into a volume pseudo-label
(training/volume_pseudo_labels.py) -> the U-Net trains on its slices, uncertain voxels ignored
(training/volume_training.py, a few iterations) -> exported with export/unet.py into a temporary
repository -> a real gateway lists it as prompt-free and answers SegmentVolume (no box) over the
uploaded crop with the masks the exported file gives, slice by slice. About 20-35 s on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai", reason="the training extra (requirements/training.txt) is not installed")

from medseg_client import SegmentationClient  # noqa: E402
from service.core.segmenter_io import postprocess, preprocess  # noqa: E402
from tests.harness import GatewayProcess  # noqa: E402

CROP = {"x": (56, 90), "y": (80, 134), "z": (75, 82)}   # voxels of colin27: the left thalamus, 7 slices
STRUCTURE = "thalamus_left"


@pytest.mark.slow
def test_one_box_pseudo_labels_train_a_model_the_gateway_serves_over_a_volume(shared_data, model_repository,
                                                                             tmp_path):
    from service.inference.predictor import SamPredictor
    from training import volume_pseudo_labels as vpl
    from training import volume_training as vt
    from training.evaluate import onnx_predictor
    from training.model import NetworkConfig
    from training.train import TrainConfig

    folder = shared_data / "volumes" / "colin27_t1"
    image = vt.crop_nifti(folder / "image.nii.gz", tmp_path / "image.nii.gz", **CROP)
    mask = vt.crop_nifti(folder / "masks" / f"{STRUCTURE}.nii.gz", tmp_path / "mask.nii.gz", **CROP)
    volume = vt.read_volume(image)

    # one box on the slice of largest area, propagated by the served LiteMedSAM
    predictor = SamPredictor.from_repository(model_repository, "medsam_lite", threads=2)
    pl = vpl.volume_pseudo_label(predictor, volume, vt.read_volume(mask), name=STRUCTURE)
    assert len(pl.key_slices) == 1
    vpl.save(pl, tmp_path / "pseudo")
    labels, _ = vt.pseudo_label_map(tmp_path / "pseudo", STRUCTURE, volume)
    assert (labels == -1).any() and (labels == 1).any()       # uncertain voxels reach the trainer as -1

    cfg = TrainConfig(structure="thalamus", size=64, iterations=60, batch_size=4, lr=3e-3, threads=2,
                      checkpoint_every=1000, network=NetworkConfig(channels=(8, 16, 32)))
    result = vt.train_volume(cfg, volume, labels, "pseudo", tmp_path / "run", progress=False)
    assert result.iterations == 60
    assert np.mean(result.history[-8:]) < 0.8 * np.mean(result.history[:8])
    written = vt.export(tmp_path / "run", tmp_path / "repo", "unet_volume_smoke")
    assert {p.name for p in written} == {"model.onnx", "config.pbtxt"}
    assert "volume pseudo-label" in (tmp_path / "repo" / "unet_volume_smoke" / "config.pbtxt").read_text()

    # what the exported file gives for each slice, through the serving path, in the input convention
    onnx_run = onnx_predictor(str(tmp_path / "repo" / "unet_volume_smoke" / "1" / "model.onnx"))
    frame = preprocess(volume.slice_pixels(0), cfg.size)[1]
    expected = {}
    for k in range(volume.depth):
        m = postprocess(onnx_run(vt.served_inputs(volume, [k], cfg.size).numpy()), frame)
        if m.any():
            expected[k] = volume.mask_to_input(m)
    assert expected, "the smoke model segments nothing on its own training crop"

    gw = GatewayProcess(tmp_path / "gw", "--model-repository", str(tmp_path / "repo"),
                        "--default-model", "unet_volume_smoke")
    with gw.serving(), SegmentationClient(gw.target, timeout=60.0) as client:
        (info,) = [m for m in client.list_models() if m.name == "unet_volume_smoke"]
        assert list(info.prompt_kinds) == [] and info.input_size == 64
        uploaded = client.upload_volume(image)
        stream = client.segment_volume(uploaded.volume_id, model="unet_volume_smoke")
        slices = list(stream)
        summary = stream.summary
        assert summary.model_name == "unet_volume_smoke" and slices
        got = {s.slice_index: s.mask for s in slices if s.mask.any()}
        assert sorted(got) == sorted(expected)
        for k, m in got.items():
            assert m.shape == expected[k].shape
            assert np.mean(m == expected[k]) > 0.999
        whole = client.get_segment_mask(uploaded.volume_id, summary.segment_id)
        nifti = whole.nifti()
        assert nifti.shape == tuple(CROP[a][1] - CROP[a][0] for a in "xyz")
        assert int(np.asarray(nifti.dataobj).sum()) == summary.voxel_count > 0


@pytest.mark.slow
def test_a_2_5d_segmenter_is_served_over_a_volume_with_its_neighbouring_slices_and_refused_for_2d(
        shared_data, tmp_path):
    """``--context-slices 1``: trained on (slice, neighbours) stacks of the reference, exported with
    3 input channels and ``medseg.context_slices``; the gateway feeds SegmentVolume the same stacks
    (masks equal to the exported file's on those stacks, and not those of the middle slice
    repeated), and refuses a 2-D Segment or EmbedImage with INVALID_ARGUMENT naming the volume API."""
    import grpc

    from medseg_client import image_from_array
    from training import volume_training as vt
    from training.evaluate import onnx_predictor
    from training.model import NetworkConfig
    from training.train import TrainConfig

    folder = shared_data / "volumes" / "colin27_t1"
    image = vt.crop_nifti(folder / "image.nii.gz", tmp_path / "image.nii.gz", **CROP)
    mask = vt.crop_nifti(folder / "masks" / f"{STRUCTURE}.nii.gz", tmp_path / "mask.nii.gz", **CROP)
    volume = vt.read_volume(image)
    cfg = TrainConfig(structure="thalamus", size=64, iterations=40, batch_size=4, lr=3e-3, threads=2,
                      checkpoint_every=1000, network=NetworkConfig(channels=(8, 16, 32), context_slices=1))
    vt.train_volume(cfg, volume, vt.label_map(vt.model_masks(mask, volume)), "full", tmp_path / "run",
                    progress=False)
    vt.export(tmp_path / "run", tmp_path / "repo", "unet_25d_smoke")
    from service.backends.repository import read_entry

    entry = read_entry(tmp_path / "repo" / "unet_25d_smoke")
    assert entry.inputs[0].dims == (3, 64, 64) and entry.gateway.context_slices == 1
    assert "2.5-D" in entry.gateway.description

    onnx_run = onnx_predictor(str(tmp_path / "repo" / "unet_25d_smoke" / "1" / "model.onnx"))
    frame = preprocess(volume.slice_pixels(0), cfg.size)[1]
    expected, flat = {}, {}
    for k in range(volume.depth):
        m = postprocess(onnx_run(vt.served_inputs(volume, [k], cfg.size, context=1).numpy()), frame)
        expected[k] = volume.mask_to_input(m)
        alone = np.repeat(vt.served_inputs(volume, [k], cfg.size).numpy(), 3, axis=1)   # no neighbours
        flat[k] = volume.mask_to_input(postprocess(onnx_run(alone), frame))
    assert any(v.any() for v in expected.values()), "the smoke model segments nothing on its own training crop"

    gw = GatewayProcess(tmp_path / "gw", "--model-repository", str(tmp_path / "repo"),
                        "--default-model", "unet_25d_smoke")
    with gw.serving(), SegmentationClient(gw.target, timeout=60.0) as client:
        (info,) = [m for m in client.list_models() if m.name == "unet_25d_smoke"]
        assert info.context_slices == 1 and not info.prompt_kinds   # a client can tell before calling
        uploaded = client.upload_volume(image)
        got = {s.slice_index: s.mask for s in client.segment_volume(uploaded.volume_id, model="unet_25d_smoke")}
        for k in range(volume.depth):
            m = got.get(k, np.zeros_like(expected[k]))
            assert np.mean(m == expected[k]) > 0.999, k
        assert any(np.mean(expected[k] != flat[k]) > 0.001 for k in expected), \
            "the neighbouring slices change nothing: this test cannot tell a 2.5-D input from a repeated slice"
        with pytest.raises(grpc.RpcError) as refused:
            client.segment(image=image_from_array(np.zeros((64, 64), np.uint8)), model="unet_25d_smoke")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "2.5-D" in refused.value.details() and "SegmentVolume" in refused.value.details()
        with pytest.raises(grpc.RpcError) as not_embedded:
            client.embed(image_from_array(np.zeros((64, 64), np.uint8)), model="unet_25d_smoke")
        assert not_embedded.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "SegmentVolume" in not_embedded.value.details()
        again = client.segment_volume(uploaded.volume_id, model="unet_25d_smoke")   # still serving
        assert {s.slice_index for s in again} == set(got) and again.summary.model_name == "unet_25d_smoke"
