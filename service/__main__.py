"""``python -m service``: run the gateway (flags and MEDSEG_* environment, see --help)."""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings

from service.edge.server import serve
from service.settings import Settings


def quiet_patient_data_loggers() -> None:
    """pydicom's warnings can quote element values (names, IDs): keep them out of the logs."""
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.setLevel(logging.CRITICAL)
    pydicom_log.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_patient_data_loggers()
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
