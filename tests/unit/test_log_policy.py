"""The PHI-free log policy (service/observability/audit.py): library loggers, Python warnings
and tracebacks never carry text that may quote a file; the gateway's own lines are kept."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from service.core.domain import ImageInput
from service.core.imageio import decode_image
from service.observability import audit

SECRET = "CANARYDOEJANEX1960"


@pytest.fixture
def captured():
    """A root handler with the policy installed, at DEBUG, as ``python -m service`` sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level, saved_showwarning = root.level, warnings.showwarning
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    audit.install_log_policy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        warnings.showwarning = saved_showwarning


def test_library_records_keep_their_logger_but_not_their_text(captured):
    logging.getLogger("tifffile").warning("<tifffile.TiffTag 270> coercing %r", SECRET)
    logging.getLogger("PIL.TiffImagePlugin").debug("tag: ImageDescription (270) - value: b'%s'", SECRET)
    logging.getLogger("service.edge.server").info("gRPC on 127.0.0.1:%d", 50051)
    text = captured.getvalue()
    assert SECRET not in text
    assert "WARNING tifffile: (text withheld" in text and "DEBUG PIL.TiffImagePlugin: (text withheld" in text
    assert "INFO service.edge.server: gRPC on 127.0.0.1:50051" in text  # the gateway's own line as it was


def test_python_warnings_keep_their_category_and_origin_only(captured):
    warnings.warn(f"Metadata Warning, tag 270 had {SECRET}", UserWarning)
    text = captured.getvalue()
    assert SECRET not in text
    assert "UserWarning from " in text and "test_log_policy.py:" in text


def test_tracebacks_keep_frames_and_types_but_no_exception_message(captured):
    def parse():
        raise ValueError(f"bad tag value {SECRET!r}")

    for name in ("service.edge.servicer", "grpc._cython.cygrpc"):
        try:
            try:
                parse()
            except ValueError as exc:
                raise RuntimeError(f"while decoding {SECRET}") from exc
        except RuntimeError:
            logging.getLogger(name).exception("request r1 Segment failed")
    text = captured.getvalue()
    assert SECRET not in text
    assert text.count("Traceback (most recent call last)") == 4  # both exceptions of each chain
    assert "in parse" in text and "builtins.ValueError: (text withheld" in text
    assert "builtins.RuntimeError: (text withheld" in text
    assert "request r1 Segment failed" in text  # the own logger's message itself is kept


def test_a_real_decoder_debug_dump_of_tiff_tags_is_withheld(captured):
    """Pillow logs each short TIFF tag value at DEBUG while it opens an LZW TIFF."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "TIFF", compression="tiff_lzw",
                                                     tiffinfo={270: SECRET, 315: SECRET})
    decode_image(ImageInput(encoded=buffer.getvalue()))
    text = captured.getvalue()
    assert "PIL.TiffImagePlugin" in text  # it did log, at DEBUG
    assert SECRET not in text


def test_without_the_policy_the_same_dump_would_leak():
    """The control for the test above: the canary is really in Pillow's DEBUG records."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("PIL")
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, "TIFF", compression="tiff_lzw",
                                                         tiffinfo={270: SECRET})
        decode_image(ImageInput(encoded=buffer.getvalue()))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    assert SECRET in stream.getvalue()
