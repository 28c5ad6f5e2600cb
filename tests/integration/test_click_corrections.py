"""Clicks as 3-D corrections with real models: the click-correction loop of
bench/evaluate_volumes.py on a small synthetic volume with the tiny random SAM
(tests/sam_models.py, exported by the real ``python -m export sam``): every correction is a
click at the place service/inference/clicks.py computes from the mask before it, and the
segment's anchor on that slice holds it; LiteMedSAM (no point prompts) refuses a click as the
2-D gateway refuses a point, leaving the segment as it was; and the evaluation's
``--corrections-as clicks`` exits 2 without a model that takes points. Over real gRPC, a real
gateway serving the tiny SAM beside LiteMedSAM: RefineSegment's add_points on a NIfTI volume
stored flipped gives the masks the in-process segment gives for the same clicks (so the
clicks reach the model turned as the slices are), undo goes back a click, and LiteMedSAM's
segment, a click off the slice and add_points without points get INVALID_ARGUMENT. The
random model's masks mean nothing: this is the code path, not quality."""

from __future__ import annotations

import gzip

import grpc
import nibabel
import numpy as np
import pytest

from bench import evaluate_volumes
from bench.harness import MODEL_REPOSITORY
from medseg_client import SegmentationClient
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from service.core import errors
from service.core.domain import Point, PromptKind
from service.core.volume import VolumeSource, load_volume
from bench import clicks
from service.inference import propagation as prop
from service.inference.predictor import SamPredictor
from service.inference.volume_predictor import Segment, VolumePredictor
from tests.harness import GatewayProcess
from tests.sam_models import TINY

Z, H, W = 4, 40, 48
CORRECTIONS = 3


@pytest.fixture(scope="module")
def repository(tiny_sam):
    return tiny_sam[0]


def synthetic() -> tuple[VolumeSource, np.ndarray]:
    """A bright ellipsoid-ish structure on noise, and its reference mask (raw: identity orientation)."""
    rng = np.random.default_rng(7)
    z, y, x = np.ogrid[:Z, :H, :W]
    ref = ((y - 20) / 9.0) ** 2 + ((x - 24) / 12.0) ** 2 <= 1.0 - ((z - 1.5) / 2.5) ** 2
    voxels = (rng.random((Z, H, W)) * 60).astype(np.uint8)
    voxels[ref] += 150
    return VolumeSource("raw", data=voxels.tobytes(), dtype="uint8", shape=(Z, H, W), spacing_mm=(1.0, 1.0, 2.0)), ref


class Recording(Segment):
    """The evaluation's Segment, keeping each interaction with the masks before it."""

    applied: list = []

    def apply(self, step):
        before = self.vp.masks(self.results)
        out = super().apply(step)
        Recording.applied.append((step, before, self.state))
        return out


def test_each_correction_of_the_click_loop_is_a_click_at_the_computed_place(repository, monkeypatch):
    predictor = SamPredictor.from_repository(repository, TINY)
    assert PromptKind.POINT in predictor.info.prompt_kinds
    source, ref = synthetic()
    volume = load_volume(source)
    Recording.applied = []
    monkeypatch.setattr(evaluate_volumes, "Segment", Recording)
    row = evaluate_volumes.evaluate_structure(VolumePredictor(predictor, volume), ref, volume.spacing_mm,
                                              CORRECTIONS, corrections_as="clicks")
    steps = row["steps"]
    assert steps[0]["action"].startswith("box on slice") and len(Recording.applied) == len(steps)
    assert len(steps) == CORRECTIONS + 1, "a random model's masks are never all right"
    for i in range(1, len(steps)):
        step, before, state = Recording.applied[i]
        k = evaluate_volumes.worst_slice(before, ref, set())
        expected = clicks.correction_click(before[k], ref[k])
        assert step.slice_index == k and step.points == (expected,) and step.box is None and step.erase is None
        assert steps[i]["click"] == {"slice": k, "x": expected.x, "y": expected.y, "positive": expected.positive}
        sign = "positive" if expected.positive else "negative"
        assert steps[i]["action"] == f"{sign} click at ({expected.x:g}, {expected.y:g}) on slice {k}"
        # the click is in the wrong region it corrects: on the structure and missed, or off it and covered
        r, c = int(expected.y), int(expected.x)
        assert ref[k][r, c] == expected.positive and before[k][r, c] != expected.positive
        # the slice is now an anchor holding every click made on it, this one last
        anchor = dict(state.anchors)[k]
        assert isinstance(anchor, prop.Clicks) and anchor.points[-1] == expected
        assert anchor.points == tuple(s.points[0] for s, _, _ in Recording.applied[1:i + 1] if s.slice_index == k)
        assert 0.0 <= steps[i]["dice"] <= 1.0 and 0.0 <= steps[i]["nsd"] <= 1.0
    # the segment's masks after the last click are the ones scored
    assert 0.0 <= row["corrected_dice"] <= 1.0 and row["corrected_dice"] == steps[-1]["dice"]
    # the report says the corrections were clicks (and a box run's report says nothing of clicks)
    results = {"model": TINY, "corrections_as": "clicks", "volumes": {"synthetic": {
        "structures": {"ellipsoid": {**row, "compact": True, "unet": None}}, "encoder_ms_per_slice": 1.0,
        "decoder_ms": 1.0, "slices": Z}}}
    text = evaluate_volumes.render(results, "cmd", "here", 1.0)
    assert text.startswith("# 3-D evaluation: one box, propagated, corrected with clicks\n")
    assert f"up to {CORRECTIONS} simulated **clicks** (`--corrections-as clicks`)" in text
    assert "no erasing" in text and "erasing from there" not in text
    del results["corrections_as"]
    boxes = evaluate_volumes.render(results, "cmd", "here", 1.0)
    assert "clicks" not in boxes.split("## Targets")[0] and "erasing from there" in boxes


def test_a_model_without_point_prompts_refuses_a_click_and_the_segment_stays_as_it_was():
    predictor = SamPredictor.from_repository(MODEL_REPOSITORY, "medsam_lite")
    assert PromptKind.POINT not in predictor.info.prompt_kinds
    source, ref = synthetic()
    volume = load_volume(source)
    segment = Segment(VolumePredictor(predictor, volume))
    masks = segment.apply(prop.Interaction(1, prop.bounding_box(ref[1])))
    state, results = segment.state, segment.results
    with pytest.raises(errors.UnsupportedPrompt, match="does not accept point"):
        segment.apply(prop.Interaction(2, points=(Point(24.5, 20.5, True),)))
    assert segment.state is state and segment.results is results
    assert np.array_equal(segment.vp.masks(segment.results), masks)


def test_click_corrections_need_a_model_that_takes_points(repository, tmp_path, capsys):
    out = ["--out", str(tmp_path / "e.md"), "--json", str(tmp_path / "e.json"), "--data-dir", str(tmp_path)]
    assert evaluate_volumes.main(["--corrections-as", "clicks", "--repository", str(MODEL_REPOSITORY), *out]) == 2
    assert "needs a model that takes point prompts" in capsys.readouterr().err
    assert evaluate_volumes.main(["--corrections-as", "clicks", "--repository", str(repository), "--model",
                                  "medsam_lite", *out]) == 2
    err = capsys.readouterr().err
    assert "'medsam_lite' takes box, mask" in err and TINY in err
    assert evaluate_volumes.choose_click_model(repository, "auto") == TINY
    assert not (tmp_path / "e.md").exists()


# --------------------------------------------------------------------------- clicks over gRPC
NIFTI_AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])   # stored flipped: the model sees every slice turned


@pytest.fixture(scope="module")
def click_gateway(repository, tmp_path_factory):
    with GatewayProcess(tmp_path_factory.mktemp("click-gateway"), "--model-repository", str(repository),
                        "--default-model", "medsam_lite").serving() as proc:
        yield proc


@pytest.fixture(scope="module")
def click_client(click_gateway):
    with SegmentationClient(click_gateway.target, timeout=120.0) as c:
        yield c


def nifti_upload(folder) -> tuple[bytes, np.ndarray]:
    """The synthetic volume as a .nii.gz whose input-convention slice k is ``voxels[k]``
    (volumes.proto: ``flipud(vol[:, :, k].T)``), and its reference (input convention)."""
    source, ref = synthetic()
    voxels = np.frombuffer(source.data, np.uint8).reshape(Z, H, W)
    stored = np.stack([np.flipud(v).T for v in voxels], axis=-1)       # (W, H, Z)
    data = gzip.compress(nibabel.Nifti1Image(stored, NIFTI_AFFINE).to_bytes())
    return data, ref


def model_click(volume, k: int, x: float, y: float, positive: bool) -> Point:
    """An input-convention click -> model orientation through the volume's mask transform (not
    the box transform the gateway uses): the pixel it is on, moved as a mask pixel moves."""
    one = np.zeros(volume.input_slice_shape, bool)
    one[int(y), int(x)] = True
    r, c = np.argwhere(volume.mask_to_model(one))[0]
    return Point(c + 0.5, r + 0.5, positive)


def gateway_masks(client, volume_id: str, segment_id: str) -> np.ndarray:
    """The segment's masks, (Z, H, W) input convention, from GetSegmentMask."""
    out = np.zeros((Z, H, W), bool)
    for s in client.get_segment_mask(volume_id, segment_id).slices:
        out[s.slice_index] = s.mask
    return out


def test_clicks_in_3d_over_grpc_refine_as_the_in_process_segment_does(click_client, repository, tmp_path):
    data, ref = nifti_upload(tmp_path)
    path = tmp_path / "clicks.nii.gz"
    path.write_bytes(data)
    info = click_client.upload_volume(path)
    volume = load_volume(VolumeSource("nifti", data=data))
    assert volume.in_plane.flip_rows and volume.in_plane.flip_cols    # clicks must be turned too
    local = Segment(VolumePredictor(SamPredictor.from_repository(repository, TINY), volume))

    def local_masks() -> np.ndarray:
        return np.stack([volume.mask_to_input(m) for m in local.vp.masks(local.results)])

    box = prop.bounding_box(ref[1])
    stream = click_client.segment_volume(info.volume_id, slice_index=1, box=(box.x0, box.y0, box.x1, box.y1),
                                         model=TINY)
    segment_id = stream.summary.segment_id
    local.apply(prop.Interaction(1, volume.box_to_model(box)))
    history = [local_masks()]
    clicks_sent = [(2, 24.5, 20.5, 1), (1, 24.5, 20.5, 1), (1, 5.5, 5.5, 0)]   # a new slice, then its box anchor
    for n, (k, x, y, label) in enumerate(clicks_sent, start=2):
        summary = click_client.add_points(info.volume_id, segment_id, k, [(x, y, label)]).summary
        assert summary.interactions == n
        local.apply(prop.Interaction(k, points=(model_click(volume, k, x, y, bool(label)),)))
        history.append(local_masks())
        got = gateway_masks(click_client, info.volume_id, segment_id)
        assert np.array_equal(got, history[-1]), f"after click {n - 1}: {int((got != history[-1]).sum())} pixels differ"
    assert len({h.tobytes() for h in history}) == len(history), "each click changed the masks"
    anchors = dict(local.state.anchors)
    assert isinstance(anchors[2], prop.Clicks) and anchors[2].box is None            # slice 2 had no mask
    assert anchors[1] == prop.Clicks(volume.box_to_model(box), tuple(model_click(volume, 1, x, y, bool(label))
                                                                    for k, x, y, label in clicks_sent[1:]))
    # undo goes back click by click
    assert click_client.undo_segment(info.volume_id, segment_id).summary.interactions == 3
    assert np.array_equal(gateway_masks(click_client, info.volume_id, segment_id), history[-2])


def test_a_segment_of_a_model_without_points_refuses_clicks_and_bad_clicks_are_refused(click_client, tmp_path):
    data, ref = nifti_upload(tmp_path)
    path = tmp_path / "lite.nii.gz"
    path.write_bytes(data)
    info = click_client.upload_volume(path)
    box = prop.bounding_box(ref[1])
    lite = click_client.segment_volume(info.volume_id, slice_index=1, box=(box.x0, box.y0, box.x1, box.y1)).summary
    assert lite.model_name == "medsam_lite"
    with pytest.raises(grpc.RpcError) as refused:
        click_client.add_points(info.volume_id, lite.segment_id, 2, [(24.5, 20.5, 1)]).summary
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not accept point prompts" in refused.value.details()
    assert click_client.get_segment_mask(info.volume_id, lite.segment_id).summary.interactions == 1
    sam = click_client.segment_volume(info.volume_id, slice_index=1, box=(box.x0, box.y0, box.x1, box.y1),
                                      model=TINY).summary
    with pytest.raises(grpc.RpcError) as outside:
        click_client.add_points(info.volume_id, sam.segment_id, 2, [(W + 3.0, 4.0, 1)]).summary
    assert outside.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside slice 2" in outside.value.details()
    with pytest.raises(grpc.RpcError) as too_many:
        click_client.add_points(info.volume_id, sam.segment_id, 2, [(4.5, 4.5, 1)] * 65).summary
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 64" in too_many.value.details()
    with grpc.insecure_channel(click_client.target) as channel:
        empty = vpb.RefineSegmentRequest(volume_id=info.volume_id, segment_id=sam.segment_id,
                                         add_points=vpb.AddPoints(slice_index=2))
        with pytest.raises(grpc.RpcError) as none:
            list(vpb_grpc.VolumesStub(channel).RefineSegment(empty, timeout=60))
    assert none.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no points" in none.value.details()
    assert click_client.get_segment_mask(info.volume_id, sam.segment_id).summary.interactions == 1
