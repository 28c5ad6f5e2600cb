"""Client SDK and CLI without the real gateway: prompts, images, arguments, overlay, and a
fake in-process servicer (127.0.0.1, port 0) for request/response handling."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import nibabel
import numpy as np
import pytest
from PIL import Image

import medseg_client
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client import SegmentationClient, build_prompts, image_from_array, image_from_file, wire
from medseg_client.__main__ import build_parser, main, mask_paths
from medseg_client.overlay import draw_overlay, load_display_image, mask_outline
from service.core.domain import MaskEncoding
from service.core.mask_codec import encode_mask

CT_SMALL = Path("/work/shared/data/dicom/CT_small.dcm")


# --------------------------------------------------------------------------- prompts
def test_build_prompts_makes_one_prompt_per_box() -> None:
    prompts = build_prompts(boxes=[(1, 2, 3, 4), (5, 6, 7, 8)])
    assert [(p.box.x0, p.box.y1) for p in prompts] == [(1, 4), (5, 8)]
    assert all(not p.points for p in prompts)


def test_build_prompts_joins_points_to_a_single_box() -> None:
    (prompt,) = build_prompts(boxes=[(0, 0, 10, 10)], points=[(3, 4, 1), (5, 6, 0)])
    assert prompt.HasField("box")
    assert [(p.x, p.y, p.positive) for p in prompt.points] == [(3, 4, True), (5, 6, False)]


def test_build_prompts_puts_all_points_in_one_prompt_without_box() -> None:
    (prompt,) = build_prompts(points=[(3, 4, 1), (5, 6, 1)])
    assert not prompt.HasField("box")
    assert len(prompt.points) == 2


def test_no_boxes_and_no_points_build_no_prompt_for_prompt_free_models() -> None:
    assert build_prompts(boxes=[], points=[]) == []


@pytest.mark.parametrize(
    ("boxes", "points"),
    [
        ([(0, 0, 5, 5), (1, 1, 6, 6)], [(2, 2, 1)]),  # points with several boxes
        ([(0, 0, 5)], []),  # short box
        ([], [(1, 2, 2)]),  # bad label
        ([], [(1, 2)]),  # short point
    ],
)
def test_build_prompts_rejects_ambiguous_or_malformed_input(boxes: list, points: list) -> None:
    with pytest.raises(ValueError):
        build_prompts(boxes=boxes, points=points)


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"),
                                             (".tif", "TIFF"), (".TIFF", "TIFF")])
def test_image_from_file_sends_encoded_formats_unchanged(tmp_path: Path, suffix: str, fmt: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(path, format=fmt)
    image = image_from_file(path, window=(40, 400), slice_index=0)
    assert image.WhichOneof("source") == "encoded"
    assert image.encoded == path.read_bytes()
    assert (image.window.center, image.window.width, image.slice_index) == (40, 400, 0)


def test_image_from_file_sends_dicom_unchanged_without_options() -> None:
    image = image_from_file(CT_SMALL)
    assert image.encoded == CT_SMALL.read_bytes()
    assert not image.HasField("window") and not image.HasField("slice_index")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_image_from_file_sends_nifti_unchanged(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"vol{suffix}"
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 3), np.int16), np.eye(4)), path)
    assert image_from_file(path, slice_index=2).encoded == path.read_bytes()


def test_image_from_file_sends_npy_as_little_endian_raw(tmp_path: Path) -> None:
    array = (np.arange(12, dtype=">i2") - 6).reshape(3, 4)  # big-endian on disk
    np.save(tmp_path / "ct.npy", array)
    raw = image_from_file(tmp_path / "ct.npy").raw
    assert (raw.dtype, list(raw.shape)) == (pb.DTYPE_INT16, [3, 4])
    np.testing.assert_array_equal(np.frombuffer(raw.data, "<i2").reshape(3, 4), array)


def test_image_from_array_slices_volumes_on_the_last_axis() -> None:
    volume = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    raw = image_from_array(volume, slice_index=4).raw
    assert list(raw.shape) == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(raw.data, "<f4").reshape(2, 3), volume[:, :, 4])
    assert list(image_from_array(volume).raw.shape) == [2, 3]  # middle slice
    assert list(image_from_array(np.zeros((2, 3, 3), np.uint8)).raw.shape) == [2, 3, 3]  # RGB


@pytest.mark.parametrize(("dtype", "wire"), [(bool, pb.DTYPE_UINT8), (np.float16, pb.DTYPE_FLOAT32),
                                             (np.int64, pb.DTYPE_INT32), (np.float64, pb.DTYPE_FLOAT64)])
def test_image_from_array_maps_dtypes(dtype: type, wire: int) -> None:
    assert image_from_array(np.ones((2, 2), dtype)).raw.dtype == wire


BAD_NPY = {
    "pickled": np.array([{}], dtype=object),
    "complex": np.ones((2, 2), np.complex64),
    "int64_overflow": np.full((2, 2), 2**40),
    "4d": np.ones((2, 2, 2, 2)),
}


@pytest.mark.parametrize("name", list(BAD_NPY))
def test_image_from_file_rejects_unsupported_npy(tmp_path: Path, name: str) -> None:
    np.save(tmp_path / "a.npy", BAD_NPY[name], allow_pickle=True)
    with pytest.raises(ValueError):
        image_from_file(tmp_path / "a.npy")


def test_image_from_file_rejects_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported image file"):
        image_from_file(tmp_path / "a.bmp")


@pytest.mark.parametrize("window", [(40, 0), (40, -1), (1,)])
def test_image_from_file_rejects_bad_window(window: tuple) -> None:
    with pytest.raises(ValueError):
        image_from_file(CT_SMALL, window=window)


# --------------------------------------------------------------------------- CLI parsing
def test_cli_parses_repeated_boxes_and_points() -> None:
    args = build_parser().parse_args(
        ["segment", "--server", "h:1", "--image", "a.png", "--box", "1", "2", "3", "4",
         "--box", "5", "6", "7", "8.5", "--point", "10", "11", "1", "--point", "12", "13", "0",
         "--out", "m.png", "--window", "40", "400", "--slice", "3"]
    )
    assert args.box == [[1, 2, 3, 4], [5, 6, 7, 8.5]]
    assert args.point == [[10, 11, 1], [12, 13, 0]]
    assert (args.model, args.window, args.slice, args.timeout) == ("", [40, 400], 3, 60.0)


@pytest.mark.parametrize(
    "extra",
    [
        ["--point", "1", "2", "7"],  # bad label
        ["--box", "0", "0", "4", "4", "--box", "1", "1", "5", "5", "--point", "2", "2", "1"],
        ["--box", "0", "0", "4"],  # three numbers
    ],
    ids=["bad_label", "points_with_two_boxes", "short_box"],
)
def test_cli_rejects_bad_prompt_arguments(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--server", "h:1", "--image", "a.png", "--out", "m.png", *extra])
    assert exc.value.code == 2


def test_mask_paths_add_one_file_per_prompt_next_to_the_union() -> None:
    assert mask_paths(Path("o/m.png"), 1) == [Path("o/m.png")]
    assert mask_paths(Path("o/m.png"), 2) == [Path("o/m.png"), Path("o/m-0.png"), Path("o/m-1.png")]


# --------------------------------------------------------------------------- overlay
def test_overlay_of_png_has_input_size_and_draws_outline(tmp_path: Path) -> None:
    Image.new("L", (40, 30), 80).save(tmp_path / "in.png")
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True
    out = draw_overlay(load_display_image(tmp_path / "in.png"), [mask], [(10, 5, 30, 15)], [(20, 10, 1)])
    out.save(tmp_path / "ov.png")
    with Image.open(tmp_path / "ov.png") as saved:
        assert (saved.format, saved.size, saved.mode) == ("PNG", (40, 30), "RGB")
    assert tuple(np.asarray(out)[10, 20]) == (0, 255, 0)  # foreground point


@pytest.mark.parametrize("kind", ["dcm", "npy", "nii.gz"])
def test_display_image_of_medical_formats_has_input_size(tmp_path: Path, kind: str) -> None:
    if kind == "dcm":
        path = CT_SMALL
    elif kind == "npy":
        path = tmp_path / "a.npy"
        np.save(path, np.random.default_rng(0).normal(size=(20, 30, 5)).astype(np.float32))
    else:
        path = tmp_path / "a.nii.gz"
        nibabel.save(nibabel.Nifti1Image(np.ones((20, 30, 5), np.int16), np.eye(4)), path)
    image = load_display_image(path, slice_index=1 if kind != "dcm" else None)
    assert image.mode == "RGB"
    # NIfTI as the gateway decodes it: rows follow the second voxel axis.
    assert image.size == {"dcm": (128, 128), "npy": (30, 20), "nii.gz": (20, 30)}[kind]


def test_overlay_rejects_mask_of_another_size() -> None:
    with pytest.raises(ValueError):
        draw_overlay(Image.new("RGB", (8, 8)), [np.zeros((8, 9), bool)])


def test_mask_outline_keeps_the_border_of_a_square() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    assert mask_outline(mask).sum() == 12  # 4x4 square minus its 2x2 interior


# --------------------------------------------------------------------------- fake servicer
class FakeSegmentation(pb_grpc.SegmentationServicer):
    """Answers each box prompt with the box's pixels; model "missing" is NOT_FOUND."""

    def __init__(self) -> None:
        self.requests: list[pb.SegmentRequest] = []

    def Segment(self, request: pb.SegmentRequest, context: grpc.ServicerContext) -> pb.SegmentResponse:
        self.requests.append(request)
        if request.model == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' is not served")
        height, width = _size(request.image) if request.HasField("image") else (16, 16)
        encoding = MaskEncoding(wire.MASK_ENCODINGS[request.encoding])  # as the gateway maps it
        masks = []
        for prompt in request.prompts:
            mask = np.zeros((height, width), bool)
            box = prompt.box if prompt.HasField("box") else pb.Box(x0=0, y0=0, x1=1, y1=1)
            mask[int(box.y0):int(box.y1), int(box.x0):int(box.x1)] = True
            logits = pb.LowResLogits(height=4, width=4, data=np.ones(16, "<f4").tobytes())
            masks.append(pb.Mask(height=height, width=width, encoding=request.encoding or 1,
                                 data=encode_mask(mask, encoding), predicted_iou=0.5,
                                 area=int(mask.sum()),
                                 low_res_logits=logits if request.return_low_res_logits else None))
        return pb.SegmentResponse(masks=masks, model=pb.ModelRef(name="fake", version="1"),
                                  image_id="img-1", height=height, width=width)

    def EmbedImage(self, request: pb.EmbedImageRequest, context: grpc.ServicerContext) -> pb.EmbedImageResponse:
        height, width = _size(request.image)
        return pb.EmbedImageResponse(image_id="img-1", model=pb.ModelRef(name="fake", version="1"),
                                     height=height, width=width, cached=True)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        info = pb.ModelInfo(name="litemedsam", version="1", input_size=256, is_default=True,
                            prompt_kinds=[pb.PROMPT_KIND_BOX, pb.PROMPT_KIND_POINT],
                            required_prompt_kinds=[pb.PROMPT_KIND_BOX])
        volume_only = pb.ModelInfo(name="unet_25d", version="2", input_size=128, context_slices=2)
        return pb.ListModelsResponse(models=[info, volume_only])


def _size(image: pb.Image) -> tuple[int, int]:
    if image.WhichOneof("source") == "raw":
        return int(image.raw.shape[0]), int(image.raw.shape[1])
    with Image.open(io.BytesIO(image.encoded)) as decoded:
        return decoded.height, decoded.width


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeSegmentation]]:
    servicer = FakeSegmentation()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SegmentationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.mark.parametrize("encoding", [pb.MASK_ENCODING_BITS, pb.MASK_ENCODING_PNG, pb.MASK_ENCODING_COCO_RLE])
def test_segment_decodes_masks_in_every_encoding(fake_server, encoding: int) -> None:
    address, servicer = fake_server
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment(image=image_from_array(np.zeros((12, 20), np.uint8)),
                                boxes=[(2, 3, 7, 9)], encoding=encoding, return_low_res_logits=True)
    assert servicer.requests[0].encoding == encoding
    assert (result.height, result.width, result.image_id, result.model_name) == (12, 20, "img-1", "fake")
    assert result.masks[0].shape == (12, 20) and result.areas == [30]
    assert result.low_res_logits[0].shape == (4, 4) and result.low_res_logits[0].dtype == np.float32


# DICOM_SEG carries no mask data and needs a DICOM image: tests/unit/test_client_seg.py.
@pytest.mark.parametrize("encoding", [e for e in medseg_client.MaskEncoding if e.value != "dicom_seg"],
                         ids=lambda e: e.value)
def test_segment_takes_the_sdk_mask_encoding_enum(fake_server, encoding) -> None:
    address, servicer = fake_server
    with SegmentationClient(address, timeout=10) as client:
        result = client.segment(image=image_from_array(np.zeros((6, 9), np.uint8)), boxes=[(1, 1, 4, 5)],
                                encoding=encoding)
    assert servicer.requests[0].encoding == wire.MASK_ENCODING_TO_PB[encoding.value]
    assert result.areas == [12]


def test_segment_rejects_an_unknown_wire_encoding_before_sending(fake_server) -> None:
    address, servicer = fake_server
    with SegmentationClient(address, timeout=10) as client, pytest.raises(ValueError, match="mask encoding"):
        client.segment(image_id="img-1", boxes=[(0, 0, 1, 1)], encoding=9)
    assert servicer.requests == []


def test_segment_by_image_id_sends_only_prompts(fake_server) -> None:
    address, servicer = fake_server
    with SegmentationClient(address) as client:
        result = client.segment(image_id="img-1", prompts=[pb.Prompt(box=pb.Box(x0=0, y0=0, x1=2, y1=2))])
    assert servicer.requests[0].image_id == "img-1" and result.low_res_logits is None
    with SegmentationClient(address) as client, pytest.raises(ValueError):
        client.segment(image_id="x", image=pb.Image(), boxes=[(0, 0, 1, 1)])


def test_segment_surfaces_grpc_errors_as_rpc_error(fake_server) -> None:
    with SegmentationClient(fake_server[0]) as client, pytest.raises(grpc.RpcError) as exc:
        client.segment(image_id="img-1", boxes=[(0, 0, 1, 1)], model="missing")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_cli_segment_writes_union_per_prompt_masks_and_overlay(fake_server, tmp_path, capsys) -> None:
    Image.new("L", (20, 12), 50).save(tmp_path / "in.png")
    out = tmp_path / "mask.png"
    code = main(["segment", "--server", fake_server[0], "--image", str(tmp_path / "in.png"),
                 "--box", "0", "0", "5", "5", "--box", "10", "2", "20", "12",
                 "--out", str(out), "--overlay", str(tmp_path / "ov.png")])
    assert code == 0
    union, first, overlay = (_read_png(p) for p in (out, tmp_path / "mask-0.png", tmp_path / "ov.png"))
    assert union.shape == (12, 20) and set(np.unique(union)) == {0, 255}
    assert (union == 255).sum() == 25 + 100 and (first == 255).sum() == 25
    assert (tmp_path / "mask-1.png").exists() and overlay.shape == (12, 20, 3)
    stdout = capsys.readouterr().out
    assert "mask 1: predicted_iou=0.5000 area=100 px" in stdout and "image_id: img-1" in stdout


def test_cli_reports_grpc_error_in_one_line(fake_server, tmp_path, capsys) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "in.png")
    code = main(["segment", "--server", fake_server[0], "--image", str(tmp_path / "in.png"),
                 "--box", "0", "0", "4", "4", "--model", "missing", "--out", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: NOT_FOUND: ") and err.count("\n") == 1


def test_cli_models_prints_a_table_with_required_kinds_marked(fake_server, capsys) -> None:
    assert main(["models", "--server", fake_server[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "INPUT"]
    assert "box*, point" in lines[1] and lines[1].endswith("yes")
    assert "one" in lines[1].split() and "+-2 (volumes only)" in lines[2] and not lines[2].endswith("yes")


def test_cli_embed_prints_image_id_and_cached(fake_server, tmp_path, capsys) -> None:
    Image.new("L", (8, 6)).save(tmp_path / "in.png")
    assert main(["embed", "--server", fake_server[0], "--image", str(tmp_path / "in.png")]) == 0
    out = capsys.readouterr().out
    assert "image_id: img-1" in out and "cached: yes" in out and "6 x 8" in out


def test_cli_overlay_without_pydicom_names_the_extra_before_calling(fake_server, tmp_path, capsys,
                                                                     monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as in an install without [files]
    code = main(["segment", "--server", fake_server[0], "--image", str(CT_SMALL), "--box", "0", "0", "9", "9",
                 "--out", str(tmp_path / "m.png"), "--overlay", str(tmp_path / "ov.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'medseg-client[files]'" in err
    assert fake_server[1].requests == [] and not (tmp_path / "m.png").exists()


def test_cli_is_python_m_medseg_client_and_service_client_is_an_alias() -> None:
    import service.client
    import service.client.__main__ as alias_main

    assert build_parser().prog == "python -m medseg_client"
    assert alias_main.main is main
    assert service.client.SegmentationClient is SegmentationClient
    assert set(service.client.__all__) == set(medseg_client.__all__)
    assert {"MaskEncoding", "decode_mask"} <= set(medseg_client.__all__)


def test_cli_reports_local_file_errors_without_traceback(tmp_path, capsys) -> None:
    code = main(["embed", "--server", "127.0.0.1:1", "--image", str(tmp_path / "missing.png")])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")
