"""Mask geometry (pixelllm_plugins.masks): COCO RLE against pycocotools, polygons with holes and parts,
COCO segmentation forms, the tools' mask formats, and MaskResult."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pixelllm_plugins.data.synthetic import DRAWABLE, shape_mask
from pixelllm_plugins.inference.results import MaskResult
from pixelllm_plugins.masks import (
    fo_instance_to_mask,
    fo_points_to_polygons,
    ls_points_to_polygon,
    mask_iou,
    mask_to_box,
    mask_to_fo_instance,
    mask_to_polygons,
    mask_to_rle,
    mask_to_segmentation,
    normalize_rle,
    polygon_to_ls_points,
    polygons_to_fo_points,
    polygons_to_mask,
    polygons_to_segmentation,
    rle_area,
    rle_to_box,
    rle_to_mask,
    segmentation_to_mask,
    segmentation_to_polygons,
    segmentation_to_rle,
)


def _disk(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r ** 2


def _ring(h=60, w=80, cx=30, cy=30, r_out=22, r_in=10):
    return _disk(h, w, cx, cy, r_out) & ~_disk(h, w, cx, cy, r_in)


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with zeros), built independently of masks.py."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def _masks():
    rng = np.random.default_rng(0)
    out = [_ring(), _disk(30, 41, 12.3, 17.9, 9.1), np.zeros((7, 5), bool), np.ones((6, 9), bool)]
    out += [rng.random((23, 31)) < p for p in (0.1, 0.5, 0.9)]
    return out


# ---- RLE ----------------------------------------------------------------------------------------------

def test_rle_round_trip_matches_pycocotools():
    for m in _masks():
        rle = mask_to_rle(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        json.dumps(rle)
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle["counts"].encode() == ref["counts"]
        assert np.array_equal(rle_to_mask(rle), m) and rle_to_mask(rle).dtype == bool
        assert np.array_equal(rle_to_mask(dict(rle, counts=rle["counts"].encode())), m)  # bytes counts
        assert rle_area(rle) == int(mask_utils.area(ref)) == int(m.sum())
        x, y, w, h = mask_utils.toBbox(ref)
        assert rle_to_box(rle) == pytest.approx((x, y, x + w, y + h)) == mask_to_box(m)
        unc = _uncompressed(m)
        assert np.array_equal(rle_to_mask(unc), m) and normalize_rle(unc) == rle
        assert rle_area(unc) == int(m.sum())
    assert rle_to_box(mask_to_rle(np.zeros((4, 4), bool))) == (0.0, 0.0, 0.0, 0.0)


def test_rle_box_is_in_pixel_corners():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert rle_to_box(mask_to_rle(m)) == (3.0, 2.0, 9.0, 5.0)


def test_uncompressed_rle_with_zero_runs_and_bad_rles():
    m = rle_to_mask({"size": [2, 3], "counts": [1, 2, 0, 0, 3]})  # zero-length runs inside are allowed
    assert m.ravel(order="F").tolist() == [False, True, True, False, False, False]
    for bad in ({"size": [2, 2], "counts": "0"},  # short: pycocotools would return uninitialised pixels
                {"size": [2, 2], "counts": "o?"},  # long
                {"size": [2, 2], "counts": "\u00ff"},
                {"size": [2, 2], "counts": [1, 2]},  # uncompressed, sums to 3 != 4
                {"size": [2, 2], "counts": [1, -1, 4]},
                {"size": [2], "counts": "04"},
                {"counts": "04"},
                {"size": [2, 2], "counts": 4}):
        with pytest.raises(ValueError):
            rle_to_mask(bad)


def test_mask_iou_arrays_and_rles():
    a, b = _disk(40, 40, 18, 20, 10), _disk(40, 40, 24, 20, 10)
    expected = (a & b).sum() / (a | b).sum()
    ref = mask_utils.iou([mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))],
                         [mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))], [0])[0][0]
    assert mask_iou(a, b) == pytest.approx(expected) == pytest.approx(ref)
    assert mask_iou(mask_to_rle(a), mask_to_rle(b)) == pytest.approx(expected)
    assert mask_iou(a, mask_to_rle(b)) == pytest.approx(expected)
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    with pytest.raises(ValueError):
        mask_iou(a, a[:-1])


# ---- polygons ------------------------------------------------------------------------------------------

def test_polygon_coordinates_are_pixel_corners():
    m = np.zeros((5, 6), bool)
    m[2, 3] = True
    (p,) = mask_to_polygons(m)
    assert sorted(map(tuple, p["exterior"])) == [(3, 2), (3, 3), (4, 2), (4, 3)] and p["holes"] == []
    assert np.array_equal(polygons_to_mask([p], 6, 5), m)


def test_ring_keeps_its_hole_and_blobs_give_parts():
    ring = _ring()
    polys = mask_to_polygons(ring)
    assert len(polys) == 1 and len(polys[0]["holes"]) == 1
    back = polygons_to_mask(polys, 80, 60)
    assert mask_iou(back, ring) >= 0.98 and not back[30, 30]  # the hole is empty
    assert len(polys[0]["exterior"]) < 60  # simplified (the exact outline has hundreds of corners)

    blobs = _disk(60, 80, 20, 20, 9) | _disk(60, 80, 60, 40, 12)
    polys = mask_to_polygons(blobs)
    assert len(polys) == 2 and all(not p["holes"] for p in polys)
    assert polys[0]["exterior"][0][0] > 40  # the larger part comes first
    assert mask_iou(polygons_to_mask(polys, 80, 60), blobs) >= 0.98

    island = ring | _disk(60, 80, 30, 30, 4)  # a part inside the hole: OR-ed, not erased by the hole
    polys = mask_to_polygons(island)
    assert len(polys) == 2
    back = polygons_to_mask(polys, 80, 60)
    assert back[30, 30] and mask_iou(back, island) >= 0.98


def test_exact_polygons_reproduce_any_mask():
    rng = np.random.default_rng(1)
    for _ in range(10):
        m = rng.random((19, 27)) < rng.uniform(0.2, 0.8)  # holes, diagonal contacts, single pixels
        assert np.array_equal(polygons_to_mask(mask_to_polygons(m, min_iou=1.0), 27, 19), m)
        assert mask_iou(polygons_to_mask(mask_to_polygons(m), 27, 19), m) >= 0.98
    assert mask_to_polygons(np.zeros((4, 4), bool)) == []


@pytest.mark.parametrize("shape", sorted(DRAWABLE))
def test_every_synthetic_shape_round_trips(shape):
    for box in [(3.3, 4.7, 17.9, 19.2), (5.6, 2.2, 48.1, 45.0), (10.2, 5.5, 150.8, 140.1)]:
        patch, _, _ = shape_mask(shape, box)
        m = np.asarray(patch) >= 128
        polys = mask_to_polygons(m)
        assert len(polys) == 1
        assert mask_iou(polygons_to_mask(polys, m.shape[1], m.shape[0]), m) >= 0.98
        assert len(polys[0]["holes"]) == (1 if shape == "ring" else 0)


# ---- COCO segmentation ------------------------------------------------------------------------------

def test_segmentation_forms():
    disk, ring = _disk(60, 80, 40, 30, 15), _ring()
    seg = mask_to_segmentation(disk)
    assert isinstance(seg, list) and all(isinstance(v, float) for v in seg[0])
    assert mask_iou(segmentation_to_mask(seg, 60, 80), disk) >= 0.98
    assert np.array_equal(segmentation_to_mask(seg, 60, 80),
                          polygons_to_mask(segmentation_to_polygons(seg), 80, 60))
    seg = mask_to_segmentation(ring)  # COCO polygons cannot carry holes: RLE
    assert isinstance(seg, dict) and np.array_equal(segmentation_to_mask(seg, 60, 80), ring)
    assert np.array_equal(segmentation_to_mask(dict(seg, counts=seg["counts"].encode()), 60, 80), ring)
    assert np.array_equal(segmentation_to_mask(_uncompressed(ring), 60, 80), ring)
    assert segmentation_to_rle(_uncompressed(ring), 60, 80) == mask_to_rle(ring)
    assert len(segmentation_to_polygons(seg)[0]["holes"]) == 1
    with pytest.raises(ValueError, match="holes"):
        polygons_to_segmentation(mask_to_polygons(ring))
    # COCO's own rasteriser defines what a polygon covers: a 2..6 square is the pixels 2..5
    assert segmentation_to_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 8, 8).sum() == 16
    assert not segmentation_to_mask([], 4, 4).any()
    with pytest.raises(ValueError, match="far outside"):  # pycocotools would walk a 1e12-pixel edge
        polygons_to_mask([{"exterior": [[0, 0], [1e12, 0], [0, 1e12]], "holes": []}], 80, 60)
    for bad in ([[1, 2, 3, 4]], [[0, 0, 5, 0, float("nan"), 5]], [[0, 0, 5, 0, 5]], [["a", 0, 5, 0, 5, 5]],
                [[0, 0, 1e12, 0, 0, 1e12]], mask_to_rle(np.zeros((5, 5), bool)), "polygon", 3):
        with pytest.raises(ValueError):
            segmentation_to_rle(bad, 60, 80)


# ---- tools ------------------------------------------------------------------------------------------------

def test_label_studio_and_fiftyone_conversions():
    ring = _ring()
    polys = mask_to_polygons(ring)
    ext = polys[0]["exterior"]
    pts = polygon_to_ls_points(ext, 80, 60)
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in pts)
    assert np.allclose(ls_points_to_polygon(pts, 80, 60)["exterior"], ext)

    fo = polygons_to_fo_points(polys, 80, 60)
    assert len(fo) == 2 and all(0 <= v <= 1 for shape in fo for p in shape for v in p)
    back = fo_points_to_polygons(fo, 80, 60)
    assert len(back) == 1 and len(back[0]["holes"]) == 1  # the inner shape is read back as the hole
    assert mask_iou(polygons_to_mask(back, 80, 60), polygons_to_mask(polys, 80, 60)) > 0.999

    bbox, crop = mask_to_fo_instance(ring)
    assert crop.shape == (44, 44) and np.allclose(bbox, [8 / 80, 8 / 60, 44 / 80, 44 / 60])
    assert np.array_equal(fo_instance_to_mask(bbox, crop, 80, 60), ring)
    with pytest.raises(ValueError):
        mask_to_fo_instance(np.zeros((3, 3), bool))


def test_mask_result_round_trip():
    ring = _ring()
    r = MaskResult(box_xyxy=rle_to_box(mask_to_rle(ring)), score=0.9, mask=mask_to_rle(ring),
                   polygons=mask_to_polygons(ring), mask_score=0.8, text="the ring", model_version="v1")
    d = json.loads(json.dumps(r.to_dict()))
    back = MaskResult.from_dict(d)
    assert back == r and back.to_dict() == r.to_dict()
    assert np.array_equal(back.to_mask(), ring)
    as_bytes = {"size": d["mask"]["size"], "counts": r.mask["counts"].encode()}
    bytes_counts = MaskResult.from_dict(dict(d, mask=as_bytes))
    assert bytes_counts.mask == r.mask
    minimal = MaskResult.from_dict({"box_xyxy": [0, 0, 1, 1], "score": 1, "mask": r.mask, "mask_score": 0.5})
    assert minimal.polygons == [] and minimal.text is None and minimal.model_version == ""
