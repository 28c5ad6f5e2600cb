"""Offline training of weakly supervised segmenters (boxes, scribbles, points, image labels).

Separate from the gateway: its dependencies are in ``requirements/training.txt`` (MONAI,
SciPy, scikit-image, tqdm). See docs/TRAINING.md.
"""
