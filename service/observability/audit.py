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
import traceback
import warnings
from dataclasses import asdict, dataclass

AUDIT_LOGGER = "medseg.audit"
UNKNOWN_MODEL = "(unknown)"
# Loggers whose text the gateway writes itself (fixed messages, typed values, no file content).
OWN_LOGGERS = ("service", "medseg", "__main__")
WITHHELD = "(text withheld: a library's message may quote file contents)"


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
    # slices of the volume a Volumes call is about (image_height/width: one slice), else None
    image_depth: int | None = None
    status: str = "UNKNOWN"
    # why a RESOURCE_EXHAUSTED call was refused (queue_full, caller_rate, caller_inflight,
    # request_memory, abandoned, answer_size, limit), else None
    reason: str | None = None
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


# --- the log policy: no patient data through any logger ----------------------------------------
#
# Decoder libraries (tifffile, Pillow, pydicom, nibabel) put file contents in their warnings
# and log records: a TIFF ImageDescription, a DICOM PatientName, a PNG text chunk, Pillow's
# DEBUG dump of every TIFF tag value. So every record reaching a handler of the root logger
# goes through :class:`PatientDataFilter`: the gateway's own loggers (:data:`OWN_LOGGERS`)
# keep their text, any other logger keeps only its name and level, Python warnings (captured
# into logging) only their category and the code that raised them, and a traceback, from any
# logger, keeps its frames and exception types but never an exception's message.


def _is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def _traceback_without_messages(exc: BaseException) -> str:
    """Frames and exception types of ``exc`` and its chain, without any exception's text."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = ["Traceback (most recent call last):\n" + "".join(traceback.format_tb(e.__traceback__))
             + f"{type(e).__module__}.{type(e).__qualname__}: {WITHHELD}" for e in reversed(chain)]
    return "\n\nwhich then led to:\n\n".join(parts)


class PatientDataFilter(logging.Filter):
    """Rewrites records so that no library text (which may quote a file) reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "medseg_clean", False):  # already rewritten (a record meets several handlers)
            return True
        record.medseg_clean = True
        own = _is_own(record.name)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _traceback_without_messages(record.exc_info[1])
            record.exc_info = None
        elif record.exc_text and not own:
            record.exc_text = None
        if own:
            return True
        record.stack_info = None
        if record.name == "py.warnings":
            category, where = getattr(record, "medseg_warning", ("Warning", "?"))
            record.msg, record.args = f"{category} from {where} {WITHHELD}", ()
        else:
            record.msg, record.args = WITHHELD, ()
        return True


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` into the ``py.warnings`` logger, carrying only what is safe."""
    logger = logging.getLogger("py.warnings")
    where = f"{filename}:{lineno}"
    logger.warning("%s", WITHHELD, extra={"medseg_warning": (category.__name__, where)})


def install_log_policy() -> None:
    """Put :class:`PatientDataFilter` on every handler of the root logger and of any library
    logger that brought its own (nibabel does), and send Python warnings through logging, text
    withheld. Call after ``logging.basicConfig`` and the gateway's imports. Idempotent."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, PatientDataFilter) for f in handler.filters):
                handler.addFilter(PatientDataFilter())
    warnings.showwarning = _showwarning
