"""``python -m service``: run the gateway (flags and MEDSEG_* environment, see --help)."""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings

from service.edge.server import serve
from service.observability import audit
from service.settings import Settings


def quiet_patient_data_loggers() -> None:
    """No library text in the logs: decoder warnings and log records can quote file contents
    (DICOM names and IDs, TIFF tags, PNG text chunks, NIfTI descriptions). pydicom is silenced
    outright; every other library logger and every Python warning goes through the audit
    module's PHI-free policy (:func:`service.observability.audit.install_log_policy`: the
    logger's name, a warning's category and origin, tracebacks without exception messages)."""
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.setLevel(logging.CRITICAL)
    pydicom_log.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    audit.install_log_policy()


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_patient_data_loggers()
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
