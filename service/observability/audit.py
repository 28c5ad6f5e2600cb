"""The audit log: one JSON line per Segmentation RPC on the ``medseg.audit`` logger.

A line says who called what, how big it was, how it ended and how long it took::

    {"time": "2026-11-20T10:31:02.114Z", "request_id": "8f1c...", "method": "Segment",
     "caller": "pacs-router", "auth": "token", "client_cert": "pacs01.hospital.example",
     "peer": "ipv4:10.1.2.3:51844", "model": "medsam_lite", "prompts": 2, "image_height": 512,
     "image_width": 512, "status": "OK", "latency_ms": 812.4, "backend": "triton"}

It never holds patient data: the record is a fixed set of typed fields (numbers, status
names, names from the gateway's own configuration), no request text is copied into it
except a model name the gateway serves (anything else is logged as ``"(unknown)"``), and
no error message, file name, DICOM tag or token goes in. The audit logger has its own
handler at INFO (``--audit-log``: ``-`` = stderr, or a file) and does not propagate, so
``--log-level WARNING`` cannot silence it and it is not duplicated into the service log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import sys
from dataclasses import asdict, dataclass

AUDIT_LOGGER = "medseg.audit"
UNKNOWN_MODEL = "(unknown)"


@dataclass
class AuditRecord:
    request_id: str
    method: str
    backend: str
    peer: str = ""
    caller: str | None = None
    auth: str | None = None
    client_cert: str | None = None
    model: str | None = None
    prompts: int | None = None
    image_height: int | None = None
    image_width: int | None = None
    status: str = "UNKNOWN"
    latency_ms: float = 0.0

    def line(self, now: dt.datetime | None = None) -> str:
        now = now or dt.datetime.now(dt.timezone.utc)
        record = {"time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **asdict(self)}
        record["latency_ms"] = round(self.latency_ms, 1)
        return json.dumps(record, separators=(", ", ": "))


def configure(destination: str = "-") -> logging.Logger:
    """Give ``medseg.audit`` its own handler (stderr for ``-``, else an appended file)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    if destination == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")  # follows logrotate
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def write(record: AuditRecord) -> None:
    logging.getLogger(AUDIT_LOGGER).info(record.line())
