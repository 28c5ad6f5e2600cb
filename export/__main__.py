"""``python -m export VARIANT``: write ONNX models and config.pbtxt into the model repository.

Examples::

    python -m export medsam_lite                      # CPU target, checks 8 dev cases
    python -m export medsam_lite --target gpu --check-cases all
    python -m export medsam_lite_bf16                 # BF16 encoder, Dice guard on all dev cases
    python -m export sam --checkpoint sam_vit_b_01ec64.pth --variant vit_b            # -> sam_vit_b
    python -m export sam --checkpoint medsam_vit_b.pth --variant vit_b --preprocessing medsam  # -> medsam_vit_b

Without dev cases (a bare clone: no ``../shared/data/dev``, or ``--data-dir`` / ``MEDSEG_SHARED_DATA``
pointing where there are none) the parity check and the variant guards run on the DICOM test
images that ship with pydicom and print that they did (``parity evidence: ...``, ``... guard
evidence: ...``). A failed check exits 1 with one line saying why, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from export.options import ExportOptions
from export.registry import EXPORTERS
from export.sam import PUBLIC_VARIANTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exporter", metavar="VARIANT", choices=sorted(EXPORTERS),
                        help=f"what to export: {', '.join(sorted(EXPORTERS))}")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu",  # medsam_lite_tensorrt: always tensorrt
                        help="cpu: Triton python backend + ONNX Runtime; gpu: onnxruntime backend + TensorRT FP16")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where the checkpoint is copied")
    parser.add_argument("--force", action="store_true", help="re-export even if the ONNX files exist")
    parser.add_argument("--check-cases", default="8",
                        help="dev cases (or shipped images) for the PyTorch parity check ('all', or 0 to skip)")
    parser.add_argument("--guard-cases", type=int, default=None,
                        help="dev cases (or shipped images) for an encoder variant's guard (default: all; never "
                             "skipped)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="dev cases (default: ../shared/data/dev, or $MEDSEG_SHARED_DATA/dev); where there are "
                             "none, the checks use the images shipped with pydicom")
    sam = parser.add_argument_group("sam (a site's SAM or MedSAM checkpoint)")
    sam.add_argument("--checkpoint", type=Path, default=None, help="the .pth state dict (never downloaded)")
    sam.add_argument("--variant", dest="sam_variant", choices=PUBLIC_VARIANTS + ("vit_tiny",), default="vit_b",
                     help="its architecture (vit_tiny: the reduced test architecture)")
    sam.add_argument("--name", default="", help="served model name (default sam_VARIANT, or medsam_VARIANT)")
    sam.add_argument("--preprocessing", choices=("sam", "medsam"), default="sam",
                     help="sam: Meta's checkpoints (letterbox, SAM's pixel mean/std); medsam: MedSAM ViT-B "
                          "(stretched to 1024x1024, [0, 1], box prompts)")
    args = parser.parse_args(argv)
    if args.check_cases not in ("all",) and not args.check_cases.isdigit():
        parser.error("--check-cases takes 'all' or a number")
    if args.exporter != "sam" and args.checkpoint is not None:
        parser.error("--checkpoint is for `python -m export sam`")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Decoding the check images (the dev cases, or pydicom's own test files on a bare clone, some
    # of which no installed plugin decodes and are skipped) makes pydicom log tracebacks and warn
    # about its test files' quirks: noise to the person exporting, and never the export's result.
    import pydicom  # noqa: F401,PLC0415 - its import sets its logger's level: set ours after it

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    check_cases = None if args.check_cases == "all" else int(args.check_cases)
    opts = ExportOptions(repository=args.repository, target=args.target, cache_dir=args.cache_dir, force=args.force,
                         guard_cases=args.guard_cases, data_dir=args.data_dir, check_cases=check_cases,
                         checkpoint=args.checkpoint, sam_variant=args.sam_variant, name=args.name,
                         preprocessing=args.preprocessing)
    try:
        for path in EXPORTERS[args.exporter](opts):
            print(f"wrote {path}")
        if args.check_cases != "0" and args.exporter == "medsam_lite":
            from export.parity import check_medsam_lite

            limit = None if args.check_cases == "all" else int(args.check_cases)
            return 0 if check_medsam_lite(opts, args.data_dir, limit) else 1
    except (RuntimeError, FileNotFoundError, ValueError) as exc:  # a refused variant, missing inputs
        print(f"python -m export {args.exporter}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
