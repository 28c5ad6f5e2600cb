"""Alias of the client package :mod:`medseg_client` (``client/``), kept so that
``from service.client import SegmentationClient`` and ``python -m service.client`` go on working."""

from medseg_client import *  # noqa: F401,F403
from medseg_client import __all__  # noqa: F401
