"""Medical image segmentation gateway (gRPC) for SAM-family models and trained segmenters."""

__version__ = "0.1.0"
