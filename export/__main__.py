"""``python -m export VARIANT``: write ONNX models and config.pbtxt into the model repository.

Examples::

    python -m export medsam_lite                      # CPU target, checks 8 dev cases
    python -m export medsam_lite --target gpu --check-cases all
    python -m export medsam_lite_bf16                 # BF16 encoder, Dice guard on all dev cases
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.options import ExportOptions
from export.registry import EXPORTERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(EXPORTERS))
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--target", choices=("cpu", "gpu"), default="cpu",  # medsam_lite_tensorrt: always tensorrt
                        help="cpu: Triton python backend + ONNX Runtime; gpu: onnxruntime backend + TensorRT FP16")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where the checkpoint is copied")
    parser.add_argument("--force", action="store_true", help="re-export even if the ONNX files exist")
    parser.add_argument("--check-cases", default="8",
                        help="dev cases for the PyTorch parity check ('all', or 0 to skip)")
    parser.add_argument("--guard-cases", type=int, default=None,
                        help="dev cases for an encoder variant's Dice guard (default: all; never skipped)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: ../shared/data/dev")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = ExportOptions(repository=args.repository, target=args.target, cache_dir=args.cache_dir, force=args.force,
                         guard_cases=args.guard_cases)
    for path in EXPORTERS[args.variant](opts):
        print(f"wrote {path}")
    if args.check_cases != "0" and args.variant == "medsam_lite":
        from export.parity import check_medsam_lite, default_dev_dir

        limit = None if args.check_cases == "all" else int(args.check_cases)
        ok = check_medsam_lite(opts, args.data_dir or default_dev_dir(), limit)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
