"""Every malformed or hostile request gets its status code, and the next good one succeeds."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from tests.integration.conftest import MAX_REQUEST_BYTES

INVALID, NOT_FOUND, EXHAUSTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
W, H = 64, 48


def _raw(array: np.ndarray, dtype=pb.DTYPE_FLOAT32) -> pb.Image:
    return pb.Image(raw=pb.RawArray(dtype=dtype, shape=list(array.shape), data=array.tobytes()))


GOOD_IMAGE = _raw(np.random.default_rng(0).random((H, W), dtype=np.float32))
BOX = pb.Box(x0=8, y0=8, x1=40, y1=30)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _seg(image=GOOD_IMAGE, prompts=None, **kw) -> pb.SegmentRequest:
    return pb.SegmentRequest(image=image, prompts=prompts if prompts is not None else [pb.Prompt(box=BOX)], **kw)


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(_png(4, 4))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR size (CRC now wrong too)
    return bytes(data)


CASES = {
    "undecodable_bytes": (_seg(pb.Image(encoded=b"\x00garbage" * 20)), INVALID),
    "truncated_png": (_seg(pb.Image(encoded=_png(64, 64)[:40])), INVALID),
    "png_claiming_huge_size": (_seg(pb.Image(encoded=_png_claiming(100_000, 100_000))), INVALID),
    "no_image_at_all": (pb.SegmentRequest(prompts=[pb.Prompt(box=BOX)]), INVALID),
    "raw_wrong_length": (_seg(pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_FLOAT32, shape=[H, W], data=b"\0" * 10))),
                         INVALID),
    "raw_unspecified_dtype": (_seg(pb.Image(raw=pb.RawArray(shape=[2, 2], data=b"\0" * 4))), INVALID),
    "raw_4d_shape": (_seg(_raw(np.zeros((2, 2, 2, 2), np.float32))), INVALID),
    "raw_nan_pixels": (_seg(_raw(np.full((H, W), np.nan, np.float32))), INVALID),
    "raw_inf_pixels": (_seg(_raw(np.full((H, W), np.inf, np.float32))), INVALID),
    "window_width_zero": (_seg(pb.Image(raw=GOOD_IMAGE.raw, window=pb.Window(center=0, width=0))), INVALID),
    "box_outside_image": (_seg(prompts=[pb.Prompt(box=pb.Box(x0=500, y0=500, x1=600, y1=600))]), INVALID),
    "box_zero_area": (_seg(prompts=[pb.Prompt(box=pb.Box(x0=10, y0=10, x1=10, y1=20))]), INVALID),
    "box_nan": (_seg(prompts=[pb.Prompt(box=pb.Box(x0=float("nan"), y0=1, x1=5, y1=5))]), INVALID),
    "no_prompts": (_seg(prompts=[]), INVALID),
    "empty_prompt": (_seg(prompts=[pb.Prompt()]), INVALID),
    "too_many_prompts": (_seg(prompts=[pb.Prompt(box=BOX)] * 9), INVALID),
    "point_on_box_only_model": (_seg(prompts=[pb.Prompt(points=[pb.Point(x=5, y=5, positive=True)])]), INVALID),
    "mask_input_wrong_size": (_seg(prompts=[pb.Prompt(box=BOX, mask_input=pb.LowResLogits(
        height=8, width=8, data=np.zeros(64, "<f4").tobytes()))]), INVALID),
    "unknown_model": (_seg(model="no_such_model"), NOT_FOUND),
    "unknown_image_id": (pb.SegmentRequest(image_id="0" * 32, prompts=[pb.Prompt(box=BOX)]), NOT_FOUND),
    "payload_over_limit": (_seg(pb.Image(encoded=b"\0" * (MAX_REQUEST_BYTES + 1024))), EXHAUSTED),
}


@pytest.fixture(scope="module")
def stub(gateway):
    channel = grpc.insecure_channel(gateway.target, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.SegmentationStub(channel)
    channel.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(stub, gateway, name):
    request, code = CASES[name]
    with pytest.raises(grpc.RpcError) as info:
        stub.Segment(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert info.value.details()  # a message the client developer can act on
    good = stub.Segment(_seg(), timeout=30)
    assert len(good.masks) == 1 and good.masks[0].height == H


def test_embed_without_image_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedImage(pb.EmbedImageRequest(), timeout=10)
    assert info.value.code() == INVALID


def test_no_internal_errors_were_logged(stub, gateway):
    for request, _ in CASES.values():
        try:
            stub.Segment(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.INTERNAL, exc.details()
    assert "Traceback" not in gateway.log()
