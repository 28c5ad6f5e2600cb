"""Python SDK for the ``medseg.v1.Segmentation`` gRPC service.

Example::

    from medseg_client import SegmentationClient, image_from_file

    with SegmentationClient("localhost:50051") as client:
        result = client.segment(image=image_from_file("ct.dcm"), boxes=[(40, 52, 98, 110)])
        mask = result.masks[0]          # bool (H, W) at the input image's size

Over TLS, with a client certificate (mutual TLS) and a bearer token::

    creds = tls_credentials(ca_file="hospital-ca.pem", cert_file="me.crt", key_file="me.key")
    with SegmentationClient("seg.hospital.example:443", credentials=creds, token=token) as client:
        ...

Transport rule: without ``credentials`` the client uses plaintext only for a loopback target
(``127.0.0.1``, ``localhost``, ``::1``, ``unix:``; for a list such as ``ipv4:a,b`` every
address) or when ``insecure=True`` is passed; any other target
gets TLS verified against the system's trust store. A bearer token is never sent in
plaintext to a non-loopback target unless ``insecure=True``.

3-D volumes (``medseg.v1.Volumes``, see :mod:`medseg_client.volumes`) on the same client::

    info = client.upload_volume("ct.nii.gz", window=(40, 400))   # or a DICOM folder, or .npy + spacing
    stream = client.segment_volume(info.volume_id, slice_index=54, box=(80, 60, 180, 170))
    for s in stream:
        ...                             # s.mask: bool (H, W) of slice s.slice_index, as it is done
    mask = client.get_segment_mask(info.volume_id, stream.summary.segment_id).nifti_gz

DICOM Segmentation objects (SEG, see :mod:`medseg_client.seg`)::

    result = client.segment(image=image_from_file("ct.dcm"), boxes=[(40, 52, 98, 110)],
                            encoding="dicom_seg", dicom_seg_options=DicomSegOptions(segments=["liver"]))
    open("seg.dcm", "wb").write(result.dicom_seg)   # one segment per prompt; result.masks is then empty
    study = client.segment_study(study_uid, series_uid, slice_index=54, box=(80, 60, 180, 170), store=True)
    print(study.seg_sop_instance_uid, study.stored)  # a series of the gateway's PACS, its SEG stored back

Coordinates are input-image pixels (x = column, y = row, origin at the top-left corner of
the top-left pixel). Errors from the server reach the caller as :class:`grpc.RpcError`
(``exc.code()`` is a :class:`grpc.StatusCode`); mistakes caught before sending raise
:class:`ValueError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
import numpy as np

try:
    from medseg_client._generated import segmentation_pb2 as pb
    from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
except ModuleNotFoundError as exc:  # a checkout built without `make protos`
    raise ImportError("medseg_client's generated gRPC stubs (medseg_client/_generated/) are missing: run "
                      "`make protos` (scripts/gen_protos.sh) in the repository, then install the client") from exc
from medseg_client.images import image_from_array, image_from_file
from medseg_client.masks import MaskEncoding, decode_mask, segment_encoding
from medseg_client.prompts import BoxTuple, PointTuple, build_prompts
from medseg_client.seg import Code, DicomSegOptions, SegmentDescription, dicom_seg_message
from medseg_client.security import is_loopback_target, tls_credentials
from medseg_client.volumes import (SegmentMask, SegmentStudyResult, SliceMask, VolumeClient, VolumeInfo, VolumeStream,
                                   VolumeSummary, volume_slices)
from medseg_client.wire import DICOM_SEG_ENCODING, MASK_ENCODINGS

__all__ = [
    "BoxTuple",
    "Code",
    "DicomSegOptions",
    "EmbedResult",
    "MaskEncoding",
    "PointTuple",
    "SegmentDescription",
    "SegmentMask",
    "SegmentResult",
    "SegmentStudyResult",
    "SegmentationClient",
    "SliceMask",
    "VolumeClient",
    "VolumeInfo",
    "VolumeStream",
    "VolumeSummary",
    "build_prompts",
    "decode_low_res_logits",
    "decode_mask",
    "image_from_array",
    "image_from_file",
    "tls_credentials",
    "volume_slices",
]

@dataclass(frozen=True)
class SegmentResult:
    """The answer to one ``Segment`` call, decoded.

    ``masks[i]``: bool ``(height, width)`` for prompt ``i``, at the input image's size.
    ``predicted_ious[i]``: the model's own IoU estimate in [0, 1] (rank with it, do not trust it).
    ``low_res_logits``: float32 ``(h, w)`` per mask in the model's low-resolution frame
    (256 x 256 for LiteMedSAM) when requested, else ``None``.
    ``image_id``: handle for follow-up calls on the same image while it is cached.

    With encoding ``"dicom_seg"`` the masks come back as one DICOM SEG, ``dicom_seg`` (DICOM Part 10
    bytes, segment ``i + 1`` is prompt ``i``), and ``masks`` is empty: ``predicted_ious``,
    ``areas`` (the gateway's counts) and ``low_res_logits`` still hold one entry per prompt.
    ``dicom_seg`` is ``None`` for every other encoding.

    With ``multimask_output`` (a model with ``ModelInfo.mask_candidates`` > 1, SAM) there are
    that many masks per prompt, prompt-major: ``prompt_indices[j]`` is the prompt mask ``j``
    answers and ``candidates[j]`` which of the model's candidates it is (:meth:`best` picks, per
    prompt, the one with the highest predicted IoU).
    """

    masks: list[np.ndarray]
    predicted_ious: list[float]
    model_name: str
    model_version: str
    image_id: str
    height: int
    width: int
    low_res_logits: list[np.ndarray] | None = None
    dicom_seg: bytes | None = None
    mask_areas: list[int] | None = None  # Mask.area as the gateway counted it, one per mask
    prompt_indices: list[int] | None = None  # Mask.prompt_index: the prompt each mask answers
    candidates: list[int] | None = None  # Mask.candidate: which candidate of its prompt

    def best(self) -> list[int]:
        """Per prompt (in order), the index into ``masks`` of its answer with the highest predicted IoU."""
        prompts = self.prompt_indices if self.prompt_indices is not None else list(range(len(self.predicted_ious)))
        best: dict[int, int] = {}
        for j, p in enumerate(prompts):
            if p not in best or self.predicted_ious[j] > self.predicted_ious[best[p]]:
                best[p] = j
        return [best[p] for p in sorted(best)]

    @property
    def areas(self) -> list[int]:
        """Foreground pixel count of each mask (for a SEG answer: the gateway's counts)."""
        if self.dicom_seg is not None:
            return list(self.mask_areas or [])
        return [int(mask.sum()) for mask in self.masks]

    def union(self) -> np.ndarray:
        """bool ``(height, width)``: the union of all masks (all False when there are none).

        :class:`ValueError` for a SEG answer, whose masks are in :attr:`dicom_seg`, not decoded."""
        if self.dicom_seg is not None:
            raise ValueError("this answer's masks are in its DICOM SEG (result.dicom_seg), not decoded here")
        union = np.zeros((self.height, self.width), dtype=bool)
        for mask in self.masks:
            union |= mask
        return union


@dataclass(frozen=True)
class EmbedResult:
    """The answer to ``EmbedImage``: a handle for prompt-only ``Segment`` calls."""

    image_id: str
    model_name: str
    model_version: str
    height: int
    width: int
    cached: bool


class SegmentationClient(VolumeClient):
    """A blocking client for ``medseg.v1.Segmentation`` and ``medseg.v1.Volumes`` (the
    :class:`VolumeClient` methods: ``upload_volume``, ``segment_volume``, ``refine_segment``,
    ``undo_segment``, ``get_segment_mask``, ``delete_volume``, ``segment_study``) over one gRPC
    channel.

    ``target``: ``"host:port"``. ``timeout``: default deadline in seconds of every call.
    ``credentials``: TLS channel credentials (see :func:`tls_credentials`); ``None`` means
    plaintext for a loopback target or with ``insecure=True``, else TLS with the system's
    trust store. ``token``: bearer token sent as ``authorization: Bearer <token>`` on every
    call. ``tls_server_name``: the name to verify in the server certificate when it differs
    from the target's host (connecting by IP address, through a tunnel).
    ``max_message_mb``: send and receive message size limit, in MiB.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_mb: int = 64,
        token: str | None = None,
        insecure: bool = False,
        tls_server_name: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        limit = int(max_message_mb) * 1024 * 1024
        options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", limit),
                                                ("grpc.max_receive_message_length", limit)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        # Plaintext (and so a token in clear) only to loopback or when explicitly asked for.
        plaintext = credentials is None and (insecure or is_loopback_target(target))
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() for c in token):
                raise ValueError("the bearer token is empty or contains whitespace")
        if plaintext:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials or grpc.ssl_channel_credentials(), options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.SegmentationStub(self._channel)
        self.target = target
        self.timeout = float(timeout)
        self.secure = not plaintext

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- calls
    def segment(
        self,
        *,
        image: pb.Image | None = None,
        image_id: str | None = None,
        boxes: Sequence[Sequence[float]] = (),
        points: Sequence[Sequence[float]] = (),
        model: str = "",
        encoding: int | str | MaskEncoding = pb.MASK_ENCODING_BITS,
        return_low_res_logits: bool = False,
        prompts: list[pb.Prompt] | None = None,
        dicom_seg_options: DicomSegOptions | pb.DicomSegOptions | None = None,
        multimask_output: bool = False,
        timeout: float | None = None,
    ) -> SegmentResult:
        """Segment one image; one mask per prompt, in order.

        Exactly one of ``image`` (see :func:`image_from_file`) or ``image_id`` (from
        :meth:`embed` or an earlier result). Prompts come either from ``boxes``
        (``(x0, y0, x1, y1)``) and ``points`` (``(x, y, label)``, label 1 foreground, 0
        background) by the rule of :func:`build_prompts`, or ready-made in ``prompts`` —
        not both. ``model``: ``""`` selects the server's default model. ``encoding``: the
        wire encoding (``pb.MaskEncoding`` value, :class:`MaskEncoding` or its value); the result is
        decoded either way. ``encoding="dicom_seg"`` (or ``pb.MASK_ENCODING_DICOM_SEG``), for a
        DICOM image (or the ``image_id`` of one) only: the answer is one DICOM SEG,
        :attr:`SegmentResult.dicom_seg`, segment ``i + 1`` for prompt ``i``, written as
        ``dicom_seg_options`` says (:class:`DicomSegOptions`: labels, codes, kind, series
        description; only with that encoding). ``multimask_output``: every candidate mask of each
        prompt (models with ``ModelInfo.mask_candidates`` > 1, e.g. SAM; see :class:`SegmentResult`);
        without it SAM answers a lone click with its best candidate by predicted IoU.
        ``timeout`` overrides the client's default deadline.
        Raises :class:`ValueError` before sending, :class:`grpc.RpcError` from the server.
        """
        if (image is None) == (image_id is None):
            raise ValueError("pass exactly one of image or image_id")
        if prompts is not None:
            if boxes or points:
                raise ValueError("pass either prompts or boxes/points, not both")
            prompt_list = list(prompts)  # may be empty: prompt-free segmenters take none
        else:
            prompt_list = build_prompts(boxes, points)
        wire_value = segment_encoding(encoding)
        dicom_seg = wire_value == DICOM_SEG_ENCODING[0]
        if dicom_seg_options is not None and not dicom_seg:
            raise ValueError("dicom_seg_options go only with encoding='dicom_seg'")
        if dicom_seg and image is not None:
            _check_dicom_image(image)
        request = pb.SegmentRequest(
            model=model,
            prompts=prompt_list,
            encoding=wire_value,
            return_low_res_logits=return_low_res_logits,
            multimask_output=multimask_output,
        )
        options = dicom_seg_message(dicom_seg_options, max_segments=max(len(prompt_list), 1))
        if options is not None:
            request.dicom_seg.CopyFrom(options)
        if image is not None:
            request.image.CopyFrom(image)
        else:
            request.image_id = str(image_id)
        response = self._stub.Segment(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return _segment_result(response, return_low_res_logits, dicom_seg=dicom_seg)

    def embed(self, image: pb.Image, model: str = "", *, timeout: float | None = None) -> EmbedResult:
        """Decode and encode ``image`` once on the server; returns its ``image_id``.

        ``model``: ``""`` selects the server's default model. Raises :class:`grpc.RpcError`.
        """
        request = pb.EmbedImageRequest(model=model, image=image)
        response = self._stub.EmbedImage(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return EmbedResult(
            image_id=response.image_id,
            model_name=response.model.name,
            model_version=response.model.version,
            height=int(response.height),
            width=int(response.width),
            cached=bool(response.cached),
        )

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The models the server serves, as ``pb.ModelInfo`` messages (``prompt_kinds`` are
        ``pb.PromptKind`` values; use ``pb.PromptKind.Name(k)`` for names)."""
        response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self._deadline(timeout),
                                         metadata=self._metadata)
        return list(response.models)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else float(timeout)


# --------------------------------------------------------------------------- decoding
def decode_low_res_logits(logits: pb.LowResLogits) -> np.ndarray:
    """float32 ``(height, width)`` array from a ``LowResLogits`` message (little-endian, row-major).

    Raises :class:`ValueError` when the byte count is not ``height * width * 4``.
    """
    height, width = int(logits.height), int(logits.width)
    expected = height * width * 4
    if len(logits.data) != expected:
        raise ValueError(
            f"low_res_logits of {height} x {width} need {expected} bytes, got {len(logits.data)}"
        )
    return np.frombuffer(logits.data, dtype="<f4").astype(np.float32).reshape(height, width)




# Signatures of encoded formats that are certainly not DICOM (a DICOM file may lack its preamble
# and "DICM", so anything else is left to the gateway).
_NOT_DICOM = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
              b"\x1f\x8b": "gzip (NIfTI .nii.gz?)"}


def _check_dicom_image(image: pb.Image) -> None:
    """A DICOM SEG segments a DICOM image: refuse, before sending, an input that is certainly not one."""
    if image.WhichOneof("source") != "encoded":
        raise ValueError("a DICOM SEG needs a DICOM image (the SEG references it); a raw pixel array is not one")
    data = image.encoded
    if data[128:132] == b"DICM":
        return
    for signature, name in _NOT_DICOM.items():
        if data.startswith(signature):
            raise ValueError(f"a DICOM SEG needs a DICOM image (the SEG references it); this image is {name}")
    if data[344:348] in (b"n+1\x00", b"ni1\x00"):
        raise ValueError("a DICOM SEG needs a DICOM image (the SEG references it); this image is NIfTI")


def _segment_result(response: pb.SegmentResponse, with_logits: bool, *, dicom_seg: bool = False) -> SegmentResult:
    if dicom_seg and not response.dicom_seg:
        raise ValueError("the gateway answered a DICOM SEG request without the SEG (SegmentResponse.dicom_seg)")
    masks: list[np.ndarray] = []
    # With a SEG the masks are metadata only (their data is empty: the pixels are in the SEG).
    for index, mask in enumerate(() if dicom_seg else response.masks):
        encoding = MASK_ENCODINGS.get(mask.encoding)
        if encoding is None or encoding == DICOM_SEG_ENCODING[1]:
            raise ValueError(f"mask {index}: the server used an unknown encoding {mask.encoding}")
        masks.append(decode_mask(mask.data, mask.height, mask.width, encoding))
    logits = None
    if with_logits:
        logits = [decode_low_res_logits(mask.low_res_logits) for mask in response.masks]
    return SegmentResult(
        masks=masks,
        predicted_ious=[float(mask.predicted_iou) for mask in response.masks],
        model_name=response.model.name,
        model_version=response.model.version,
        image_id=response.image_id,
        height=int(response.height),
        width=int(response.width),
        low_res_logits=logits,
        dicom_seg=bytes(response.dicom_seg) if dicom_seg else None,
        mask_areas=[int(mask.area) for mask in response.masks],
        prompt_indices=[int(mask.prompt_index) for mask in response.masks],
        candidates=[int(mask.candidate) for mask in response.masks],
    )
