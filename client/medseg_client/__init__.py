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
from medseg_client.masks import MaskEncoding, decode_mask, wire_encoding
from medseg_client.prompts import BoxTuple, PointTuple, build_prompts
from medseg_client.security import is_loopback_target, tls_credentials
from medseg_client.volumes import (SegmentMask, SliceMask, VolumeClient, VolumeInfo, VolumeStream, VolumeSummary,
                                   volume_slices)
from medseg_client.wire import MASK_ENCODINGS

__all__ = [
    "BoxTuple",
    "EmbedResult",
    "MaskEncoding",
    "PointTuple",
    "SegmentMask",
    "SegmentResult",
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
    """

    masks: list[np.ndarray]
    predicted_ious: list[float]
    model_name: str
    model_version: str
    image_id: str
    height: int
    width: int
    low_res_logits: list[np.ndarray] | None = None

    @property
    def areas(self) -> list[int]:
        """Foreground pixel count of each mask."""
        return [int(mask.sum()) for mask in self.masks]

    def union(self) -> np.ndarray:
        """bool ``(height, width)``: the union of all masks (all False when there are none)."""
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
    ``undo_segment``, ``get_segment_mask``, ``delete_volume``) over one gRPC channel.

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
        encoding: int | MaskEncoding = pb.MASK_ENCODING_BITS,
        return_low_res_logits: bool = False,
        prompts: list[pb.Prompt] | None = None,
        timeout: float | None = None,
    ) -> SegmentResult:
        """Segment one image; one mask per prompt, in order.

        Exactly one of ``image`` (see :func:`image_from_file`) or ``image_id`` (from
        :meth:`embed` or an earlier result). Prompts come either from ``boxes``
        (``(x0, y0, x1, y1)``) and ``points`` (``(x, y, label)``, label 1 foreground, 0
        background) by the rule of :func:`build_prompts`, or ready-made in ``prompts`` —
        not both. ``model``: ``""`` selects the server's default model. ``encoding``: the
        wire encoding (``pb.MaskEncoding`` value or :class:`MaskEncoding`); the result is
        decoded either way. ``timeout`` overrides the client's default deadline.
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
        request = pb.SegmentRequest(
            model=model,
            prompts=prompt_list,
            encoding=wire_encoding(encoding),
            return_low_res_logits=return_low_res_logits,
        )
        if image is not None:
            request.image.CopyFrom(image)
        else:
            request.image_id = str(image_id)
        response = self._stub.Segment(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return _segment_result(response, return_low_res_logits)

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




def _segment_result(response: pb.SegmentResponse, with_logits: bool) -> SegmentResult:
    masks: list[np.ndarray] = []
    for index, mask in enumerate(response.masks):
        encoding = MASK_ENCODINGS.get(mask.encoding)
        if encoding is None:
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
    )
