"""Box conventions and conversions, in one place.

Public boundary convention: ``x1, y1, x2, y2`` in pixels of the original image.
Label Studio uses percent ``x, y, width, height`` (0-100); FiftyOne uses relative
``[x, y, w, h]`` (0-1). Masks and polygons (COCO RLE / polygons, Label Studio polygon points, FiftyOne
polylines and instance masks) convert in :mod:`pixelllm_plugins.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import InvalidBoxError

Box = tuple[float, float, float, float]


def as_box(box: Sequence[float]) -> Box:
    """Validate a 4-number sequence and return it as a tuple of floats."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise InvalidBoxError(f"box must be 4 numbers x1,y1,x2,y2, got {box!r}") from exc
    if len(values) != 4:
        raise InvalidBoxError(f"box must be 4 numbers x1,y1,x2,y2, got {len(values)} numbers: {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise InvalidBoxError(f"box has a non-finite coordinate: {box!r}")
    return values  # type: ignore[return-value]


def clip_box(box: Sequence[float], width: float, height: float) -> Box:
    """Order the corners and clip to the image; raise if nothing is left."""
    x1, y1, x2, y2 = as_box(box)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        raise InvalidBoxError(
            f"box {tuple(round(v, 1) for v in (x1, y1, x2, y2))} has no area inside the "
            f"{int(width)}x{int(height)} image; draw a box at least 1 px wide and high"
        )
    return clipped


def parse_box(text: str) -> Box:
    """Parse ``"x1,y1,x2,y2"`` (CLI syntax)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    return as_box(parts)


def box_area(box: Sequence[float]) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when both are empty)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def points_to_box(points: Sequence[Sequence[float]]) -> Box:
    """The min/max box around points (PixelLLM reads a box from its 2 predicted points)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return (min(xs), min(ys), max(xs), max(ys))


def xyxy_to_ls_percent(box: Sequence[float], width: float, height: float) -> dict[str, float]:
    """Pixels xyxy -> Label Studio rectangle value (percent of the original image)."""
    x1, y1, x2, y2 = box
    return {
        "x": 100.0 * x1 / width,
        "y": 100.0 * y1 / height,
        "width": 100.0 * (x2 - x1) / width,
        "height": 100.0 * (y2 - y1) / height,
    }


def ls_percent_to_xyxy(value: dict, width: float, height: float) -> Box:
    """Label Studio rectangle value (percent) -> pixels xyxy. Rotation is ignored."""
    x = float(value["x"]) * width / 100.0
    y = float(value["y"]) * height / 100.0
    w = float(value["width"]) * width / 100.0
    h = float(value["height"]) * height / 100.0
    return (x, y, x + w, y + h)


def xyxy_to_fo_relative(box: Sequence[float], width: float, height: float) -> list[float]:
    """Pixels xyxy -> FiftyOne ``bounding_box`` ``[x, y, w, h]`` in [0, 1]."""
    x1, y1, x2, y2 = box
    return [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height]


def fo_relative_to_xyxy(rel: Sequence[float], width: float, height: float) -> Box:
    """FiftyOne relative ``[x, y, w, h]`` -> pixels xyxy."""
    x, y, w, h = (float(v) for v in rel)
    return (x * width, y * height, (x + w) * width, (y + h) * height)


def point_to_relative(point: Sequence[float], width: float, height: float) -> list[float]:
    return [float(point[0]) / width, float(point[1]) / height]
