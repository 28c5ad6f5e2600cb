"""Registry of exportable model variants: name -> exporter writing repository entries.

The top of ``export/``: it imports the exporters, none of them imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from export import encoder_variants, tensorrt_engines, unet
from export.medsam_lite import export_medsam_lite, medsam_lite_entries  # noqa: F401 - part of this module's API
from export.options import ExportOptions
from export.sam import export_sam


def _encoder_variant(name: str) -> Callable[[ExportOptions], list[Path]]:
    def export(opts: ExportOptions) -> list[Path]:
        return encoder_variants.export_encoder_variant(encoder_variants.VARIANTS[name], opts, limit=opts.guard_cases)

    return export


export_unet = unet.export_checkpoints

EXPORTERS: dict[str, Callable[[ExportOptions], list[Path]]] = {
    "medsam_lite": export_medsam_lite,
    "medsam_lite_int8": _encoder_variant("medsam_lite_int8"),
    "medsam_lite_bf16": _encoder_variant("medsam_lite_bf16"),
    "medsam_lite_int8_static": _encoder_variant("medsam_lite_int8_static"),
    "medsam_lite_tensorrt": tensorrt_engines.export_medsam_lite_tensorrt,
    "unet": export_unet,
    "sam": export_sam,
}
