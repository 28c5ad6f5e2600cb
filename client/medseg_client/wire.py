"""The wire enums of ``medseg.v1`` mapped to plain names: the one table, for client and server.

The gateway's API edge (``service/edge/convert.py``) uses these maps too, so a value added to
the proto is mapped in one place. Names, not classes: the server maps them onto its own
domain types (``numpy`` dtype names; ``MaskEncoding`` values).
"""

from __future__ import annotations

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb

__all__ = ["DICOM_SEG_ENCODING", "DTYPES", "DTYPE_TO_PB", "MASK_ENCODINGS", "MASK_ENCODING_TO_PB", "SEG_KINDS",
           "SEG_KIND_TO_PB", "VOLUME_FORMATS", "VOLUME_FORMAT_TO_PB"]

#: ``pb.DType`` -> numpy dtype name of a ``RawArray`` (``DTYPE_UNSPECIFIED`` is not in it: rejected).
DTYPES: dict[int, str] = {
    pb.DTYPE_UINT8: "uint8",
    pb.DTYPE_INT8: "int8",
    pb.DTYPE_UINT16: "uint16",
    pb.DTYPE_INT16: "int16",
    pb.DTYPE_UINT32: "uint32",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT64: "float64",
}
#: numpy dtype name -> ``pb.DType``.
DTYPE_TO_PB: dict[str, int] = {name: code for code, name in DTYPES.items()}

#: ``pb.MaskEncoding`` -> encoding name (the values of ``MaskEncoding``, client and server);
#: ``MASK_ENCODING_UNSPECIFIED`` means bits, as the proto says.
MASK_ENCODINGS: dict[int, str] = {
    pb.MASK_ENCODING_UNSPECIFIED: "bits",
    pb.MASK_ENCODING_BITS: "bits",
    pb.MASK_ENCODING_PNG: "png",
    pb.MASK_ENCODING_COCO_RLE: "coco_rle",
    pb.MASK_ENCODING_DICOM_SEG: "dicom_seg",
}
#: encoding name -> the ``pb.MaskEncoding`` a mask in that encoding is labelled with.
MASK_ENCODING_TO_PB: dict[str, int] = {
    name: code for code, name in MASK_ENCODINGS.items() if code != pb.MASK_ENCODING_UNSPECIFIED
}

#: ``MASK_ENCODING_DICOM_SEG`` and its name: in :data:`MASK_ENCODINGS`, but no mask travels in it (the
#: masks then carry no data; the answer's ``dicom_seg`` holds one SEG for all of them): the client's
#: ``decode_mask`` refuses it, and only the 2-D ``segment`` call sends it.
DICOM_SEG_ENCODING: tuple[int, str] = (pb.MASK_ENCODING_DICOM_SEG, MASK_ENCODINGS[pb.MASK_ENCODING_DICOM_SEG])

#: ``pb.SegKind`` -> the kind's name; ``SEG_KIND_UNSPECIFIED`` means binary, as the proto says.
SEG_KINDS: dict[int, str] = {
    pb.SEG_KIND_UNSPECIFIED: "binary",
    pb.SEG_KIND_BINARY: "binary",
    pb.SEG_KIND_LABELMAP: "labelmap",
}
#: kind name -> ``pb.SegKind``.
SEG_KIND_TO_PB: dict[str, int] = {name: code for code, name in SEG_KINDS.items() if code != pb.SEG_KIND_UNSPECIFIED}

#: ``vpb.VolumeFormat`` -> the volume format's name (``service.core.volume.FORMATS`` on the server;
#: ``VOLUME_FORMAT_UNSPECIFIED`` is not in it: rejected).
VOLUME_FORMATS: dict[int, str] = {
    vpb.VOLUME_FORMAT_DICOM_SERIES: "dicom_series",
    vpb.VOLUME_FORMAT_NIFTI: "nifti",
    vpb.VOLUME_FORMAT_RAW: "raw",
}
#: volume format name -> ``vpb.VolumeFormat``.
VOLUME_FORMAT_TO_PB: dict[str, int] = {name: code for code, name in VOLUME_FORMATS.items()}
