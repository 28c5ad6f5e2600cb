"""Moved to :mod:`service.core.segmenter_io` (the gateway serves with it); kept importable for training/."""

from service.core.segmenter_io import Frame, postprocess, preprocess, resize_labels, to_grey  # noqa: F401
