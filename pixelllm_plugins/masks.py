"""Instance masks in one place: COCO RLE, polygons, COCO ``segmentation``, and the tools' mask formats.

Conventions:

- A mask is a ``bool`` array ``[H, W]``. Pixel ``(x, y)`` covers ``[x, x+1] x [y, y+1]``, so polygon
  coordinates are pixel *corners* in pixels of the mask (as COCO's polygons: pycocotools fills the pixels
  whose centre lies inside), and a box of a mask is ``x1, y1, x2, y2`` with ``x2 = last column + 1``.
- RLE is COCO's compressed RLE, ``{"size": [h, w], "counts": str}`` (``counts`` decoded to ``str`` so it
  goes into JSON as is). Readers also take ``bytes`` counts and uncompressed RLE (``counts`` a list of run
  lengths).
- A polygon is ``{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}`` (rings not closed: the first
  point is not repeated). A mask gives one polygon per connected part; a ring keeps its hole.
- COCO ``segmentation`` is either polygons (a list of flat ``[x1, y1, x2, y2, ...]`` lists, which cannot carry
  holes) or RLE (compressed or not).

Encoding, decoding and polygon rasterising are pycocotools' (one rasteriser for our polygons and COCO's);
contours come from shapely (the mask's pixel edges polygonised: the exact outline, holes included, then
``simplify``), so no optional library (OpenCV, scikit-image) is needed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import numpy as np
import shapely
from PIL import Image
from pycocotools import mask as mask_utils
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from .geometry import Box, fo_relative_to_xyxy, xyxy_to_fo_relative

RLE = dict[str, Any]  # {"size": [h, w], "counts": str}
PolygonDict = dict[str, Any]  # {"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}

# simplify tolerances (pixels) tried in turn; the last whose raster keeps IoU >= min_iou wins
SIMPLIFY_TOLERANCES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
_RLE_CHARS = frozenset(range(48, 48 + 64))  # COCO's compressed counts use the characters '0'..'o'


def _decode(rles):
    """``pycocotools.mask.decode``, without its NumPy 2 ``__array__`` deprecation warning (one per call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return mask_utils.decode(rles)


def _as_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be a 2-D array [H, W], got shape {arr.shape}")
    return arr.astype(bool, copy=False)


# ---- COCO RLE ------------------------------------------------------------------------------------------

def _size(rle: Mapping) -> tuple[int, int]:
    size = rle.get("size") if isinstance(rle, Mapping) else None
    if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"an RLE needs 'size' [h, w] (two non-negative integers), got {size!r}")
    return int(size[0]), int(size[1])


def _coco_rle(rle: Mapping) -> dict:
    """Any RLE form -> pycocotools' compressed dict (``bytes`` counts)."""
    h, w = _size(rle)
    counts = rle.get("counts")
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as exc:
            raise ValueError("compressed RLE 'counts' must be ASCII") from exc
    if isinstance(counts, (bytes, bytearray)):
        if not set(counts) <= _RLE_CHARS:
            raise ValueError("compressed RLE 'counts' holds characters outside COCO's '0'..'o'")
        return {"size": [h, w], "counts": bytes(counts)}
    if isinstance(counts, (list, tuple)):  # uncompressed: run lengths, starting with zeros
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE 'counts' must be non-negative integers")
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"uncompressed RLE 'counts' sum to {sum(counts)}, not h*w = {h * w}")
        out = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        if h * w == 0:
            return {"size": [h, w], "counts": out["counts"]}
        # re-encoded so that zero-length runs inside the list give COCO's canonical string
        return {"size": [h, w], "counts": mask_utils.encode(np.asfortranarray(_decode(out)))["counts"]}
    raise ValueError(f"an RLE needs 'counts' (str, bytes or a list of run lengths), "
                     f"got {type(counts).__name__}")


def _public(rle: Mapping) -> RLE:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else counts}


def normalize_rle(rle: Mapping) -> RLE:
    """Any RLE form (str / bytes / uncompressed counts) -> compressed RLE with ``str`` counts."""
    return _public(_coco_rle(rle))


def mask_to_rle(mask: np.ndarray) -> RLE:
    """Boolean mask ``[H, W]`` -> compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    m = _as_mask(mask)
    return _public(mask_utils.encode(np.asfortranarray(m, dtype=np.uint8)))


def rle_to_mask(rle: Mapping) -> np.ndarray:
    """COCO RLE (compressed with str or bytes counts, or uncompressed) -> boolean mask ``[h, w]``.

    Counts that do not cover exactly ``h * w`` pixels raise ``ValueError`` (pycocotools would otherwise
    return uninitialised memory for short counts): a compressed string must be the one pycocotools writes
    for its mask (so a hand-made string with zero-length runs inside is refused; as a list it is fine)."""
    coco = _coco_rle(rle)
    h, w = coco["size"]
    if h * w == 0:
        return np.zeros((h, w), bool)
    decoded = _decode(coco)
    # a valid compressed RLE is what encode() writes back; short counts leave pixels undefined
    if mask_utils.encode(np.asfortranarray(decoded))["counts"] != coco["counts"]:
        raise ValueError(f"RLE counts do not describe a {h}x{w} mask")
    return decoded.astype(bool)


def rle_area(rle: Mapping) -> int:
    """Number of mask pixels."""
    return int(mask_utils.area(_coco_rle(rle)))


def rle_to_box(rle: Mapping) -> Box:
    """Tight box ``x1, y1, x2, y2`` of the mask's pixels (``(0, 0, 0, 0)`` for an empty mask)."""
    x, y, w, h = (float(v) for v in mask_utils.toBbox(_coco_rle(rle)))
    return (x, y, x + w, y + h)


def mask_to_box(mask: np.ndarray) -> Box:
    """Tight box ``x1, y1, x2, y2`` of a boolean mask (``(0, 0, 0, 0)`` when empty)."""
    m = _as_mask(mask)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def mask_iou(a: np.ndarray | Mapping, b: np.ndarray | Mapping) -> float:
    """Intersection over union of two masks of the same size (boolean arrays or RLE; 0 when both are
    empty)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        ra, rb = _coco_rle(a), _coco_rle(b)
        if ra["size"] != rb["size"]:
            raise ValueError(f"masks differ in size: {ra['size']} vs {rb['size']}")
        return float(mask_utils.iou([ra], [rb], [0])[0][0])
    ma = rle_to_mask(a) if isinstance(a, Mapping) else _as_mask(a)
    mb = rle_to_mask(b) if isinstance(b, Mapping) else _as_mask(b)
    if ma.shape != mb.shape:
        raise ValueError(f"masks differ in shape: {ma.shape} vs {mb.shape}")
    union = int(np.count_nonzero(ma | mb))
    return int(np.count_nonzero(ma & mb)) / union if union else 0.0


# ---- polygons --------------------------------------------------------------------------------------------

def _runs(edges: np.ndarray, breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of True along each row of ``edges`` [r, n] (unit edges from column x to x + 1), cut at
    the vertices flagged in ``breaks`` [r, n + 1]: (row, first column, one past the last column) per run."""
    r, n = edges.shape
    before = np.zeros((r, n), bool)
    before[:, 1:] = edges[:, :-1]
    after = np.zeros((r, n), bool)
    after[:, :-1] = edges[:, 1:]
    starts = edges & (~before | breaks[:, :-1])
    ends = edges & (~after | breaks[:, 1:])
    sy, sx = np.nonzero(starts)  # row-major: the k-th start and the k-th end bound the same run
    _, ex = np.nonzero(ends)
    return sy, sx, ex + 1


def _outline(mask: np.ndarray) -> list[Polygon]:
    """The exact pixel-edge outline of a mask as polygons, one per connected part (holes as interiors).

    The edges between mask and non-mask pixels, joined into straight runs that end at every vertex where
    an edge of the other direction meets them, are polygonised (shapely); of the faces, those made of mask
    pixels are the parts (a hole is a face too, of non-mask pixels)."""
    h, w = mask.shape
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = mask
    horizontal = p[1:, 1:-1] != p[:-1, 1:-1]  # [h + 1, w]: edge from (x, y) to (x + 1, y)
    vertical = p[1:-1, 1:] != p[1:-1, :-1]  # [h, w + 1]: edge from (x, y) to (x, y + 1)
    if not horizontal.any():
        return []
    v_at = np.zeros((h + 1, w + 1), bool)  # a vertical edge ends at vertex (x, y)
    v_at[:-1] |= vertical
    v_at[1:] |= vertical
    h_at = np.zeros((h + 1, w + 1), bool)  # a horizontal edge ends at vertex (x, y)
    h_at[:, :-1] |= horizontal
    h_at[:, 1:] |= horizontal
    hy, hx0, hx1 = _runs(horizontal, v_at)
    vx, vy0, vy1 = _runs(vertical.T, h_at.T)
    lines = np.concatenate([np.stack([np.stack([hx0, hy], 1), np.stack([hx1, hy], 1)], 1),
                            np.stack([np.stack([vx, vy0], 1), np.stack([vx, vy1], 1)], 1)]).astype(np.float64)
    faces = shapely.get_parts(shapely.polygonize(shapely.linestrings(lines)))
    parts = []
    for face in faces:
        (ax, ay), (bx, by) = face.exterior.coords[:2]  # an axis-aligned edge; pixel centres lie either side
        length = abs(bx - ax) + abs(by - ay)
        dx, dy = (bx - ax) / length, (by - ay) / length
        mx, my = ax + dx / 2, ay + dy / 2  # the middle of its first unit edge
        for cx, cy in ((mx + dy / 2, my - dx / 2), (mx - dy / 2, my + dx / 2)):
            if face.contains(shapely.Point(cx, cy)):
                if mask[int(cy), int(cx)]:
                    parts.append(orient(face.simplify(0, preserve_topology=False), 1.0))
                break
    return sorted(parts, key=lambda q: (-q.area, q.bounds[1], q.bounds[0]))


def _parts(geometry: shapely.Geometry) -> list[Polygon]:
    """The polygons of a geometry (largest first)."""
    if geometry.is_empty:
        return []
    parts = [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon) and g.area > 0]
    parts += [q for g in shapely.get_parts(geometry) if isinstance(g, MultiPolygon) for q in g.geoms]
    return sorted((orient(q, 1.0) for q in parts), key=lambda q: (-q.area, q.bounds[1], q.bounds[0]))


def _ring(coords) -> list[list[float]]:
    pts = np.asarray(coords, dtype=np.float64).reshape(-1, 2).tolist()
    return pts[:-1] if len(pts) > 1 and pts[0] == pts[-1] else pts


def _to_dict(polygon: Polygon) -> PolygonDict:
    return {"exterior": _ring(polygon.exterior.coords), "holes": [_ring(r.coords) for r in polygon.interiors]}


def _rings(polygon: Mapping | Sequence | Polygon) -> list[np.ndarray]:
    """Exterior then holes as ``[n, 2]`` float arrays; a bare list of points is an exterior."""
    if isinstance(polygon, Polygon):
        return [np.asarray(polygon.exterior.coords)] + [np.asarray(r.coords) for r in polygon.interiors]
    if isinstance(polygon, Mapping):
        rings = [polygon.get("exterior", []), *(polygon.get("holes", []) or [])]
    else:
        rings = [polygon]
    out = []
    for ring in rings:
        arr = np.asarray(ring, dtype=np.float64)
        if arr.size == 0:
            arr = arr.reshape(0, 2)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"a polygon ring must be a list of [x, y] points, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("polygon has a non-finite coordinate")
        out.append(arr)
    return out


def _from_dict(polygon: Mapping | Sequence) -> Polygon:
    rings = _rings(polygon)
    return Polygon(rings[0], [r for r in rings[1:] if len(r) >= 3]) if len(rings[0]) >= 3 else Polygon()


def _draw(rings: list[np.ndarray], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Rasterise one polygon (exterior, then holes) into the window ``[x0, x0+w) x [y0, y0+h)`` with COCO's
    rasteriser (``pycocotools`` ``frPyObjects``): a pixel is in when its centre is inside, up to ties; the
    holes are then cleared. (PIL's ``ImageDraw.polygon`` fill was measured biased: ~4 % fatter at 1x and,
    even at 8x supersampling, twice as far from the centre rule as COCO's; one rule for our polygons and
    COCO's keeps ``polygons_to_mask`` and :func:`segmentation_to_mask` in agreement.)"""
    origin = np.asarray([x0, y0], np.float64)
    flat = [(ring - origin).ravel().tolist() for ring in rings]
    if len(flat[0]) < 6:
        return np.zeros((h, w), bool)
    drawn = _decode(mask_utils.frPyObjects([r for r in flat if len(r) >= 6], h, w)).astype(bool)
    out = drawn[..., 0]
    if drawn.shape[-1] > 1:
        out &= ~drawn[..., 1:].any(axis=-1)
    return out


def _check_reach(values: np.ndarray | Sequence[float], width: int, height: int) -> None:
    # pycocotools walks every edge at 5x: far-off vertices would cost unbounded memory
    reach = 2 * max(width, height, 1)
    arr = np.asarray(values, dtype=np.float64)
    if arr.size and (arr.min() < -reach or arr.max() > reach):
        raise ValueError(f"a polygon vertex lies far outside the {width}x{height} image")


def _window(rings: list[np.ndarray], width: int, height: int) -> tuple[int, int, int, int] | None:
    ext = rings[0]
    if len(ext) < 3:
        return None
    for ring in rings:
        _check_reach(ring, width, height)
    x0, y0 = max(0, math.floor(ext[:, 0].min())), max(0, math.floor(ext[:, 1].min()))
    x1, y1 = min(width, math.ceil(ext[:, 0].max()) + 1), min(height, math.ceil(ext[:, 1].max()) + 1)
    return None if x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def polygons_to_mask(polygons: Sequence[Mapping | Sequence], width: int, height: int) -> np.ndarray:
    """Polygons (pixel-corner coordinates) -> boolean mask ``[height, width]``: each polygon rasterised in its
    own window with COCO's rule (pixel in when its centre is), its holes cleared, and the polygons OR-ed (so a
    part inside another's hole stays)."""
    out = np.zeros((int(height), int(width)), bool)
    for polygon in polygons:
        rings = _rings(polygon)
        win = _window(rings, out.shape[1], out.shape[0])
        if win is None:
            continue
        x0, y0, x1, y1 = win
        out[y0:y1, x0:x1] |= _draw(rings, x0, y0, x1 - x0, y1 - y0)
    return out


def _window_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _simplified(exact: Polygon, own: np.ndarray, min_iou: float) -> Polygon:
    """``exact`` (a part's pixel-edge polygon, ``own`` its pixels in its bounds) simplified with the largest
    of ``SIMPLIFY_TOLERANCES`` whose raster keeps IoU >= ``min_iou`` with ``own`` and the part's holes,
    found by bisection (a larger tolerance only moves the outline further from the pixels)."""
    bx0, by0, bx1, by1 = (int(round(v)) for v in exact.bounds)
    w, h = bx1 - bx0, by1 - by0

    def candidate(tol: float) -> Polygon | None:
        cand = exact.simplify(tol, preserve_topology=False)  # Douglas-Peucker; far faster than topology-safe
        if (cand.is_empty or not isinstance(cand, Polygon) or not cand.is_valid
                or len(cand.interiors) != len(exact.interiors)):
            return None
        return cand if _window_iou(_draw(_rings(cand), bx0, by0, w, h), own) >= min_iou else None

    tolerances = [t for t in SIMPLIFY_TOLERANCES if t <= max(w, h) / 2]
    best, lo, hi = exact, 0, len(tolerances)  # tolerances[:lo] pass, tolerances[hi:] fail
    while lo < hi:
        mid = (lo + hi) // 2
        cand = candidate(tolerances[mid])
        if cand is None:
            hi = mid
        else:
            best, lo = cand, mid + 1
    return orient(best, 1.0)


def mask_to_polygons(mask: np.ndarray, *, min_iou: float = 0.98) -> list[PolygonDict]:
    """Boolean mask -> one polygon per connected part (largest first), holes kept, each simplified only as far
    as its raster keeps IoU >= ``min_iou`` with its own pixels. Coordinates: pixel corners of the mask."""
    m = _as_mask(mask)
    parts = _outline(m)
    out = []
    for part in parts:
        bx0, by0, bx1, by1 = (int(round(v)) for v in part.bounds)
        own = m[by0:by1, bx0:bx1] if len(parts) == 1 else _draw(_rings(part), bx0, by0, bx1 - bx0, by1 - by0)
        out.append(_to_dict(_simplified(part, own, min_iou)))
    return out


def polygons_area(polygons: Sequence[Mapping | Sequence]) -> float:
    """Geometric area of polygons (holes subtracted), in square pixels."""
    return float(sum(_from_dict(p).area for p in polygons))


def offset_polygons(polygons: Sequence[Mapping], dx: float, dy: float) -> list[PolygonDict]:
    """Polygons moved by ``(dx, dy)`` pixels (e.g. from an object's patch to the image)."""
    def move(ring):
        return [[float(x) + dx, float(y) + dy] for x, y in ring]
    return [{"exterior": move(p["exterior"]), "holes": [move(h) for h in p.get("holes", [])]}
            for p in polygons]


# ---- COCO segmentation ------------------------------------------------------------------------------------

def polygons_to_segmentation(polygons: Sequence[Mapping]) -> list[list[float]]:
    """Our polygons -> COCO polygon ``segmentation`` (flat lists). COCO polygons cannot carry holes: a polygon
    with holes raises ``ValueError`` (write RLE instead, see :func:`mask_to_segmentation`)."""
    out = []
    for p in polygons:
        if p.get("holes"):
            raise ValueError("COCO polygons cannot carry holes; write the mask as RLE")
        out.append([round(float(v), 2) for pt in p["exterior"] for v in pt])
    return out


def _check_coco_polygons(segmentation: Sequence) -> list[list[float]]:
    out = []
    for poly in segmentation:
        if not isinstance(poly, (list, tuple)):
            raise ValueError(f"a COCO polygon must be a flat list of numbers, got {type(poly).__name__}")
        values = [float(v) for v in poly if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(values) != len(poly) or not all(map(math.isfinite, values)):
            raise ValueError("a COCO polygon must hold finite numbers only")
        if len(values) < 6 or len(values) % 2:
            raise ValueError(f"a COCO polygon needs an even number (>= 6) of coordinates, got {len(values)}")
        out.append(values)
    return out


def _not_segmentation(segmentation: Any) -> str:
    return f"'segmentation' must be polygons (a list) or RLE (a dict), got {type(segmentation).__name__}"


def segmentation_to_polygons(segmentation: Any) -> list[PolygonDict]:
    """COCO ``segmentation`` -> our polygons (COCO polygons directly, without holes; RLE traced)."""
    if isinstance(segmentation, Mapping):
        return mask_to_polygons(rle_to_mask(segmentation))
    if not isinstance(segmentation, (list, tuple)):
        raise ValueError(_not_segmentation(segmentation))
    return [{"exterior": [[v[i], v[i + 1]] for i in range(0, len(v), 2)], "holes": []}
            for v in _check_coco_polygons(segmentation)]


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> RLE:
    """COCO ``segmentation`` (polygons, compressed RLE or uncompressed RLE) of an image of ``height`` x
    ``width`` -> compressed RLE (str counts), through ``pycocotools.mask.frPyObjects``. Raises ``ValueError``
    for a malformed segmentation or an RLE of another size."""
    h, w = int(height), int(width)
    if isinstance(segmentation, Mapping):
        if _size(segmentation) != (h, w):
            raise ValueError(f"RLE size {list(_size(segmentation))} differs from the image's [{h}, {w}]")
        return normalize_rle(segmentation)  # uncompressed counts go through frPyObjects there
    if not isinstance(segmentation, (list, tuple)):
        raise ValueError(_not_segmentation(segmentation))
    polygons = _check_coco_polygons(segmentation)
    if not polygons:
        return mask_to_rle(np.zeros((h, w), bool))
    for poly in polygons:
        _check_reach(poly, w, h)
    return _public(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygons, compressed or uncompressed RLE) -> boolean mask
    ``[height, width]``."""
    return rle_to_mask(segmentation_to_rle(segmentation, height, width))


def mask_to_segmentation(mask: np.ndarray, *, min_iou: float = 0.98,
                         polygons: Sequence[Mapping] | None = None) -> list[list[float]] | RLE:
    """The COCO ``segmentation`` of a mask, as the real datasets store it: polygons (flat lists) when no part
    has a hole, else compressed RLE (COCO polygons cannot carry holes). ``polygons``: the mask's polygons when
    already known (pixel corners of the mask)."""
    m = _as_mask(mask)
    polys = mask_to_polygons(m, min_iou=min_iou) if polygons is None else polygons
    if not polys or any(p.get("holes") for p in polys):
        return mask_to_rle(m)
    return polygons_to_segmentation(polys)


# ---- tools: Label Studio polygons, FiftyOne polylines and instance masks ----------------------------------

def polygon_to_ls_points(exterior: Sequence[Sequence[float]], width: float,
                         height: float) -> list[list[float]]:
    """Pixel polygon ring -> Label Studio ``PolygonLabels`` ``points`` (percent of the image)."""
    return [[100.0 * float(x) / width, 100.0 * float(y) / height] for x, y in exterior]


def ls_points_to_polygon(points: Sequence[Sequence[float]], width: float, height: float) -> PolygonDict:
    """Label Studio ``PolygonLabels`` ``points`` (percent) -> a pixel polygon (Label Studio has no holes)."""
    return {"exterior": [[float(x) * width / 100.0, float(y) * height / 100.0] for x, y in points],
            "holes": []}


def polygons_to_fo_points(polygons: Sequence[Mapping], width: float,
                          height: float) -> list[list[list[float]]]:
    """Pixel polygons -> FiftyOne ``Polyline.points`` (relative [0, 1]; use ``closed=True, filled=True``).

    Each exterior and each hole is one shape; a filled polyline fills the area its shapes bound (even-odd), so
    holes stay holes (:func:`fo_points_to_polygons` reads them back that way)."""
    def rel(ring):
        return [[float(x) / width, float(y) / height] for x, y in ring]
    return [rel(r) for p in polygons for r in [p["exterior"], *p.get("holes", [])]]


def fo_points_to_polygons(points: Sequence[Sequence[Sequence[float]]], width: float,
                          height: float) -> list[PolygonDict]:
    """FiftyOne ``Polyline.points`` (relative, filled) -> pixel polygons; shapes combine even-odd, so a shape
    inside another is a hole."""
    shapes = [Polygon([(float(x) * width, float(y) * height) for x, y in s]) for s in points if len(s) >= 3]
    shapes = [shapely.make_valid(s) for s in shapes]
    if not shapes:
        return []
    return [_to_dict(p) for p in _parts(reduce(lambda a, b: a.symmetric_difference(b), shapes))]


def mask_to_fo_instance(mask: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Full-image mask -> FiftyOne ``Detection`` ``(bounding_box, mask)``: the relative ``[x, y, w, h]`` of
    the mask's tight box and the mask cropped to it (FiftyOne stores instance masks within the box)."""
    m = _as_mask(mask)
    x1, y1, x2, y2 = mask_to_box(m)
    if x2 <= x1:
        raise ValueError("an empty mask has no FiftyOne instance box")
    h, w = m.shape
    crop = m[int(y1):int(y2), int(x1):int(x2)].copy()
    return xyxy_to_fo_relative((x1, y1, x2, y2), w, h), crop


def fo_instance_to_mask(bounding_box: Sequence[float], mask: np.ndarray, width: int,
                        height: int) -> np.ndarray:
    """FiftyOne ``Detection`` ``(bounding_box, mask)`` -> full-image boolean mask ``[height, width]``; a crop
    whose size differs from the box's pixels is resized to it (nearest), as FiftyOne does when rendering."""
    crop = _as_mask(mask)
    x1, y1, x2, y2 = fo_relative_to_xyxy(bounding_box, width, height)
    bx, by = int(round(x1)), int(round(y1))
    bw, bh = max(1, int(round(x2 - x1))), max(1, int(round(y2 - y1)))
    if crop.shape != (bh, bw):
        crop = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((bw, bh), Image.NEAREST)) >= 128
    out = np.zeros((int(height), int(width)), bool)
    sx0, sy0 = max(0, -bx), max(0, -by)
    dx0, dy0 = max(0, bx), max(0, by)
    dx1, dy1 = min(int(width), bx + bw), min(int(height), by + bh)
    if dx1 > dx0 and dy1 > dy0:
        out[dy0:dy1, dx0:dx1] = crop[sy0:sy0 + dy1 - dy0, sx0:sx0 + dx1 - dx0]
    return out


# ---- Label Studio: polygons without holes, brush masks in Label Studio's own RLE ------------------------

def keyhole_ring(polygon: Mapping | Sequence | Polygon) -> list[list[float]]:
    """One ring for a polygon with holes (pixel coordinates), for tools whose polygons cannot hold holes
    (Label Studio's ``PolygonLabels``): each hole is joined to the outline by a zero-width cut (the "keyhole"):
    the ring walks the outline to the vertex nearest the hole, into the hole, around it the other way, and
    back along the same cut. The cut's two edges coincide, so every fill rule (even-odd, non-zero: canvas,
    pycocotools) leaves the hole empty and the filled area is the polygon's; only the outline shows the cut.
    A polygon without holes gives its exterior unchanged."""
    rings = _rings(polygon)
    if len(rings[0]) < 3:
        return _ring(rings[0])
    shape = orient(Polygon(rings[0], [r for r in rings[1:] if len(r) >= 3]), 1.0)  # outline CCW, holes CW
    ring = np.asarray(_ring(shape.exterior.coords), np.float64)
    for interior in shape.interiors:
        hole = np.asarray(_ring(interior.coords), np.float64)
        d = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        around = np.concatenate([hole[j:], hole[:j + 1]])  # the hole from vertex j back to it
        ring = np.concatenate([ring[:i + 1], around, ring[i:]])
    return ring.tolist()


# Label Studio's brush RLE (``BrushLabels`` ``value.rle``): thi.ng's ``rle-pack`` over the mask as RGBA bytes,
# row-major, ``width * height * 4`` values. Bit stream (MSB first): 32 bits value count, 5 bits word size - 1,
# 4 x 4 bits run-length field sizes - 1, then chunks: 1 bit repeat flag, 2 bits size index, ``size`` bits
# (chunk length - 1), then one word (repeat) or ``length`` words (literal). The SDK
# (``label_studio_sdk.converter.brush``) encodes with word size 8 and sizes (3, 4, 8, 16).
LS_RLE_SIZES = (3, 4, 8, 16)
LS_RLE_MAX_VALUES = 4 * 64_000_000 * 4  # refuse value counts beyond 4x the default pixel limit, RGBA


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """Boolean mask ``[H, W]`` -> Label Studio brush RLE (a list of byte values), the format
    ``label_studio_sdk.converter.brush.mask2rle(mask * 255)`` writes and the labeling UI reads: each pixel as
    4 bytes, 255 inside the mask, 0 outside; every chunk a repeat."""
    m = _as_mask(mask)
    flat = m.ravel()
    num = flat.size * 4
    header = f"{num:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in LS_RLE_SIZES)
    bits = [header]
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [flat.size]])) * 4
        for start, length in zip(starts.tolist(), lengths.tolist()):
            word = "11111111" if flat[start] else "00000000"
            while length > 0:
                n = min(length, 1 << 16)
                k = next(k for k, s in enumerate(LS_RLE_SIZES) if n <= 1 << s)
                bits.append(f"1{k:02b}{n - 1:0{LS_RLE_SIZES[k]}b}{word}")
                length -= n
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return np.packbits(np.frombuffer(stream.encode("ascii"), np.uint8) - 48).tolist()


def ls_rle_to_mask(rle: Any, width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE (list of byte values) of a ``width`` x ``height`` image -> boolean mask: a pixel
    is in when its alpha byte (the 4th of its RGBA values) is non-zero, as Label Studio draws it. Raises
    ``ValueError`` for anything that does not decode to exactly ``width * height * 4`` values."""
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise ValueError(f"a brush mask needs a positive image size, got {w}x{h}")
    if not isinstance(rle, (list, tuple)) or not rle:
        raise ValueError(f"brush 'rle' must be a non-empty list of byte values, got {type(rle).__name__}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in rle):
        raise ValueError("brush 'rle' must hold integers 0..255 only")
    bits = np.unpackbits(np.asarray(rle, np.uint8))
    total = len(bits)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > total:
            raise ValueError("brush RLE ends in the middle of a chunk (truncated or corrupt)")
        chunk = bits[pos:pos + n]
        pos += n
        return int("".join("01"[b] for b in chunk), 2) if n else 0

    num = read(32)
    if num != w * h * 4:
        raise ValueError(f"brush RLE holds {num:,} values; a {w}x{h} image needs {w * h * 4:,} (RGBA): the mask "
                         "was drawn on an image of another size")
    if num > LS_RLE_MAX_VALUES:
        raise ValueError(f"brush RLE of {num:,} values is larger than this backend accepts")
    word = read(5) + 1
    if word > 16:
        raise ValueError(f"brush RLE word size {word} is not supported (Label Studio writes 8)")
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint16)
    i = 0
    weights = 1 << np.arange(word - 1, -1, -1, dtype=np.int64)
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError("brush RLE runs past the image's pixels (corrupt)")
        if repeat:
            out[i:j] = read(word)
        else:
            n = j - i
            if pos + n * word > total:
                raise ValueError("brush RLE ends in the middle of a chunk (truncated or corrupt)")
            out[i:j] = (bits[pos:pos + n * word].reshape(n, word).astype(np.int64) * weights).sum(1)
            pos += n * word
        i = j
    return out.reshape(h, w, 4)[:, :, 3] > 0
