"""The 3-D API (medseg.v1.Volumes) over real gRPC against a real gateway, on the real volumes of
../shared/data/volumes: NIfTI, DICOM series and raw uploads; a structure segmented from one box
with the slices streamed before the summary, on the input's grid; refine (add a box, erase),
undo; the NIfTI mask on the input's shape and affine and close to the reference; a DICOM series
and its NIfTI give the same mask in voxel space; a cancel mid-stream; every bad input gets its
status and the gateway keeps serving; the CLI's segment-volume.

Ranges of a few slices keep it fast (each slice is one LiteMedSAM encoder run)."""

from __future__ import annotations

import gzip
import io
import json
import time
from pathlib import Path

import grpc
import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image

from medseg_client import image_from_array, image_from_file
from medseg_client.__main__ import main as cli
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from tests.harness import code_of, metric_value, wait_for

# Left amygdala (slices 44..61): largest on slice 56. (The left pallidum, as low in contrast as it is
# in T1 under the one window of the whole volume, gets Dice ~0.3 from LiteMedSAM here; the same box
# on the 2-D API, windowed by that slice's own percentiles, ~0.65.)
COLIN_STRUCTURE, COLIN_SLICE, COLIN_RANGE, COLIN_MARGIN = "amygdala_left", 56, (54, 57), 3
CT_SLICE, CT_RANGE = 54, (53, 55)         # the CT's 'head' structure
CT_WINDOW = (40.0, 400.0)                 # what the DICOM files carry: the NIfTI upload sends it


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def input_slice(volume: np.ndarray, k: int) -> np.ndarray:
    """Slice k of a NIfTI voxel array in the input convention (volumes.proto)."""
    return np.flipud(volume[:, :, k].T)


def box_of(mask2d: np.ndarray, margin: int = 2) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask2d)
    h, w = mask2d.shape
    return (max(0, cols.min() - margin), max(0, rows.min() - margin), min(w, cols.max() + 1 + margin),
            min(h, rows.max() + 1 + margin))


def nifti_of(data: bytes):
    return nibabel.Nifti1Image.from_bytes(gzip.decompress(data))


def read_stream(stream):
    """(slices, summary, arrival time of each slice, arrival time of the summary)."""
    start, slices, times = time.monotonic(), [], []
    for item in stream:
        slices.append(item)
        times.append(time.monotonic() - start)
    summary = stream.summary
    return slices, summary, times, time.monotonic() - start


@pytest.fixture(scope="module")
def volumes(shared_data) -> Path:
    path = shared_data / "volumes"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the 3-D tests need ../shared/data/volumes", pytrace=False)
    return path


@pytest.fixture(scope="module")
def colin(volumes):
    image = nibabel.load(str(volumes / "colin27_t1" / "image.nii.gz"))
    masks = volumes / "colin27_t1" / "masks"
    reference = np.asarray(nibabel.load(str(masks / f"{COLIN_STRUCTURE}.nii.gz")).dataobj) > 0
    return image, reference, box_of(input_slice(reference, COLIN_SLICE), COLIN_MARGIN)


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.target) as channel:
        yield vpb_grpc.VolumesStub(channel)


@pytest.fixture(scope="module")
def colin_volume(client, volumes):
    info = client.upload_volume(volumes / "colin27_t1" / "image.nii.gz")
    yield info
    client.delete_volume(info.volume_id)


@pytest.fixture(scope="module")
def segmented(client, colin_volume, colin):
    _, _, box = colin
    stream = client.segment_volume(colin_volume.volume_id, slice_index=COLIN_SLICE, box=box, range=COLIN_RANGE)
    return read_stream(stream)


def test_a_nifti_upload_describes_the_volume_in_the_input_convention(colin_volume, colin):
    image, _, _ = colin
    nx, ny, nz = image.shape
    assert colin_volume.volume_id and colin_volume.shape == (nz, ny, nx)  # slice k: flipud(vol[:, :, k].T)
    assert colin_volume.source_format == "nifti" and colin_volume.spacing_mm == pytest.approx((1.0, 1.0, 1.0))
    assert colin_volume.window[1] > 0 and colin_volume.window_source
    assert colin_volume.stored_bytes >= nx * ny * nz and colin_volume.expires_in_s > 0


def test_slices_stream_before_the_summary_on_the_input_grid(segmented, colin_volume):
    slices, summary, times, summary_at = segmented
    indices = [s.slice_index for s in slices]
    assert COLIN_SLICE in indices and len(set(indices)) == len(indices)
    assert all(COLIN_RANGE[0] <= k <= COLIN_RANGE[1] for k in indices)
    assert all(s.mask.shape == (colin_volume.height, colin_volume.width) and s.mask.dtype == bool for s in slices)
    assert all(int(s.mask.sum()) == s.area for s in slices)
    # streamed: the first slice arrived while later slices were still being computed
    assert times[0] < summary_at - 0.1, (times, summary_at)
    assert summary.volume_id == colin_volume.volume_id and summary.segment_id
    assert summary.model_name == "medsam_lite" and summary.interactions >= 1
    assert summary.voxel_count == sum(s.area for s in slices) > 0
    assert COLIN_RANGE[0] <= summary.first_slice <= COLIN_SLICE <= summary.last_slice <= COLIN_RANGE[1]
    assert summary.volume_ml == pytest.approx(summary.voxel_count / 1000.0, rel=1e-6)  # 1 mm voxels


def test_the_box_slice_is_the_2d_answer_for_that_slice(client, segmented, colin_volume, colin, volumes):
    """The same pixels reach the model as through the 2-D API for that NIfTI slice (an MR
    volume without a window: each slice clipped to its own percentiles, as a 2-D image is):
    orientation and intensities agree between the two paths."""
    _, _, box = colin
    assert colin_volume.window_source == "slice percentiles"
    image = image_from_file(volumes / "colin27_t1" / "image.nii.gz", slice_index=COLIN_SLICE)
    two_d = client.segment(image=image, boxes=[box]).masks[0]
    streamed = next(s for s in segmented[0] if s.slice_index == COLIN_SLICE)
    assert np.array_equal(two_d, streamed.mask)


@pytest.mark.parametrize("encoding", [pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_COCO_RLE])
def test_every_mask_encoding_gives_the_same_slices(client, segmented, colin_volume, colin, encoding):
    _, _, box = colin
    slices, _, _, _ = read_stream(client.segment_volume(colin_volume.volume_id, slice_index=COLIN_SLICE, box=box,
                                                        range=(COLIN_SLICE, COLIN_SLICE), encoding=encoding))
    bits = next(s for s in segmented[0] if s.slice_index == COLIN_SLICE)
    assert len(slices) == 1 and np.array_equal(slices[0].mask, bits.mask)


def test_the_nifti_mask_has_the_inputs_grid_and_matches_the_reference(client, segmented, colin_volume, colin):
    image, reference, _ = colin
    slices, summary, _, _ = segmented
    result = client.get_segment_mask(colin_volume.volume_id, summary.segment_id)
    mask_image = nifti_of(result.nifti_gz)
    assert mask_image.shape == image.shape and np.allclose(mask_image.affine, image.affine)
    mask = np.asarray(mask_image.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    for s in slices:  # the streamed slices are the NIfTI's slices, in the input convention
        assert np.array_equal(input_slice(mask, s.slice_index) > 0, s.mask)
    assert [s.slice_index for s in result.slices] == sorted(s.slice_index for s in slices if s.area)
    first, last = COLIN_RANGE
    score = dice(mask[:, :, first:last + 1], reference[:, :, first:last + 1])
    assert score >= 0.5, f"Dice {score:.3f} vs the reference {COLIN_STRUCTURE} on slices {first}..{last}"
    assert result.summary.voxel_count == int(mask.sum())


def test_refine_with_a_box_erase_and_undo(client, segmented, colin_volume, colin):
    _, reference, _ = colin
    _, summary, _, _ = segmented
    volume_id, segment_id = colin_volume.volume_id, summary.segment_id
    k = COLIN_RANGE[1]
    box = box_of(input_slice(reference, k), COLIN_MARGIN)
    added, after_add, _, _ = read_stream(client.add_box(volume_id, segment_id, k, box))
    assert after_add.segment_id == segment_id and after_add.interactions == summary.interactions + 1
    assert all(s.mask.shape == (colin_volume.height, colin_volume.width) for s in added)
    before = client.get_segment_mask(volume_id, segment_id)
    areas = {s.slice_index: s.area for s in before.slices}
    assert areas.get(k, 0) > 0 and after_add.voxel_count == sum(areas.values())

    # erase the outermost propagated slice: only it changes (propagation stops before an erased slice)
    outer = after_add.first_slice
    assert outer < COLIN_SLICE, "the mask did not propagate below the box's slice"
    erased, after_erase, _, _ = read_stream(client.erase_slices(volume_id, segment_id, outer, outer))
    assert [s.slice_index for s in erased] == [outer] and erased[0].area == 0 and not erased[0].mask.any()
    assert after_erase.voxel_count == after_add.voxel_count - areas[outer]
    assert after_erase.interactions == after_add.interactions + 1 and after_erase.first_slice > outer

    restored, after_undo, _, _ = read_stream(client.undo_segment(volume_id, segment_id))
    assert [s.slice_index for s in restored] == [outer] and restored[0].area == areas[outer]
    assert after_undo.voxel_count == after_add.voxel_count and after_undo.interactions == after_add.interactions
    again = client.get_segment_mask(volume_id, segment_id)
    assert np.array_equal(np.asarray(nifti_of(again.nifti_gz).dataobj), np.asarray(nifti_of(before.nifti_gz).dataobj))


def test_a_raw_array_gives_the_same_mask_as_its_nifti(client, segmented, colin):
    image, _, box = colin
    voxels = np.asarray(image.dataobj)
    raw = np.stack([input_slice(voxels, k) for k in range(voxels.shape[2])])  # (Z, H, W): raw[k] is slice k
    info = client.upload_volume(raw, spacing=(1.0, 1.0, 1.0))
    try:
        assert info.source_format == "raw" and info.shape == raw.shape
        slices, summary, _, _ = read_stream(client.segment_volume(info.volume_id, slice_index=COLIN_SLICE, box=box,
                                                                  range=(COLIN_SLICE, COLIN_SLICE)))
        nifti_slice = next(s for s in segmented[0] if s.slice_index == COLIN_SLICE)
        (raw_slice,) = slices
        # the same voxels, no orientation to apply (canonical RAS+ NIfTI), the same window: the same pixels
        assert dice(raw_slice.mask, nifti_slice.mask) >= 0.99
        mask = np.asarray(nifti_of(client.get_segment_mask(info.volume_id, summary.segment_id).nifti_gz).dataobj)
        assert mask.shape == raw.shape and np.array_equal(mask[COLIN_SLICE] > 0, raw_slice.mask)
    finally:
        assert client.delete_volume(info.volume_id)
    assert not client.delete_volume(info.volume_id)  # gone


def test_a_dicom_series_and_its_nifti_give_the_same_mask_in_voxel_space(client, volumes):
    ct = nibabel.load(str(volumes / "promed_ct_0051" / "image.nii.gz"))
    head = np.asarray(nibabel.load(str(volumes / "promed_ct_0051" / "masks" / "head.nii.gz")).dataobj) > 0
    nifti_box = box_of(input_slice(head, CT_SLICE))
    width = ct.shape[0]
    # DICOM file k pixel (r, c) is voxel (nx-1-c, ny-1-r, k): its slice is the NIfTI's mirrored left-right
    dicom_box = (width - nifti_box[2], nifti_box[1], width - nifti_box[0], nifti_box[3])
    masks, infos = {}, {}
    for name, source, window, box in (("nifti", volumes / "promed_ct_0051" / "image.nii.gz", CT_WINDOW, nifti_box),
                                      ("dicom", volumes / "dicom" / "promed_ct_0051", None, dicom_box)):
        info = client.upload_volume(source, window=window)
        try:
            infos[name] = info
            slices, summary, _, _ = read_stream(client.segment_volume(info.volume_id, slice_index=CT_SLICE, box=box,
                                                                      range=CT_RANGE))
            assert slices and all(s.mask.shape == (info.height, info.width) for s in slices)
            masks[name] = nifti_of(client.get_segment_mask(info.volume_id, summary.segment_id).nifti_gz)
        finally:
            client.delete_volume(info.volume_id)
    assert infos["nifti"].shape == infos["dicom"].shape == (108, 256, 256)
    assert infos["dicom"].source_format == "dicom_series" and infos["nifti"].window_source == "request"
    assert infos["dicom"].window == infos["nifti"].window == CT_WINDOW
    assert masks["nifti"].shape == ct.shape and np.allclose(masks["nifti"].affine, ct.affine)
    assert masks["dicom"].shape == (256, 256, 108)  # (columns, rows, slices)
    nifti_mask = np.asarray(nibabel.as_closest_canonical(masks["nifti"]).dataobj) > 0
    canonical = nibabel.as_closest_canonical(masks["dicom"])
    dicom_mask = np.asarray(canonical.dataobj) > 0
    assert np.allclose(canonical.affine[:3, :3], ct.affine[:3, :3], atol=1e-4)  # same axes and voxel size
    assert np.array_equal(dicom_mask, np.asarray(masks["dicom"].dataobj)[::-1, ::-1, :] > 0)  # the documented map
    assert nifti_mask[:, :, CT_SLICE].any()
    assert dice(dicom_mask, nifti_mask) >= 0.99  # the model saw identical pixels


def _audit_lines(gateway, method: str) -> list[dict]:
    lines = []
    for text in gateway.log().splitlines():
        if text.startswith("{") and f'"method": "{method}"' in text:
            lines.append(json.loads(text))
    return lines


def test_a_cancel_mid_stream_stops_the_call_and_the_next_call_succeeds(client, gateway, colin_volume, colin):
    _, _, box = colin
    cancelled_before = sum(line["status"] == "CANCELLED" for line in _audit_lines(gateway, "SegmentVolume"))
    stream = client.segment_volume(colin_volume.volume_id, slice_index=COLIN_SLICE, box=box)  # no range
    first = next(stream)
    assert first.slice_index == COLIN_SLICE
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for(lambda: sum(line["status"] == "CANCELLED" for line in _audit_lines(gateway, "SegmentVolume"))
             > cancelled_before, 10, "the cancelled call's audit line")
    # the server's work stopped: counted as a stopped stream, and no slice is decoded after it
    wait_for(lambda: metric_value(gateway.metrics_text(), "medseg_volume_events_total", default=0.0,
                                  event="stream_stopped", model="medsam_lite") >= 1, 10, "the stopped-stream count")
    segmented = metric_value(gateway.metrics_text(), "medseg_volume_events_total", event="slice_segmented",
                             model="medsam_lite")
    time.sleep(1.5)  # several slices' time on this machine
    assert metric_value(gateway.metrics_text(), "medseg_volume_events_total", event="slice_segmented",
                        model="medsam_lite") == segmented
    slices, summary, _, _ = read_stream(client.segment_volume(colin_volume.volume_id, slice_index=COLIN_SLICE,
                                                              box=box, range=(COLIN_SLICE, COLIN_SLICE)))
    assert [s.slice_index for s in slices] == [COLIN_SLICE] and summary.voxel_count == slices[0].area


def _header(**kw) -> vpb.UploadVolumeRequest:
    return vpb.UploadVolumeRequest(header=vpb.VolumeHeader(**kw))


def _part(data: bytes, end: bool = True) -> vpb.UploadVolumeRequest:
    return vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=data, end_of_file=end))


def _two_series(volumes: Path, folder: Path) -> Path:
    folder.mkdir()
    for i, path in enumerate(sorted((volumes / "dicom" / "promed_ct_0051").iterdir())[:6]):
        dataset = pydicom.dcmread(path)
        if i % 2:
            dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # a second series in the same upload
        dataset.save_as(folder / path.name)
    return folder


def test_bad_inputs_get_their_status_and_the_gateway_keeps_serving(client, stub, volumes, colin_volume, tmp_path):
    nifti = (volumes / "colin27_t1" / "image.nii.gz").read_bytes()
    upload = lambda *messages: stub.UploadVolume(iter(messages), timeout=30)  # noqa: E731
    box = pb.Box(x0=56, y0=84, x1=82, y1=102)
    segment = lambda **kw: list(stub.SegmentVolume(vpb.SegmentVolumeRequest(**kw), timeout=30))  # noqa: E731
    invalid, not_found, exhausted = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
    cases = {
        "empty upload": (lambda: upload(), invalid),
        "missing header": (lambda: upload(_part(nifti)), invalid),
        "unspecified format": (lambda: upload(_header(), _part(nifti)), invalid),
        "two series": (lambda: client.upload_volume(_two_series(volumes, tmp_path / "two")), invalid),
        "ends mid-file": (lambda: upload(_header(format=vpb.VOLUME_FORMAT_NIFTI), _part(nifti[:1000], end=False)),
                          invalid),
        "undecodable nifti": (lambda: upload(_header(format=vpb.VOLUME_FORMAT_NIFTI), _part(b"\0not a nifti" * 40)),
                              invalid),
        "total_bytes over the bound": (lambda: upload(_header(format=vpb.VOLUME_FORMAT_NIFTI, total_bytes=1 << 40),
                                                      _part(nifti)), exhausted),
        "unknown volume_id": (lambda: segment(volume_id="no-such-volume", slice_index=56, box=box), not_found),
        "box outside the slice": (lambda: segment(volume_id=colin_volume.volume_id, slice_index=56,
                                                  box=pb.Box(x0=500, y0=500, x1=600, y1=600)), invalid),
        "slice_index without box": (lambda: segment(volume_id=colin_volume.volume_id, slice_index=56), invalid),
        "unknown model": (lambda: segment(volume_id=colin_volume.volume_id, model="no-such-model", slice_index=56,
                                          box=box), not_found),
        "unknown segment": (lambda: stub.GetSegmentMask(vpb.GetSegmentMaskRequest(
            volume_id=colin_volume.volume_id, segment_id="no-such-segment"), timeout=30), not_found),
    }
    codes = {name: code_of(call) for name, (call, _) in cases.items()}
    assert codes == {name: expected for name, (_, expected) in cases.items()}
    with pytest.raises(grpc.RpcError) as truncated:
        upload(_header(format=vpb.VOLUME_FORMAT_NIFTI), _part(nifti[:1000], end=False))
    assert "the upload ended in the middle of file 1: send end_of_file on its last part" in truncated.value.details()
    # the gateway still serves, 2-D and 3-D
    image = image_from_array(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    assert client.segment(image=image, boxes=[(10, 10, 40, 40)]).masks[0].shape == (64, 64)
    assert client.delete_volume("no-such-volume") is False


def test_the_cli_segments_a_volume_writes_the_nifti_and_overlays_and_deletes_it(gateway, volumes, tmp_path, capsys):
    out, overlays = tmp_path / "mask.nii.gz", tmp_path / "overlays"
    image = volumes / "colin27_t1" / "image.nii.gz"
    x0, y0, x1, y1 = box_of(input_slice(np.asarray(nibabel.load(
        str(volumes / "colin27_t1" / "masks" / f"{COLIN_STRUCTURE}.nii.gz")).dataobj) > 0, COLIN_SLICE), COLIN_MARGIN)
    code = cli(["segment-volume", "--server", gateway.target, "--image", str(image), "--slice", str(COLIN_SLICE),
                "--box", str(x0), str(y0), str(x1), str(y1), "--range", str(COLIN_SLICE), str(COLIN_SLICE + 1),
                "--out", str(out), "--overlay-dir", str(overlays)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    slice_lines = [line for line in printed.splitlines() if line.startswith("slice ")]
    assert slice_lines and all("area=" in line and "predicted_iou=" in line for line in slice_lines)
    mask_image = nibabel.load(str(out))
    assert mask_image.shape == nibabel.load(str(image)).shape
    pngs = sorted(overlays.glob("slice-*.png"))
    assert len(pngs) == len(slice_lines)
    with Image.open(io.BytesIO(pngs[0].read_bytes())) as png:
        assert png.size == (181, 217) and png.mode == "RGB"
    volume_id = next(line.split()[1] for line in printed.splitlines() if line.startswith("volume_id:"))
    with grpc.insecure_channel(gateway.target) as channel:  # the CLI deleted its volume
        request = vpb.DeleteVolumeRequest(volume_id=volume_id)
        assert not vpb_grpc.VolumesStub(channel).DeleteVolume(request, timeout=10).deleted
