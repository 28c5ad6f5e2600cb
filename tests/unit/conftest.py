"""Fixtures shared by the unit tests."""

from __future__ import annotations

import json
import logging

import pytest

from service.observability import audit


@pytest.fixture
def audit_lines():
    """The audit lines (parsed JSON) written while the test runs, collected from the audit logger."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger = logging.getLogger(audit.AUDIT_LOGGER)
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
