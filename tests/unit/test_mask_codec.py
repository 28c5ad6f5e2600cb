"""Round trips between the server's encoder (service.core.mask_codec) and the client's decoder
(medseg_client.masks), and malformed input for the decoder."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask

from medseg_client import masks as client_masks
from medseg_client import wire
from service.core.domain import PAYLOAD_ENCODINGS, MaskEncoding
from service.core.mask_codec import encode_mask

rle_counts = client_masks.rle_counts
ALL_ENCODINGS = list(PAYLOAD_ENCODINGS)   # DICOM_SEG is one object per answer, not a mask payload


def decode_mask(data: bytes, height: int, width: int, encoding: MaskEncoding) -> np.ndarray:
    """The client's decoder, given the server's encoding (the two enums share their values)."""
    return client_masks.decode_mask(data, height, width, client_masks.MaskEncoding(encoding.value))


def _random_mask(height: int, width: int, seed: int, density: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width)) < density


def _blob_mask(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 3) ** 2


EDGE_CASES = {
    "empty": np.zeros((17, 23), bool),
    "full": np.ones((17, 23), bool),
    "one_pixel_on": np.ones((1, 1), bool),
    "one_pixel_off": np.zeros((1, 1), bool),
    "single_row": _random_mask(1, 13, seed=1),
    "single_column": _random_mask(11, 1, seed=2),
    "odd_sizes": _random_mask(7, 9, seed=3),
    "last_pixel_only": np.pad(np.ones((1, 1), bool), ((4, 0), (6, 0))),
    "blob": _blob_mask(64, 96),
}


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: e.value)
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_round_trip_preserves_edge_case_masks(name: str, encoding: MaskEncoding) -> None:
    mask = EDGE_CASES[name]
    decoded = decode_mask(encode_mask(mask, encoding), *mask.shape, encoding)
    assert decoded.dtype == np.bool_
    assert decoded.shape == mask.shape
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: e.value)
@pytest.mark.parametrize("shape", [(256, 256), (333, 517), (1, 1000), (513, 3)])
def test_round_trip_preserves_random_masks(shape: tuple[int, int], encoding: MaskEncoding) -> None:
    mask = _random_mask(*shape, seed=shape[0] * 7 + shape[1])
    np.testing.assert_array_equal(decode_mask(encode_mask(mask, encoding), *shape, encoding), mask)


def test_bits_is_row_major_msb_first_and_zero_padded() -> None:
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = True  # bit 7 of byte 0
    mask[2, 2] = True  # pixel 8: bit 7 of byte 1, rest of byte 1 is padding
    assert encode_mask(mask, MaskEncoding.BITS) == bytes([0b1000_0000, 0b1000_0000])


def test_png_is_8bit_greyscale_0_and_255_at_mask_size() -> None:
    mask = _random_mask(10, 30, seed=4)
    with Image.open(io.BytesIO(encode_mask(mask, MaskEncoding.PNG))) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        assert image.size == (30, 10)
        values = np.asarray(image)
    assert set(np.unique(values)) <= {0, 255}
    np.testing.assert_array_equal(values == 255, mask)


@pytest.mark.parametrize("seed", range(5))
def test_rle_matches_pycocotools_counts_and_area(seed: int) -> None:
    mask = _random_mask(40 + seed, 31, seed=seed, density=0.1 + 0.2 * seed)
    data = encode_mask(mask, MaskEncoding.COCO_RLE)
    rle = {"size": list(mask.shape), "counts": data}
    assert int(coco_mask.area(rle)) == int(mask.sum())
    assert sum(rle_counts(data)[1::2]) == int(mask.sum())
    uncompressed = coco_mask.frPyObjects({"size": list(mask.shape), "counts": rle_counts(data)}, *mask.shape)
    assert uncompressed["counts"] == data


def test_non_bool_mask_is_read_as_nonzero() -> None:
    mask = np.array([[0, 3], [0, -1]], dtype=np.int16)
    decoded = decode_mask(encode_mask(mask, MaskEncoding.BITS), 2, 2, MaskEncoding.BITS)
    np.testing.assert_array_equal(decoded, mask != 0)


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: e.value)
@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), (0, 5), (5, 0)])
def test_encode_rejects_non_2d_or_empty_masks(shape: tuple[int, ...], encoding: MaskEncoding) -> None:
    with pytest.raises(ValueError):
        encode_mask(np.zeros(shape, bool), encoding)


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: e.value)
def test_decode_rejects_data_for_another_size(encoding: MaskEncoding) -> None:
    data = encode_mask(_random_mask(16, 16, seed=5), encoding)
    with pytest.raises(ValueError):
        decode_mask(data, 16, 17, encoding)


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: e.value)
def test_decode_rejects_zero_size(encoding: MaskEncoding) -> None:
    with pytest.raises(ValueError, match="at least 1 x 1"):
        decode_mask(b"", 0, 4, encoding)


def test_decode_bits_rejects_wrong_length_with_expected_count() -> None:
    with pytest.raises(ValueError, match="needs ceil"):
        decode_mask(b"\x00" * 3, 5, 5, MaskEncoding.BITS)  # needs 4 bytes


@pytest.mark.parametrize("data", [b"", b"not a png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_decode_png_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match="PNG mask"):
        decode_mask(data, 4, 4, MaskEncoding.PNG)


@pytest.mark.parametrize(
    "data",
    [b"", b"1", b"\x7f", b"0?", encode_mask(np.ones((5, 4), bool), MaskEncoding.COCO_RLE)],
    ids=["empty", "short", "bad_char", "truncated", "too_long"],
)
def test_decode_rle_rejects_malformed_counts(data: bytes) -> None:
    with pytest.raises(ValueError, match="COCO RLE"):
        decode_mask(data, 4, 4, MaskEncoding.COCO_RLE)


@settings(max_examples=60, deadline=None)
@given(
    mask=arrays(
        dtype=np.bool_,
        shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    ),
    encoding=st.sampled_from(ALL_ENCODINGS),
)
def test_round_trip_property(mask: np.ndarray, encoding: MaskEncoding) -> None:
    decoded = decode_mask(encode_mask(mask, encoding), *mask.shape, encoding)
    np.testing.assert_array_equal(decoded, mask)


def test_server_and_client_encodings_are_the_wire_names() -> None:
    names = set(wire.MASK_ENCODING_TO_PB)
    assert {e.value for e in MaskEncoding} == names
    assert {e.value for e in client_masks.MaskEncoding} == names
    assert set(wire.MASK_ENCODINGS.values()) == names


def test_client_decoder_takes_the_encoding_name_too() -> None:
    mask = _random_mask(5, 7, seed=6)
    decoded = client_masks.decode_mask(encode_mask(mask, MaskEncoding.PNG), 5, 7, "png")
    np.testing.assert_array_equal(decoded, mask)
    with pytest.raises(ValueError, match="unsupported mask encoding"):
        client_masks.decode_mask(b"", 5, 7, "jpeg")


def test_rle_decoding_without_pycocotools_names_the_extra(monkeypatch) -> None:
    data = encode_mask(_random_mask(6, 6, seed=7), MaskEncoding.COCO_RLE)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r"medseg-client\[rle\]"):
        client_masks.decode_mask(data, 6, 6, client_masks.MaskEncoding.COCO_RLE)
