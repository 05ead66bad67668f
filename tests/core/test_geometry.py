import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pixelllm_plugins.errors import InvalidBoxError
from pixelllm_plugins.geometry import (
    as_box,
    clip_box,
    fo_relative_to_xyxy,
    iou,
    ls_percent_to_xyxy,
    parse_box,
    points_to_box,
    xyxy_to_fo_relative,
    xyxy_to_ls_percent,
)

sizes = st.integers(min_value=2, max_value=10_000)
coords = st.floats(min_value=0, max_value=1, allow_nan=False)


@st.composite
def boxes_in_image(draw):
    w, h = draw(sizes), draw(sizes)
    a, b, c, d = (draw(coords) for _ in range(4))
    x1, x2 = sorted((a * w, b * w))
    y1, y2 = sorted((c * h, d * h))
    return (x1, y1, x2, y2), w, h


@given(boxes_in_image())
def test_label_studio_round_trip(args):
    box, w, h = args
    back = ls_percent_to_xyxy(xyxy_to_ls_percent(box, w, h), w, h)
    assert all(math.isclose(a, b, abs_tol=1e-6 * max(w, h)) for a, b in zip(box, back))


@given(boxes_in_image())
def test_fiftyone_round_trip_and_range(args):
    box, w, h = args
    rel = xyxy_to_fo_relative(box, w, h)
    assert all(-1e-9 <= v <= 1 + 1e-9 for v in rel)
    back = fo_relative_to_xyxy(rel, w, h)
    assert all(math.isclose(a, b, abs_tol=1e-6 * max(w, h)) for a, b in zip(box, back))


def test_label_studio_percent_values():
    assert xyxy_to_ls_percent((10, 20, 60, 120), 200, 400) == {"x": 5.0, "y": 5.0, "width": 25.0, "height": 25.0}


@given(st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=4, max_size=4), sizes, sizes)
def test_clip_box_is_inside_or_raises(values, w, h):
    try:
        x1, y1, x2, y2 = clip_box(values, w, h)
    except InvalidBoxError:
        return
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_clip_box_orders_and_clips():
    assert clip_box((120, 50, -10, 10), 100, 80) == (0, 10, 100, 50)


def test_degenerate_box_raises_with_advice():
    with pytest.raises(InvalidBoxError, match="no area"):
        clip_box((500, 500, 600, 600), 100, 100)
    with pytest.raises(InvalidBoxError, match="4 numbers"):
        as_box((1, 2, 3))
    with pytest.raises(InvalidBoxError, match="non-finite"):
        as_box((1, 2, float("nan"), 4))


def test_parse_box_and_points():
    assert parse_box("1, 2,3,4") == (1, 2, 3, 4)
    assert points_to_box([(5, 1), (2, 7)]) == (2, 1, 5, 7)


@given(boxes_in_image())
def test_iou_bounds_and_self(args):
    box, _, _ = args
    value = iou(box, box)
    area = (box[2] - box[0]) * (box[3] - box[1])
    assert value == pytest.approx(1.0 if area > 0 else 0.0)


def test_iou_known_value():
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
