"""The per-request memory estimate (issue 14, finding 3): image sizes read from headers
without decoding, exact answer sizes for bit-packed masks, masks charged O(H*W) whatever the
prompt count, and answers that cannot fit the send limit refused up front."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from service.core.domain import (Box, ImageInput, ImageLimits, MaskEncoding, MaskResult, ModelInfo, Prompt, PromptKind,
                                 RawPixels, SegmentRequest, SegmentResult)
from service.core.mask_codec import encode_mask
from service.core.request_memory import (AnswerTooLarge, answer_bounds, embed_estimate, image_footprint,
                                         segment_estimate)
from service.edge import convert

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _pil(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def _tiff(shape, dtype) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros(shape, dtype))
    return buffer.getvalue()


def _nifti(shape, gz: bool) -> bytes:
    image = nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4))
    data = image.to_bytes()
    return gzip.compress(data) if gz else data


@pytest.mark.parametrize("name,data,size", [
    ("png grey", _pil("L", (300, 200), "PNG"), (200, 300)),
    ("png rgb", _pil("RGB", (64, 50), "PNG"), (50, 64)),
    ("jpeg", _pil("RGB", (120, 90), "JPEG"), (90, 120)),
    ("tiff uint16", _tiff((70, 80), np.uint16), (70, 80)),
    ("nifti", _nifti((40, 30, 5), False), (30, 40)),
    ("nifti gz", _nifti((40, 30, 5), True), (30, 40)),
])
def test_the_image_size_comes_from_the_header(name, data, size):
    footprint = image_footprint(ImageInput(encoded=data))
    assert footprint is not None, name
    assert (footprint.height, footprint.width) == size
    assert footprint.decode_bytes >= size[0] * size[1] * 4  # at least the float32 result


def test_dicom_rows_and_columns_are_read_without_the_pixels():
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    footprint = image_footprint(ImageInput(encoded=data))
    assert (footprint.height, footprint.width) == (128, 128)


def test_raw_arrays_and_images_the_decoder_refuses_from_their_header():
    raw = ImageInput(raw=RawPixels("float32", (100, 50, 3), bytes(100 * 50 * 3 * 4)))
    footprint = image_footprint(raw)
    assert (footprint.height, footprint.width) == (100, 50) and footprint.decode_bytes > 100 * 50 * 3 * 4
    assert image_footprint(ImageInput(encoded=b"\x00garbage" * 10)) is None  # the decoder refuses it at once
    truncated = _pil("L", (30, 30), "JPEG")[:4]  # a JPEG without its frame header
    assert image_footprint(ImageInput(encoded=truncated)) is None
    claiming = bytearray(_pil("L", (4, 4), "PNG"))
    claiming[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR over the size limits
    assert image_footprint(ImageInput(encoded=bytes(claiming))) is None
    request = SegmentRequest("m", (Prompt(box=Box(0, 0, 10, 10)),), ImageInput(encoded=bytes(claiming)))
    assert segment_estimate(request, answer_limit=1 << 20).masks == 0  # no answer refusal: the decoder says why


MODEL = ModelInfo("m", "1", 256, frozenset({PromptKind.BOX}), frozenset({PromptKind.BOX}))


@pytest.mark.parametrize("prompts,logits", [(1, False), (5, False), (3, True)])
def test_bit_packed_answers_are_estimated_exactly(prompts, logits):
    h, w = 123, 77
    rng = np.random.default_rng(prompts)
    masks = tuple(MaskResult(rng.random((h, w)) > 0.5, 0.5, np.zeros((256, 256), np.float32) if logits else None)
                  for _ in range(prompts))
    message = convert.segment_response_to_proto(SegmentResult(MODEL, "0" * 32, h, w, masks), MaskEncoding.BITS)
    size = len(message.SerializeToString())
    least, most = answer_bounds(h, w, prompts, MaskEncoding.BITS, logits)
    assert least <= size <= most and most - least <= 256 + 64 * prompts  # exact but for the framing


@pytest.mark.parametrize("encoding", [MaskEncoding.PNG, MaskEncoding.COCO_RLE])
def test_compressed_answers_stay_within_their_bounds_even_for_noise(encoding):
    h, w = 97, 131
    noise = np.random.default_rng(1).random((h, w)) > 0.5
    least, most = answer_bounds(h, w, 1, encoding)
    for mask in (noise, np.zeros((h, w), bool), np.ones((h, w), bool)):
        message = convert.segment_response_to_proto(SegmentResult(MODEL, "0" * 32, h, w, (MaskResult(mask, 0.5),)),
                                                    encoding)
        assert least <= len(encode_mask(mask, encoding)) <= len(message.SerializeToString()) <= most


def _request(prompts: int, encoding=MaskEncoding.BITS, side=(4000, 5000)) -> SegmentRequest:
    raw = RawPixels("uint8", side, bytes(side[0] * side[1]))
    return SegmentRequest("m", tuple(Prompt(box=Box(0, 0, 10, 10)) for _ in range(prompts)), ImageInput(raw=raw),
                          encoding=encoding)


def test_masks_are_charged_once_whatever_the_prompt_count_and_the_answer_by_its_size():
    one, many = (segment_estimate(_request(n, MaskEncoding.PNG), answer_limit=64 << 20) for n in (1, 32))
    assert one.masks == many.masks  # one mask at a time: O(H*W), not O(P*H*W)
    assert many.answer <= 3 * (64 << 20)  # never charged above what can be sent
    assert many.total < 2 * one.total
    bits = segment_estimate(_request(8), answer_limit=64 << 20)
    assert bits.answer == 3 * answer_bounds(4000, 5000, 8, MaskEncoding.BITS)[1]


def test_an_answer_that_cannot_fit_the_send_limit_is_refused_up_front():
    with pytest.raises(AnswerTooLarge) as info:
        segment_estimate(_request(32), answer_limit=64 << 20)  # 32 x 2.5 MB of bits
    assert info.value.reason == "answer_size" and str(64 << 20) in info.value.message
    segment_estimate(_request(32, MaskEncoding.PNG), answer_limit=64 << 20)  # PNG may fit: computed, then checked
    embed = embed_estimate(_request(1).image)
    assert embed.masks == embed.answer == 0 and embed.decode > 20_000_000
