"""Command line client: ``python -m medseg_client {segment,models,embed,segment-volume,segment-study} ...``
(also the ``medseg-client`` console script; ``python -m service.client`` is an alias inside the repository).

Call :func:`main` with an argument list to run it in process; it returns the exit code
(0 ok, 1 gRPC error, 2 usage or local file error or a missing optional package). Errors are
reported as one line on stderr without a traceback; gRPC errors as
``error: <STATUS_CODE>: <details>``.

Security options (every command): ``--ca-file`` (TLS, server verified against that CA),
``--cert-file``/``--key-file`` (mutual TLS), ``--tls`` (TLS with the system trust store),
``--tls-server-name``, ``--token-file`` or the ``MEDSEG_TOKEN`` environment variable (bearer
token; there is deliberately no ``--token`` flag, which would show in ``ps``), and
``--insecure`` (plaintext to a non-loopback server, development only). Without TLS options a
loopback server is reached in plaintext and any other server over TLS.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client import DicomSegOptions, SegmentationClient, image_from_file, tls_credentials
from medseg_client.images import SUPPORTED_SUFFIXES
from medseg_client.overlay import draw_overlay, load_display_image, to_uint8
from medseg_client.volumes import volume_kind, volume_slices

_SEGMENT_EPILOG = """\
Coordinates are input-image pixels: x = column, y = row, origin at the top-left corner
(a box over a whole W x H image is 0 0 W H). One mask per --box; with a single --box the
--point flags refine that box's mask, with no --box all points form one prompt, and
--point cannot be combined with several --box flags. With neither, the request carries no
prompt: what a prompt-free segmenter (ListModels shows no prompt kinds) expects.

Output: MASK.png is an 8-bit PNG (0 = background, 255 = structure) at the input image's
size. With several prompts MASK.png is the union of all masks, and each prompt's own mask
is also written next to it as MASK-0.png, MASK-1.png, ... in prompt order.
Prints one line per mask (index, predicted IoU, area in pixels) and the image_id.

--out-seg SEG.dcm (a DICOM --image only): also, or instead of --out, write the masks as one
DICOM Segmentation object referencing the image, segment i + 1 for prompt i (--label TEXT,
repeatable, names them in order; --labelmap writes a Label Map SEG, masks must not overlap).
"""

VOLUME_TIMEOUT_S = 600.0
_VOLUME_EPILOG = """\
Slices and coordinates: slice K of a NIfTI volume is numpy.flipud(vol[:, :, K].T) (as the
'segment' command shows NIfTI slice K), of a DICOM series the K-th file along the slice
normal (by ImagePositionPatient), of a .npy (Z, H, W) array array[K]; --box is in that
slice's pixels (x = column, y = row, origin at the top-left corner). The mask is propagated
from slice K to both sides until it vanishes or --range ends. Without --slice/--box the
model must be a prompt-free segmenter (every slice of the range is segmented).

Uploads the volume, prints one line per slice as it is segmented (slice, area, predicted
IoU), then the summary; writes MASK.nii.gz (the input's grid and affine; .nii: written
uncompressed) and deletes the volume from the gateway. --timeout (default 600 s here)
bounds each call. --out-seg SEG.dcm (a DICOM series folder only) also writes the segment
as a DICOM SEG referencing the series (--label TEXT names it, --labelmap: Label Map SEG).
"""

_STUDY_EPILOG = """\
The gateway retrieves the series (Study and Series Instance UIDs) from its configured PACS,
segments it from the --box on slice K (the K-th file along the slice normal; without
--slice/--box the model must be a prompt-free segmenter), writes a DICOM SEG and, with
--store, stores it back in the PACS under the source's study. --out-seg also writes the SEG
here. Prints the SEG's SOP Instance UID, whether it was stored, the slices, voxels, volume
and timings; never patient data. --timeout (default 600 s here) bounds the whole call.
"""
# The steps of SegmentStudyResponse.timings_ms, printed in this order (others after them).
_STUDY_STEPS = ("retrieve", "decode", "segment", "write_seg", "store", "total")
_KIND_NAMES = {"nifti": "a NIfTI file", "raw": "a .npy array"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m medseg_client``."""
    parser = argparse.ArgumentParser(
        prog="python -m medseg_client",
        description="Client of the medseg.v1.Segmentation gRPC gateway.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment = commands.add_parser(
        "segment",
        help="segment an image with box/point prompts and write the masks as PNG",
        description="Segment an image with box and/or point prompts.",
        epilog=_SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_server(segment)
    _add_image(segment)
    segment.add_argument(
        "--box", nargs=4, type=float, action="append", default=[], metavar=("X0", "Y0", "X1", "Y1"),
        help="box prompt in input-image pixels (repeatable: one mask per box)",
    )
    segment.add_argument(
        "--point", nargs=3, type=float, action="append", default=[], metavar=("X", "Y", "LABEL"),
        help="point prompt; LABEL 1 = foreground, 0 = background (repeatable)",
    )
    _add_model(segment)
    segment.add_argument("--multimask", action="store_true",
                         help="every candidate mask of the prompt (models proposing several, e.g. SAM: 3), written "
                              "as MASK-1.png, MASK-2.png, ... beside the union")
    segment.add_argument("--out", type=Path, metavar="MASK.png",
                         help="output mask PNG (the union when there are several prompts); required unless "
                              "--out-seg is given")
    segment.add_argument("--overlay", type=Path, metavar="OVERLAY.png",
                         help="also write the image with mask outlines, boxes and points drawn (with --out)")
    _add_seg(segment, "a DICOM --image only: write the masks as one DICOM SEG (a segment per prompt)",
             labels="append")

    models = commands.add_parser("models", help="list the models the server serves")
    _add_server(models)

    embed = commands.add_parser("embed", help="embed an image once and print its image_id")
    _add_server(embed)
    _add_image(embed)
    _add_model(embed)

    volume = commands.add_parser(
        "segment-volume",
        help="upload a 3-D volume, segment a structure through it from one box, write the NIfTI mask",
        description="Upload a 3-D volume (NIfTI file, DICOM series folder or .npy array), segment one "
                    "structure through it from a box on one slice, and write the mask as NIfTI.",
        epilog=_VOLUME_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_server(volume, timeout=VOLUME_TIMEOUT_S)
    volume.add_argument("--image", required=True, type=Path, metavar="VOLUME",
                        help="a .nii/.nii.gz file, a folder holding one DICOM series, or a .npy (Z, H, W) array")
    volume.add_argument("--slice", type=int, metavar="K", help="the slice the --box is drawn on")
    volume.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                        help="the structure on slice K, in that slice's input-convention pixels")
    volume.add_argument("--range", nargs=2, type=int, metavar=("K0", "K1"),
                        help="segment only within slices K0..K1 (inclusive; default: the whole volume)")
    _add_model(volume)
    volume.add_argument("--out", required=True, type=Path, metavar="MASK.nii.gz",
                        help="output mask: NIfTI on the input's grid and affine (uint8, 0/1)")
    volume.add_argument("--overlay-dir", type=Path, metavar="DIR",
                        help="also write one PNG per segmented slice (the slice, windowed, with the mask "
                             "outline); needs nibabel (NIfTI) or pydicom (DICOM): pip install 'medseg-client[files]'")
    volume.add_argument("--spacing", nargs=3, type=float, metavar=("SX", "SY", "SZ"),
                        help="voxel spacing in mm (column, row, slice) of a .npy array (required for .npy)")
    volume.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"),
                        help="intensity window in native units (HU for CT) for every slice; default: the "
                             "file's own, the modality default or a percentile stretch")
    _add_seg(volume, "a DICOM series folder only: also write the segment as a DICOM SEG of the series")

    study = commands.add_parser(
        "segment-study",
        help="segment a series of the gateway's PACS by its UIDs and write (or store) the DICOM SEG",
        description="Segment one structure through a series that lives in the gateway's PACS (by Study and "
                    "Series Instance UID) from a box on one slice; the gateway writes a DICOM SEG and, with "
                    "--store, stores it back in the PACS.",
        epilog=_STUDY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_server(study, timeout=VOLUME_TIMEOUT_S)
    study.add_argument("--study", required=True, metavar="UID", help="Study Instance UID of the series")
    study.add_argument("--series", required=True, metavar="UID", help="Series Instance UID to segment")
    study.add_argument("--slice", type=int, metavar="K", help="the slice the --box is drawn on")
    study.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                       help="the structure on slice K, in that slice's pixels")
    study.add_argument("--range", nargs=2, type=int, metavar=("K0", "K1"),
                       help="segment only within slices K0..K1 (inclusive; default: the whole series)")
    study.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"),
                       help="intensity window in native units (HU for CT); default: the files' own or the "
                            "modality default")
    _add_model(study)
    study.add_argument("--store", action="store_true",
                       help="store the SEG in the PACS (STOW-RS), under the source's study")
    _add_seg(study, "also write the SEG (DICOM Part 10) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Bad arguments make argparse raise :class:`SystemExit` (code 2), as usual.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if getattr(args, "window", None) is not None and args.window[1] <= 0:
        parser.error("--window WIDTH must be > 0")
    if getattr(args, "slice", None) is not None and args.slice < 0:
        parser.error("--slice must be >= 0")
    if args.command == "segment":
        _check_segment_args(parser, args)
    if args.command == "segment-volume":
        _check_volume_args(parser, args)
    if args.command == "segment-study":
        _check_study_args(parser, args)
    try:
        with _client(args) as client:
            if args.command == "segment":
                return _segment(client, args)
            if args.command == "models":
                return _models(client)
            if args.command == "segment-volume":
                return _segment_volume(client, args)
            if args.command == "segment-study":
                return _segment_study(client, args)
            return _embed(client, args)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        print(f"error: {name}: {' '.join(str(details).split())}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- commands
def _segment(client: SegmentationClient, args: argparse.Namespace) -> int:
    window = tuple(args.window) if args.window else None
    image = image_from_file(args.image, window=window, slice_index=args.slice)
    boxes = [tuple(box) for box in args.box]
    points = [(x, y, int(label)) for x, y, label in args.point]
    # Read the image for the overlay first: an unreadable file or a missing optional package
    # fails before the server does any work.
    display = None
    if args.overlay is not None:
        display = load_display_image(args.image, window=window, slice_index=args.slice)
    result = seg = None
    if args.out is not None:
        result = client.segment(image=image, boxes=boxes, points=points, model=args.model,
                                multimask_output=args.multimask)
        for index, path in enumerate(mask_paths(args.out, len(result.masks))):
            mask = result.union() if index == 0 else result.masks[index - 1]
            write_mask_png(mask, path)
    if args.out_seg is not None:
        # The same image again (the gateway's cache makes the second answer cheap): a SEG answer
        # carries no mask pixels, so the PNGs come from their own call.
        seg = client.segment(image=image, boxes=boxes, points=points, model=args.model, encoding="dicom_seg",
                             dicom_seg_options=_seg_options(args))
        args.out_seg.write_bytes(seg.dicom_seg)
    shown = result if result is not None else seg
    assert shown is not None
    for index, (iou, area) in enumerate(zip(shown.predicted_ious, shown.areas, strict=True)):
        which = (f" (prompt {shown.prompt_indices[index]}, candidate {shown.candidates[index]})"
                 if args.multimask and shown.candidates else "")
        print(f"mask {index}: predicted_iou={iou:.4f} area={area} px{which}")
    print(f"image_id: {shown.image_id}")
    print(f"model: {shown.model_name} {shown.model_version}".rstrip())
    if seg is not None:
        print(f"wrote {args.out_seg} (DICOM SEG, {len(seg.predicted_ious)} segment"
              f"{'s' if len(seg.predicted_ious) != 1 else ''})")
    if display is not None and result is not None:
        draw_overlay(display, result.masks, boxes, points).save(args.overlay)
    return 0


def _models(client: SegmentationClient) -> int:
    rows = [("NAME", "VERSION", "INPUT", "PROMPTS (* required)", "MASKS/PROMPT", "SLICES", "DEFAULT")]
    for info in client.list_models():
        required = set(info.required_prompt_kinds)
        kinds = ", ".join(
            _kind_name(kind) + ("*" if kind in required else "") for kind in info.prompt_kinds
        )
        candidates = f"1 of {info.mask_candidates}" if info.mask_candidates > 1 else "1"
        # a 2.5-D segmenter reads neighbouring slices: volumes only (segment-volume)
        slices = f"+-{info.context_slices} (volumes only)" if info.context_slices else "one"
        rows.append((info.name, info.version, str(info.input_size), kinds, candidates, slices,
                     "yes" if info.is_default else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _embed(client: SegmentationClient, args: argparse.Namespace) -> int:
    window = tuple(args.window) if args.window else None
    image = image_from_file(args.image, window=window, slice_index=args.slice)
    result = client.embed(image, model=args.model)
    print(f"image_id: {result.image_id}")
    print(f"cached: {'yes' if result.cached else 'no'}")
    print(f"model: {result.model_name} {result.model_version}".rstrip())
    print(f"size: {result.height} x {result.width} (H x W)")
    return 0


def _segment_volume(client: SegmentationClient, args: argparse.Namespace) -> int:
    window = tuple(args.window) if args.window else None
    # Local pixels for the overlays first: a missing optional package fails before any upload.
    display = volume_slices(args.image) if args.overlay_dir is not None else None
    info = client.upload_volume(args.image, spacing=args.spacing, window=window)
    print(f"volume_id: {info.volume_id} ({info.depth} x {info.height} x {info.width} slices x rows x columns, "
          f"{info.source_format}, window {info.window[0]:g}/{info.window[1]:g} from {info.window_source})")
    try:
        box = tuple(args.box) if args.box else None
        stream = client.segment_volume(info.volume_id, slice_index=args.slice, box=box,
                                       range=tuple(args.range) if args.range else None, model=args.model)
        with stream:
            for item in stream:
                print(f"slice {item.slice_index}: area={item.area} px predicted_iou={item.predicted_iou:.4f}",
                      flush=True)
            summary = stream.summary
        print(f"segment_id: {summary.segment_id}")
        print(f"model: {summary.model_name} {summary.model_version}".rstrip())
        slices = "none" if summary.first_slice < 0 else f"{summary.first_slice}..{summary.last_slice}"
        print(f"voxels: {summary.voxel_count} ({summary.volume_ml:.3f} ml), slices {slices}, "
              f"stopped: {', '.join(summary.stop_reasons) or '-'}")
        mask = client.get_segment_mask(info.volume_id, summary.segment_id, dicom_seg=args.out_seg is not None,
                                       dicom_seg_options=_seg_options(args))
        write_nifti(mask.nifti_gz, args.out)
        print(f"wrote {args.out}")
        if mask.dicom_seg is not None:
            args.out_seg.write_bytes(mask.dicom_seg)
            print(f"wrote {args.out_seg} (DICOM SEG)")
        if display is not None:
            args.overlay_dir.mkdir(parents=True, exist_ok=True)
            for item in stream.slices:
                pixels = to_uint8(display[item.slice_index], info.window)
                boxes = [box] if box is not None and item.slice_index == args.slice else []
                image = Image.fromarray(pixels, mode="L").convert("RGB")
                draw_overlay(image, [item.mask], boxes).save(args.overlay_dir / f"slice-{item.slice_index:04d}.png")
            print(f"wrote {len(stream.slices)} overlays to {args.overlay_dir}")
    finally:
        try:
            client.delete_volume(info.volume_id)
        except grpc.RpcError:
            pass  # it expires on its own (--volume-ttl-s); the first error is the one to report
    return 0


def _segment_study(client: SegmentationClient, args: argparse.Namespace) -> int:
    result = client.segment_study(
        args.study, args.series, slice_index=args.slice, box=tuple(args.box) if args.box else None,
        model=args.model, range=tuple(args.range) if args.range else None,
        window=tuple(args.window) if args.window else None, store=args.store,
        return_dicom_seg=args.out_seg is not None, dicom_seg_options=_seg_options(args))
    summary, volume = result.summary, result.volume
    print(f"seg_sop_instance_uid: {result.seg_sop_instance_uid}")
    print(f"seg_series_instance_uid: {result.seg_series_instance_uid}")
    print(f"stored: {'yes' if result.stored else 'no'}")
    print(f"series: {result.instances_retrieved} instances retrieved, {volume.depth} x {volume.height} x "
          f"{volume.width} slices x rows x columns")
    print(f"model: {summary.model_name} {summary.model_version}".rstrip())
    slices = "none" if summary.first_slice < 0 else f"{summary.first_slice}..{summary.last_slice}"
    print(f"voxels: {summary.voxel_count} ({summary.volume_ml:.3f} ml), slices {slices}, "
          f"stopped: {', '.join(summary.stop_reasons) or '-'}")
    print(f"timings: {format_timings(result.timings_ms)}")
    if result.dicom_seg is not None:
        args.out_seg.write_bytes(result.dicom_seg)
        print(f"wrote {args.out_seg} (DICOM SEG)")
    return 0


# --------------------------------------------------------------------------- outputs
def format_timings(timings_ms: dict[str, float]) -> str:
    """``retrieve 12 ms, ..., total 80 ms``: the known steps in order, then any others by name."""
    names = [n for n in _STUDY_STEPS if n in timings_ms] + sorted(set(timings_ms) - set(_STUDY_STEPS))
    return ", ".join(f"{name} {timings_ms[name]:.0f} ms" for name in names) or "-"


def write_nifti(nifti_gz: bytes, path: Path) -> None:
    """Write the gateway's gzipped NIfTI mask to ``path`` (decompressed for a ``.nii`` name)."""
    data = gzip.decompress(nifti_gz) if path.name.lower().endswith(".nii") and nifti_gz[:2] == b"\x1f\x8b" \
        else nifti_gz
    path.write_bytes(data)


def mask_paths(out: Path, n_masks: int) -> list[Path]:
    """Where ``segment`` writes: ``[out]`` for one mask; ``[out, out-0, out-1, ...]`` for several.

    ``out`` holds the union; ``MASK-i.png`` (same folder and suffix) holds prompt ``i``'s mask.
    """
    if n_masks <= 1:
        return [out]
    return [out, *(out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n_masks))]


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """Write bool ``(H, W)`` ``mask`` as an 8-bit greyscale PNG, 0 = background, 255 = structure."""
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * np.uint8(255), mode="L").save(path, format="PNG")


# --------------------------------------------------------------------------- helpers
def _client(args: argparse.Namespace) -> SegmentationClient:
    """The client the security flags ask for; ValueError/OSError on unusable files."""
    if bool(args.cert_file) != bool(args.key_file):
        raise ValueError("--cert-file and --key-file go together (mutual TLS)")
    if args.insecure and (args.tls or args.ca_file or args.cert_file):
        raise ValueError("--insecure cannot be combined with TLS options")
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file)
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
    elif os.environ.get("MEDSEG_TOKEN"):
        token = os.environ["MEDSEG_TOKEN"].strip()
    return SegmentationClient(args.server, timeout=args.timeout, credentials=credentials, token=token,
                              insecure=args.insecure, tls_server_name=args.tls_server_name)


def _add_server(parser: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="gateway address")
    parser.add_argument("--timeout", type=float, default=timeout, metavar="S",
                        help=f"deadline of the call in seconds (default: {timeout:g})")
    security = parser.add_argument_group(
        "security", "Without TLS options: plaintext to a loopback server, TLS (system trust store) otherwise.")
    security.add_argument("--tls", action="store_true", help="use TLS even for a loopback server")
    security.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify the server with (implies TLS)")
    security.add_argument("--cert-file", metavar="PEM", help="client certificate for mutual TLS (with --key-file)")
    security.add_argument("--key-file", metavar="PEM", help="client private key for mutual TLS")
    security.add_argument("--tls-server-name", metavar="NAME",
                          help="name to verify in the server certificate when it differs from HOST")
    security.add_argument("--token-file", metavar="FILE",
                          help="file holding the bearer token (default: environment variable MEDSEG_TOKEN)")
    security.add_argument("--insecure", action="store_true",
                          help="plaintext even to a non-loopback server (development only)")


def _add_image(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, type=Path, metavar="FILE",
                        help=f"input image ({', '.join(SUPPORTED_SUFFIXES)})")
    parser.add_argument("--window", nargs=2, type=float, metavar=("CENTER", "WIDTH"),
                        help="intensity window in native units (HU for CT); default: the file's "
                             "own window, the modality default or a percentile stretch")
    parser.add_argument("--slice", type=int, metavar="N",
                        help="slice of a 3-D input (NIfTI last axis, DICOM frame); default: middle")


def _add_seg(parser: argparse.ArgumentParser, help_out: str, labels: str = "store") -> None:
    """--out-seg, --label and --labelmap (the DICOM SEG options)."""
    parser.add_argument("--out-seg", type=Path, metavar="SEG.dcm", help=help_out)
    if labels == "append":
        parser.add_argument("--label", action="append", default=[], metavar="TEXT",
                            help="SegmentLabel of the SEG's segments, in prompt order (repeatable; at most 64 "
                                 "characters; default 'segment N')")
    else:
        parser.add_argument("--label", metavar="TEXT",
                            help="SegmentLabel of the SEG's segment (at most 64 characters; default 'segment 1')")
    parser.add_argument("--labelmap", action="store_true",
                        help="write a Label Map Segmentation (default: binary Segmentation)")


def _seg_options(args: argparse.Namespace) -> DicomSegOptions | None:
    labels = args.label if isinstance(args.label, list) else ([args.label] if args.label else [])
    if not labels and not args.labelmap:
        return None
    return DicomSegOptions(segments=labels, kind="labelmap" if args.labelmap else "binary")


def _check_seg_args(parser: argparse.ArgumentParser, args: argparse.Namespace, needs_out_seg: bool = True) -> None:
    if needs_out_seg and args.out_seg is None and (args.label or args.labelmap):
        parser.error("--label and --labelmap describe the DICOM SEG: they go with --out-seg")
    if args.out_seg is not None:
        if not args.out_seg.parent.is_dir():
            parser.error(f"--out-seg: the folder {str(args.out_seg.parent)!r} does not exist")
        if getattr(args, "out", None) is not None and args.out_seg.resolve() == args.out.resolve():
            parser.error("--out-seg and --out name the same file")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", metavar="NAME",
                        help="model name from 'models' (default: the server's default model)")


def _check_segment_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.out is None and args.out_seg is None:
        parser.error("the following arguments are required: --out (or --out-seg SEG.dcm for a DICOM SEG)")
    if args.overlay is not None and args.out is None:
        parser.error("--overlay draws the PNG masks: give --out too")
    _check_seg_args(parser, args)
    if args.out_seg is not None and not args.image.name.lower().endswith(".dcm"):
        parser.error(f"--out-seg needs a DICOM image (.dcm): a DICOM SEG references the image it segments, "
                     f"and {args.image.name!r} is not one")
    n_segments = max(len(args.box), 1)
    if len(args.label) > n_segments:
        parser.error(f"{len(args.label)} --label flags for {n_segments} mask{'s' if n_segments != 1 else ''} "
                     "(one label per --box, in order)")
    if args.point and len(args.box) > 1:
        parser.error("--point cannot be combined with several --box flags (which box would it refine?)")
    for x, y, label in args.point:
        if label not in (0.0, 1.0):
            parser.error(f"--point {x:g} {y:g} {label:g}: LABEL must be 1 (foreground) or 0 (background)")


def _check_slice_box_range(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--slice/--box together (or neither, for a prompt-free model), and a well-ordered --range."""
    if (args.box is None) != (args.slice is None):
        parser.error("--slice and --box go together (the box is drawn on slice K); give neither only for a "
                     "prompt-free model")
    if args.range is not None and not 0 <= args.range[0] <= args.range[1]:
        parser.error("--range K0 K1 needs 0 <= K0 <= K1")


def _check_volume_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_slice_box_range(parser, args)
    try:
        kind = volume_kind(args.image)
    except ValueError as exc:
        parser.error(str(exc))
    if kind == "raw" and args.spacing is None:
        parser.error("--spacing SX SY SZ is required for a .npy volume (column, row and slice spacing in mm)")
    if kind != "raw" and args.spacing is not None:
        parser.error("--spacing is only for .npy volumes: NIfTI and DICOM carry their own spacing")
    if args.spacing is not None and min(args.spacing) <= 0:
        parser.error("--spacing values must be > 0")
    _check_seg_args(parser, args)
    if args.out_seg is not None and kind != "dicom_series":
        parser.error(f"--out-seg needs a DICOM series (a folder of .dcm files) as --image: a DICOM SEG references "
                     f"the series it segments, and {args.image.name!r} is {_KIND_NAMES.get(kind, kind)}")


def _check_study_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_slice_box_range(parser, args)
    for flag, uid in (("--study", args.study), ("--series", args.series)):
        if not uid.strip():
            parser.error(f"{flag} needs a UID")
    _check_seg_args(parser, args, needs_out_seg=False)


def _kind_name(kind: int) -> str:
    try:
        return pb.PromptKind.Name(kind).removeprefix("PROMPT_KIND_").lower()
    except ValueError:
        return str(kind)


if __name__ == "__main__":
    sys.exit(main())
