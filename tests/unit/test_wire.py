"""The one table of wire enums (medseg_client.wire) covers the proto and agrees with the server."""

from __future__ import annotations

import numpy as np

from medseg_client import wire
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client.masks import MaskEncoding as ClientMaskEncoding
from service.core.domain import MaskEncoding
from service.core.imageio import RAW_DTYPES
from service.edge import convert


def test_every_proto_dtype_but_unspecified_has_a_numpy_name() -> None:
    assert set(wire.DTYPES) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}
    assert all(np.dtype(name).name == name for name in wire.DTYPES.values())
    assert {wire.DTYPE_TO_PB[name]: name for name in wire.DTYPE_TO_PB} == wire.DTYPES


def test_the_servers_raw_decoder_takes_exactly_the_wire_dtypes() -> None:
    assert set(wire.DTYPES.values()) == set(RAW_DTYPES)


def test_every_proto_mask_encoding_is_mapped_and_unspecified_means_bits() -> None:
    assert set(wire.MASK_ENCODINGS) == set(pb.MaskEncoding.values())
    assert wire.MASK_ENCODINGS[pb.MASK_ENCODING_UNSPECIFIED] == "bits"
    assert pb.MASK_ENCODING_UNSPECIFIED not in wire.MASK_ENCODING_TO_PB.values()
    assert all(wire.MASK_ENCODINGS[code] == name for name, code in wire.MASK_ENCODING_TO_PB.items())


def test_client_and_server_enums_map_through_the_same_names() -> None:
    assert {e.value for e in ClientMaskEncoding} == {e.value for e in MaskEncoding} == set(wire.MASK_ENCODING_TO_PB)
    assert convert._DTYPES is wire.DTYPES
    assert {code: e.value for code, e in convert._ENCODINGS.items()} == wire.MASK_ENCODINGS
    assert {e.value: code for e, code in convert._ENCODING_TO_PB.items()} == wire.MASK_ENCODING_TO_PB
