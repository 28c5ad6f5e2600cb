"""Build ``medseg.v1.Prompt`` messages from plain box and point tuples.

Coordinates are input-image pixels: x = column, y = row, origin at the top-left corner of
the top-left pixel (a box over a whole W x H image is ``(0, 0, W, H)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from medseg_client._generated import segmentation_pb2 as pb

BoxTuple = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in input-image pixels."""

PointTuple = tuple[float, float, int]
"""``(x, y, label)`` in input-image pixels; label 1 = foreground, 0 = background."""

__all__ = ["BoxTuple", "PointTuple", "build_prompts"]


def build_prompts(boxes: Sequence[Sequence[float]] = (), points: Sequence[Sequence[float]] = ()) -> list[pb.Prompt]:
    """Turn boxes and points into prompts, one mask per returned prompt.

    Rule: one prompt per box, in order. Points given together with exactly one box join
    that box's prompt; points given with no box form one point-only prompt; points with
    several boxes are ambiguous and raise :class:`ValueError` (build the
    :class:`pb.Prompt` list yourself instead). Nothing at all gives no prompt (prompt-free segmenters).

    ``boxes``: ``(x0, y0, x1, y1)`` tuples. ``points``: ``(x, y, label)`` tuples with
    label 1 (foreground) or 0 (background). Geometry (x0 < x1, inside the image...) is
    checked by the server, which answers ``INVALID_ARGUMENT``.
    """
    box_messages = [_box(box) for box in boxes]
    point_messages = [_point(point) for point in points]
    if not box_messages and not point_messages:
        return []  # no prompt: for prompt-free segmenters (a promptable model answers INVALID_ARGUMENT)
    if point_messages and len(box_messages) > 1:
        raise ValueError(
            f"points cannot be combined with {len(box_messages)} boxes: it is ambiguous which "
            "box they refine; send one box with its points, or build the prompts yourself"
        )
    if not box_messages:
        return [pb.Prompt(points=point_messages)]
    prompts = [pb.Prompt(box=box) for box in box_messages]
    if point_messages:
        prompts[0].points.extend(point_messages)
    return prompts


def _box(box: Sequence[float]) -> pb.Box:
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {len(box)} values: {tuple(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def _point(point: Sequence[float]) -> pb.Point:
    if len(point) != 3:
        raise ValueError(f"a point is (x, y, label), got {len(point)} values: {tuple(point)}")
    x, y, label = point
    if label not in (0, 1):  # also accepts True/False and 0.0/1.0
        raise ValueError(f"a point label is 1 (foreground) or 0 (background), got {label!r}")
    return pb.Point(x=float(x), y=float(y), positive=bool(label))
