"""A second renderer for the style-shift test split (issue 18): the same scenes, drawn another way.

The training renderer (:mod:`.synthetic`) draws flat-filled PIL polygons (2x supersampled) over flat /
gradient / noise / stripes / checker / dots / photo / texture backgrounds, with ``apply_look`` effects. A model
that only learned *that drawing* fails here; one that learned the shapes does not. This module has its own
geometry (signed distance fields evaluated with numpy at pixel centres; no PIL polygons, no shape code of the
first renderer), its own object styles and its own backgrounds:

* object styles: ``cartoon`` (thick near-black contour, flat fill), ``ink`` (thin dark contour of the same hue,
  marker-stroke fill), ``soft3d`` (radial 3D-ish lighting), ``bevel`` (embossed edges lit from one side),
  ``gradient`` (a linear two-tone fill with a deep-tone contour), ``hatched`` and ``dotted`` (a contour in the
  object's colour around hatch lines or polka dots: sketches whose mask is the whole enclosed region);
* geometry variants: hand-drawn wobble, rounded corners, pixel art (the shape sampled on a coarse block grid
  and drawn as blocks, with a one-block outline and quantised shading);
* drop shadows, deep / pastel variants of each named colour (kept in the colour's family), and lighting
  bounded per colour (white stays near-white, black near-black, yellow and orange never turn olive or brown);
* backgrounds: paper grain, wood bands, bokeh, brick, tiles, linen weave, coarse mosaic; vignette and
  achromatic film grain on the whole image.

Geometry comes from the scene's poses (``generate_scene(seed, SceneConfig.preset("varied"))``); names stay
right: squares, circles, rings and crosses are drawn with equal sides / a round outline / equal arms (sized to
the smaller extent, so they stay inside the first renderer's box), diamonds keep their taller-than-wide
rhombus, circles and rings are always filled (rings keep their hole).

Everything that changes an object's *shape* (wobble, rounding, pixel blocks) is drawn from a seed of the object
itself, so :func:`object_patch_mask` needs only the object; how it is painted and the background come from
``scene.seed``. A mask pixel is one whose centre is inside the shape (the anti-aliased coverage is more than
half), so masks are aligned with the pixels of :func:`render_scene`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .synthetic import CANONICAL_DETAIL, Pose, Scene, SceneObject

__all__ = ["BACKGROUND_KINDS", "OBJECT_STYLES", "object_patch_mask", "render_scene", "restyle"]

OBJECT_STYLES: tuple[str, ...] = ("cartoon", "ink", "soft3d", "bevel", "gradient", "hatched", "dotted")
BACKGROUND_KINDS: tuple[str, ...] = ("paper", "wood", "bokeh", "brick", "tiles", "linen", "mosaic")
SKETCH_STYLES = frozenset({"hatched", "dotted"})  # the fill is not solid (the mask is the enclosed region)
CONVEX = frozenset({"square", "triangle", "hexagon", "pentagon", "diamond"})

# Deep, plain and pastel variants a person still names the same (hues kept in the family: purple never
# drifts to blue, orange never to brown, white stays near-white, black near-black).
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((214, 39, 40), (190, 22, 34), (228, 58, 52), (168, 18, 26), (232, 72, 66)),
    "green": ((44, 160, 44), (28, 124, 48), (76, 180, 70), (36, 142, 60), (96, 190, 84)),
    "blue": ((31, 90, 220), (22, 56, 176), (58, 118, 234), (36, 74, 200), (76, 132, 236)),
    "yellow": ((240, 215, 30), (246, 226, 70), (236, 204, 16), (250, 230, 50), (244, 220, 96)),
    "purple": ((140, 60, 180), (112, 40, 152), (160, 86, 198), (128, 48, 170), (150, 70, 190)),
    "orange": ((250, 130, 20), (240, 112, 12), (252, 148, 46), (236, 124, 28), (250, 140, 60)),
    "white": ((245, 245, 245), (250, 250, 246), (240, 240, 244), (252, 250, 242), (246, 246, 250)),
    "black": ((20, 20, 20), (32, 32, 36), (12, 12, 16), (28, 26, 26), (24, 24, 30)),
}
# How far lighting may take a colour: (darkest: fraction of the colour kept off, lightest: fraction to white)
TONE_LIMITS: dict[str, tuple[float, float]] = {
    "red": (0.30, 0.18), "green": (0.30, 0.20), "blue": (0.30, 0.22), "purple": (0.25, 0.15),
    "yellow": (0.10, 0.12), "orange": (0.12, 0.10), "white": (0.10, 0.0), "black": (0.0, 0.14),
}
INK = np.asarray((24, 24, 28), np.float32)  # the cartoon contour


# ---- per-object geometry ---------------------------------------------------------------------------

def _object_seed(obj: SceneObject, pose: Pose) -> int:
    """A seed of the object itself (not of its box, which :func:`restyle` replaces)."""
    data = struct.pack("<i6di", obj.index, *pose.center, *pose.extent, pose.rotation, pose.detail, pose.points)
    return zlib.crc32(f"{obj.shape}|{obj.color}|{obj.size}".encode() + data)


def _pose_of(obj: SceneObject) -> Pose:
    """The object's pose; a classic object (no pose) gets one from its box."""
    if obj.pose is not None:
        return obj.pose
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    if obj.shape == "diamond":  # a classic box is about square: keep the rhombus taller than wide
        w = min(w, 0.62 * h)
    return Pose(((x0 + x1) / 2, (y0 + y1) / 2), (w, h), 0.0, CANONICAL_DETAIL.get(obj.shape, 0.0), 5)


def _fit_box(points: np.ndarray) -> np.ndarray:
    """Scale a polygon to fill [-0.5, 0.5]^2 exactly."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / (hi - lo)


def _unit_vertices(shape: str, n: int) -> np.ndarray:
    """Convex unit shapes (in [-0.5, 0.5]^2, y down), before aspect and rotation."""
    if shape == "triangle":
        return np.array([(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)])
    if shape in ("square", "rect"):
        return np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)])
    if shape == "diamond":
        return np.array([(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)])
    start = 0.0 if shape == "hexagon" else -math.pi / 2  # hexagon: flat top; pentagon: a point up
    a = start + 2 * math.pi * np.arange(n) / n
    return _fit_box(np.stack([np.cos(a), np.sin(a)], 1))


def _star_frame(points: int, inner: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and size of the bounds of a star with tips at radius 1 (one tip up) and inner radius ``inner``."""
    k = np.arange(2 * points)
    r = np.where(k % 2 == 0, 1.0, inner)
    a = -math.pi / 2 + math.pi * k / points
    pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    lo, hi = pts.min(0), pts.max(0)
    return (lo + hi) / 2, hi - lo


@dataclass(frozen=True)
class Geometry:
    """How this renderer draws one object: its signed distance field (pixels, negative inside) and the
    shape-changing variants (wobble, rounding, pixel blocks), all drawn from the object's own seed."""

    shape: str
    center: tuple[float, float]
    extent: tuple[float, float]  # (w, h) used (squares, circles, rings, crosses: equal)
    rotation: float  # radians, clockwise on screen
    detail: float
    points: int
    bounds: tuple[float, float, float, float]  # of the exact shape (before wobble)
    parts: tuple[np.ndarray, ...]  # convex polygons in image coordinates (squares, crosses, polygons)
    wobble: tuple[tuple[float, float, float, int], ...]  # (amplitude px, frequency, phase, axis 0: x / 1: y)
    rounding: float  # smooth-max radius of convex corners, px
    block: int  # 1, or the pixel-art block side
    thickness: float  # thinnest stroke of the shape (ring stroke, cross arm, star arm), px
    seed: int

    @property
    def size(self) -> float:
        return float(min(self.extent))

    @property
    def margin(self) -> float:
        return sum(abs(a) for a, *_ in self.wobble) + 1.5 + self.block

    def sdf(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Signed distance (pixels) at the points (xs[None, :], ys[:, None]) -> float32 [len(ys), len(xs)]."""
        xs = xs.astype(np.float32)
        ys = ys.astype(np.float32)
        cx, cy = self.center
        if self.shape in ("circle", "ring"):
            radius = self.size / 2
            r = np.sqrt(((xs - cx) ** 2)[None, :] + ((ys - cy) ** 2)[:, None])
            d = r - radius if self.shape == "circle" else np.abs(r - (radius - self.thickness / 2)) - self.thickness / 2
        elif self.shape == "star":
            d = self._star_sdf(xs, ys)
        else:
            d = None
            for part in self.parts:
                p = _convex_sdf(part, xs, ys, self.rounding)
                d = p if d is None else np.minimum(d, p)
        for amp, freq, phase, axis in self.wobble:
            wave = (amp * np.sin(freq * (xs if axis == 0 else ys) + phase)).astype(np.float32)
            d = d + (wave[None, :] if axis == 0 else wave[:, None])
        return d

    def _star_sdf(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Exact distance to a regular star (folded into one sector), mapped through the aspect stretch."""
        w, h = self.extent
        mid, span = _star_frame(self.points, self.detail)
        sx, sy = float(span[0]) / w, float(span[1]) / h  # image px -> star units
        cos, sin = math.cos(self.rotation), math.sin(self.rotation)
        dx, dy = xs - self.center[0], ys - self.center[1]
        # un-rotate (local frame), then un-stretch into the star's own frame
        vx = (cos * sx * dx)[None, :] + (sin * sx * dy)[:, None] + np.float32(mid[0])
        vy = (-sin * sy * dx)[None, :] + (cos * sy * dy)[:, None] + np.float32(mid[1])
        half = math.pi / self.points
        theta = np.arctan2(vx, -vy)  # 0 along the top tip
        folded = np.abs(_frac((theta + half) / (2 * half)) * (2 * half) - half)
        rho = np.hypot(vx, vy)
        qx, qy = rho * np.cos(folded), rho * np.sin(folded)
        ex, ey = self.detail * math.cos(half) - 1.0, self.detail * math.sin(half)  # tip (1, 0) -> inner vertex
        wx, wy = qx - 1.0, qy
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.hypot(wx - ex * t, wy - ey * t)
        inside = (ex * wy - ey * wx) > 0
        return np.where(inside, -dist, dist) / np.float32(math.sqrt(sx * sy))


def _convex_sdf(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray, rounding: float) -> np.ndarray:
    """Max of the edge half-planes (exact inside and along the edges); ``rounding`` > 0: a smooth max,
    which rounds the corners."""
    centroid = vertices.mean(0)
    planes = []
    for a, b in zip(vertices, np.roll(vertices, -1, 0)):
        e = b - a
        n = np.array([e[1], -e[0]]) / math.hypot(*e)
        if n @ (centroid - a) > 0:
            n = -n
        off = float(n @ a)
        planes.append((n[0] * xs - off).astype(np.float32)[None, :] + (n[1] * ys).astype(np.float32)[:, None])
    d = planes[0]
    for p in planes[1:]:
        d = np.maximum(d, p)
    if rounding > 0:
        k = np.float32(rounding)
        acc = np.zeros_like(d)
        for p in planes:
            acc += np.exp((p - d) / k)
        d = d + k * np.log(acc)
    return d


def geometry(obj: SceneObject) -> Geometry:
    """This renderer's geometry of ``obj`` (deterministic: from the object's own pose and seed)."""
    pose = _pose_of(obj)
    seed = _object_seed(obj, pose)
    rng = random.Random(seed)
    shape = obj.shape
    w, h = pose.extent
    if shape in ("square", "circle", "ring", "cross"):  # equal sides, round, equal arms
        w = h = min(w, h)
    rot = math.radians(pose.rotation)
    cos, sin = math.cos(rot), math.sin(rot)
    cx, cy = pose.center

    def place(unit: np.ndarray, sw: float, sh: float) -> np.ndarray:
        x, y = unit[:, 0] * sw, unit[:, 1] * sh
        return np.stack([cx + x * cos - y * sin, cy + x * sin + y * cos], 1)

    size = min(w, h)
    thickness = size
    parts: tuple[np.ndarray, ...] = ()
    detail, points = pose.detail, pose.points
    if shape in ("circle", "ring"):
        bounds = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        if shape == "ring":
            detail = detail or CANONICAL_DETAIL["ring"]
            thickness = detail * size
    elif shape == "star":
        detail = detail or CANONICAL_DETAIL["star"]
        points = points if points in (5, 6) else 5
        k = np.arange(2 * points)
        r = np.where(k % 2 == 0, 1.0, detail)
        a = -math.pi / 2 + math.pi * k / points
        verts = place(_fit_box(np.stack([r * np.cos(a), r * np.sin(a)], 1)), w, h)
        bounds = (*verts.min(0), *verts.max(0))
        thickness = 2 * detail * math.sin(math.pi / points) * size / 2  # the arm at its root
    elif shape == "cross":
        detail = detail or CANONICAL_DETAIL["cross"]
        bar = _unit_vertices("rect", 4)
        parts = (place(bar, w, detail * h), place(bar, detail * w, h))
        both = np.concatenate(parts)
        bounds = (*both.min(0), *both.max(0))
        thickness = detail * size
    else:
        if shape not in CONVEX:
            raise ValueError(f"unknown shape {shape!r}")
        parts = (place(_unit_vertices(shape, 6 if shape == "hexagon" else 5), w, h),)
        bounds = (*parts[0].min(0), *parts[0].max(0))
    bounds = tuple(float(v) for v in bounds)

    variant = rng.random()
    block, wobble, rounding = 1, (), 0.0
    if variant < 0.15 and size >= 60 and thickness >= 15:
        block = int(min(5, max(3, round(size / 22))))
    elif variant < 0.45:  # hand-drawn: a slow, uneven wobble of the edges
        amp = min(0.9, max(0.3, rng.uniform(0.006, 0.01) * size))
        waves = []
        for axis in (0, 1):
            period = rng.uniform(1.0, 1.6) * size
            waves.append((amp, 2 * math.pi / period, rng.uniform(0, 2 * math.pi), axis))
        wobble = tuple(waves)
    elif variant < 0.75 and (shape in CONVEX or shape == "cross"):
        edge = min(float(np.hypot(*(np.roll(p, -1, 0) - p).T).min()) for p in parts)  # the shortest side
        rounding = min(3.5, rng.uniform(0.04, 0.075) * edge)
    return Geometry(shape, (cx, cy), (w, h), rot, detail, points, bounds, parts, wobble, rounding, block,
                    thickness, seed)


def _grid(g: Geometry, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Sample points covering [x0, x1) x [y0, y1): pixel centres, or block centres on the image-aligned
    block grid -> (left, top, xs, ys)."""
    b = g.block
    left, top = math.floor(x0 / b) * b, math.floor(y0 / b) * b
    nx, ny = max(1, math.ceil((x1 - left) / b)), max(1, math.ceil((y1 - top) / b))
    xs = left + b * (np.arange(nx, dtype=np.float64) + 0.5)
    ys = top + b * (np.arange(ny, dtype=np.float64) + 0.5)
    return left, top, xs, ys


def _upscale(a: np.ndarray, b: int) -> np.ndarray:
    """Blocks to pixels along the last two axes."""
    return a if b == 1 else np.repeat(np.repeat(a, b, -2), b, -1)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)  # (np.mod on floats is several times slower)


def object_patch_mask(obj: SceneObject) -> tuple[np.ndarray, int, int]:
    """The object's amodal binary mask as :func:`render_scene` draws it: the pixels whose centre is inside
    the shape (for hatched / dotted objects the whole region their contour encloses; the ring keeps its
    hole) -> (mask bool [ph, pw], left, top), cropped to the mask's bounds."""
    g = geometry(obj)
    m = g.margin
    x0, y0, x1, y1 = g.bounds
    left, top, xs, ys = _grid(g, x0 - m, y0 - m, x1 + m, y1 + m)
    mask = _upscale(g.sdf(xs, ys) < 0, g.block)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros((0, 0), bool), left, top
    mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return np.ascontiguousarray(mask), left + int(cols[0]), top + int(rows[0])


def restyle(scene: Scene) -> Scene:
    """The scene as this renderer draws it: the same objects in the same order, each ``box`` the tight box
    (xyxy pixels, within the image) of its amodal mask; poses, attributes and background kept."""
    objects = []
    for obj in scene.objects:
        mask, left, top = object_patch_mask(obj)
        if mask.size:
            box = (max(0.0, float(left)), max(0.0, float(top)),
                   min(float(scene.width), float(left + mask.shape[1])),
                   min(float(scene.height), float(top + mask.shape[0])))
        else:
            box = obj.box
        objects.append(dataclasses.replace(obj, box=box))
    return dataclasses.replace(scene, objects=tuple(objects))


# ---- painting (colour arrays are channel-first: [3, h, w], float 0-255) -----------------------------

@dataclass(frozen=True)
class Theme:
    """Scene-level choices (from ``scene.seed``): background, light, the favoured object style."""

    background: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    light: tuple[float, float]  # unit vector from the objects towards the light
    style: str
    shadow_prob: float
    vignette: float
    grain: float
    seed: int


def theme(scene: Scene) -> Theme:
    rng = random.Random(scene.seed ^ 0x57A1E5)
    kind = rng.choice(BACKGROUND_KINDS)
    h = rng.random()
    if kind == "wood":
        h, s, v = rng.uniform(0.05, 0.11), rng.uniform(0.15, 0.38), rng.uniform(0.38, 0.6)
    else:
        s, v = rng.uniform(0.0, 0.28), rng.uniform(0.36, 0.68)
    v2 = min(0.72, max(0.3, v + rng.choice((-1, 1)) * rng.uniform(0.06, 0.16)))
    c1 = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))
    c2 = tuple(int(255 * c) for c in colorsys.hsv_to_rgb((h + rng.uniform(-0.06, 0.06)) % 1, s, v2))
    angle = math.radians(rng.choice((-135, -120, -150, -60, -45, -90)))  # from above, mostly the upper left
    style = rng.choice(OBJECT_STYLES + ("cartoon", "ink", "soft3d"))
    return Theme(kind, (c1, c2), (math.cos(angle), math.sin(angle)), style,  # type: ignore[arg-type]
                 rng.choice((0.0, 0.5, 0.9)), rng.choice((0.0, 0.0, rng.uniform(0.08, 0.16))),
                 rng.choice((0.0, 0.0, rng.uniform(1.5, 3.5))), rng.getrandbits(32))


@dataclass(frozen=True)
class ObjectLook:
    style: str  # one of OBJECT_STYLES, or "pixel"
    rgb: tuple[int, int, int]
    shadow: bool
    angle: float  # hatch / gradient / stroke direction (radians)


def object_look(obj: SceneObject, th: Theme, g: Geometry | None = None) -> ObjectLook:
    """How ``obj`` is painted: mostly the scene's favoured style; sketches only where they stay readable
    (never circles or rings: a hatched disc could pass for a ring), pixel art where the geometry has blocks."""
    g = g or geometry(obj)
    rng = random.Random(g.seed ^ th.seed)
    style = th.style if rng.random() < 0.6 else rng.choice(OBJECT_STYLES)
    if style in SKETCH_STYLES and (obj.shape in ("circle", "ring") or g.size < 36 or g.thickness < 9):
        style = "cartoon" if style == "hatched" else "gradient"
    if g.block > 1:
        style = "pixel"
    base = rng.choice(PALETTES.get(obj.color, (obj.rgb,)))
    rgb = tuple(int(min(255, max(0, c + rng.randint(-5, 5)))) for c in base)
    shadow = style == "soft3d" or (style != "pixel" and rng.random() < th.shadow_prob)
    return ObjectLook(style, rgb, shadow, rng.uniform(0, math.pi))  # type: ignore[arg-type]


def _col(rgb) -> np.ndarray:
    return np.asarray(rgb, np.float32)[:, None, None]


def _tone(rgb: np.ndarray, t: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """The colour (``_col``) lit by t in [-1, 1] (negative: darker, positive: towards white), within
    ``limits`` -> [3, h, w]."""
    dark, light = limits
    out = rgb * (1.0 + dark * np.minimum(t, 0.0))[None]
    if light:
        out += (255.0 - out) * (light * np.maximum(t, 0.0))[None]
    return out


def _edge_line(out: np.ndarray, sdf: np.ndarray, width: float, rgb: np.ndarray) -> np.ndarray:
    """A contour ``width`` px wide just inside the edge (anti-aliased on its inner side)."""
    k = np.clip(sdf + (width + 0.5), 0.0, 1.0)[None]
    return out + (rgb - out) * k


def _dark_of(rgb: np.ndarray, color: str) -> np.ndarray:
    if color == "black":
        return rgb
    if color == "white":
        return _col((92, 92, 96))
    return rgb * 0.42


def _paint(g: Geometry, look: ObjectLook, color: str, th: Theme, sdf: np.ndarray, xs: np.ndarray,
           ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rgb [3, h, w], alpha [h, w]) of the object on its sample grid."""
    rgb = _col(look.rgb)
    limits = TONE_LIMITS.get(color, (0.25, 0.15))
    size, thick = g.size, g.thickness
    cx, cy = g.center
    lx, ly = th.light
    xs = xs.astype(np.float32)
    ys = ys.astype(np.float32)
    if look.style == "pixel":  # quantised light, a one-block dark outline
        inside = sdf < 0
        pad = np.pad(inside, 1)
        edge = inside & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
        facing = ((xs - cx) * lx)[None, :] + ((ys - cy) * ly)[:, None]
        t = np.where(facing > 0.2 * size, 0.45, np.where(facing < -0.2 * size, -0.45, 0.0)).astype(np.float32)
        out = _tone(rgb, t, limits)
        line = _col((8, 8, 10)) if color == "black" else _dark_of(rgb, color)
        out = np.where(edge[None], line, out)
        return out, inside.astype(np.float32)
    cover = np.clip(0.5 - sdf, 0.0, 1.0)
    radius = max(g.extent) / 2
    style = look.style
    if style == "cartoon":  # flat fill, thick near-black contour
        out = np.broadcast_to(rgb, (3, *sdf.shape))
        cw = min(max(1.5, 0.08 * size), 5.0, 0.15 * thick)
        return (_edge_line(out, sdf, cw, INK[:, None, None]) if cw >= 0.9 else out), cover
    if style == "ink":  # marker strokes, a thin contour of the same hue
        phase = (xs * math.cos(look.angle))[None, :] + (ys * math.sin(look.angle))[:, None]
        t = 0.22 * np.sin(phase * np.float32(2 * math.pi / max(4.0, 0.12 * size)))
        out = _tone(rgb, t, limits)
        cw = min(max(1.0, 0.035 * size), 2.2, 0.15 * thick)
        return (_edge_line(out, sdf, cw, _dark_of(rgb, color)) if cw >= 0.7 else out), cover
    if style == "soft3d":  # a lit sphere-like fill
        hx, hy = cx + 0.45 * radius * lx, cy + 0.45 * radius * ly
        scale = np.float32(1 / (1.35 * radius) ** 2)
        dist = np.sqrt((((xs - hx) ** 2) * scale)[None, :] + (((ys - hy) ** 2) * scale)[:, None])
        return _tone(rgb, 1.0 - 2.0 * np.minimum(dist, 1.0), limits), cover
    if style == "bevel":  # embossed edges lit from one side
        if min(sdf.shape) < 2:
            return np.broadcast_to(rgb, (3, *sdf.shape)), cover
        gy, gx = np.gradient(sdf)
        facing = (gx * lx + gy * ly) / (np.sqrt(gx * gx + gy * gy) + 1e-6)
        bw = min(max(2.0, 0.12 * size), 0.4 * thick + 0.5)
        weight = np.clip(1.0 + sdf / bw, 0.0, 1.0)
        t = np.clip(facing * weight * 1.1, -1.0, 1.0) + 0.15 * (1 - weight)
        return _tone(rgb, t, limits), cover
    if style == "gradient":  # linear two-tone fill, a deep-tone contour
        c, s = math.cos(look.angle) / radius, math.sin(look.angle) / radius
        t = ((xs - cx) * c)[None, :] + ((ys - cy) * s)[:, None]
        out = _tone(rgb, np.clip(t, -1.0, 1.0) * 0.85, limits)
        cw = min(max(1.0, 0.04 * size), 2.5, 0.15 * thick)
        deep = _tone(rgb, np.full((1, 1), -1.0, np.float32), limits)
        return (_edge_line(out, sdf, cw, deep) if cw >= 0.7 else out), cover
    # sketches: a contour in the object's colour around hatch lines or polka dots
    out = np.broadcast_to(rgb, (3, *sdf.shape))
    contour = np.clip(sdf + (min(max(1.5, 0.07 * size), 4.0) + 0.5), 0.0, 1.0)
    if style == "hatched":
        period = min(9.0, max(4.5, 0.16 * size))
        c, s = math.cos(look.angle) / period, math.sin(look.angle) / period
        u = np.abs(_frac((xs * c)[None, :] + (ys * s)[:, None]) - 0.5) * period
        pattern = np.clip(0.28 * period - u + 0.5, 0.0, 1.0)
    else:
        period = min(11.0, max(5.0, 0.18 * size))
        fx = ((_frac((xs - cx) / period) - 0.5) * period) ** 2
        fy = ((_frac((ys - cy) / period) - 0.5) * period) ** 2
        pattern = np.clip(0.3 * period - np.sqrt(fx[None, :] + fy[:, None]) + 0.5, 0.0, 1.0)
    return out, cover * np.maximum(pattern, contour)


def _shadow_alpha(sdf: np.ndarray, dx: int, dy: int, soft: float, strength: float) -> np.ndarray:
    """The object's silhouette moved by (dx, dy) samples, soft-edged, times ``strength``."""
    h, w = sdf.shape
    shifted = np.full_like(sdf, 1e4)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    shifted[yd, xd] = sdf[ys, xs]
    return np.clip(strength * 0.5 - shifted * (strength / soft), 0.0, strength)


def _draw_object(canvas: np.ndarray, obj: SceneObject, th: Theme) -> None:
    g = geometry(obj)
    look = object_look(obj, th, g)
    height, width = canvas.shape[1:]
    x0, y0, x1, y1 = g.bounds
    m = g.margin
    sx = sy = 0
    soft = 1.0
    if look.shadow:  # cast away from the light
        dist = 1.0 + 0.07 * g.size
        soft = 1.0 + 0.1 * g.size
        sx, sy = -round(dist * th.light[0] / g.block), -round(dist * th.light[1] / g.block)
        m += g.block * max(abs(sx), abs(sy)) + soft
    left, top, xs, ys = _grid(g, max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, width), min(y1 + m, height))
    sdf = g.sdf(xs, ys)
    b = g.block
    cut_h, cut_w = min(len(ys) * b, height - top), min(len(xs) * b, width - left)
    if cut_h <= 0 or cut_w <= 0:
        return
    region = canvas[:, top:top + cut_h, left:left + cut_w]
    if look.shadow and (sx or sy):
        shade = _upscale(_shadow_alpha(sdf, sx, sy, soft / b, 0.42), b)[:cut_h, :cut_w]
        region *= 1.0 - shade
    rgb, alpha = _paint(g, look, obj.color, th, sdf, xs, ys)
    rgb, alpha = _upscale(rgb, b)[:, :cut_h, :cut_w], _upscale(alpha, b)[:cut_h, :cut_w]
    region += (rgb - region) * alpha


# ---- backgrounds -----------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Smooth noise in [0, 1] with features of about ``cell`` px (a small random grid, resized bicubic)."""
    gh, gw = max(2, int(h / cell_y) + 2), max(2, int(w / cell_x) + 2)
    small = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8), "L")
    return np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) * np.float32(1 / 255)


def _tile_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    tile = rng.normal(0, sigma, size=(53, 59)).astype(np.float32)
    return np.tile(tile, (h // 53 + 1, w // 59 + 1))[:h, :w]


def _mix(t: np.ndarray, c1, c2) -> np.ndarray:
    """[3, h, w]: c1 where t is 0, c2 where t is 1."""
    a, b = _col(c1), _col(c2)
    return a + np.clip(t, 0.0, 1.0)[None] * (b - a)


def background(scene: Scene, th: Theme) -> np.ndarray:
    """The background, float32 [3, h, w] in 0-255 (kinds the training renderer never draws)."""
    w, h = scene.width, scene.height
    rng = np.random.default_rng(th.seed)
    c1, c2 = th.colors
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    kind = th.background
    if kind == "paper":  # blotchy tone, fibres along one direction, fine grain
        fibres = _smooth_noise(rng, h, w, 2.0, 60.0) if rng.random() < 0.5 else _smooth_noise(rng, h, w, 60.0, 2.0)
        t = 0.55 * _smooth_noise(rng, h, w, 90.0, 90.0) + 0.3 * fibres + _tile_noise(rng, h, w, 0.05)
        img = _mix(t, c1, c2)
    elif kind == "wood":  # warped growth bands with darker late wood
        ang = rng.uniform(-0.3, 0.3) + (0.0 if rng.random() < 0.5 else math.pi / 2)
        period = rng.uniform(14, 30)
        bend = rng.uniform(0.6, 1.6) / max(w, h)
        u = xs * math.cos(ang) - w / 2 * math.cos(ang)
        across = (-xs * math.sin(ang) / period)[None, :] + (ys * math.cos(ang) / period)[:, None]
        along = (bend * u * u / period).astype(np.float32)  # a slow curve of the bands (mostly along x)
        warp = _smooth_noise(rng, h, w, 80.0, 80.0) * np.float32(14.0 / period)
        phase = _frac(across + along[None, :] + warp)
        t = phase * phase * phase * 0.8 + 0.2 * _smooth_noise(rng, h, w, 3.0, 40.0)
        img = _mix(t, c1, c2)
    elif kind == "bokeh":  # soft out-of-focus light discs over a vertical wash
        t = (ys / max(h - 1, 1))[:, None] + 0.15 * _smooth_noise(rng, h, w, 120.0, 120.0)
        img = _mix(t, c1, c2)
        light = _col(c2) * 0.5 + 110
        side = min(w, h)
        for _ in range(int(rng.integers(10, 26))):
            r = rng.uniform(0.03, 0.11) * side
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            bx0, bx1 = max(0, int(cx - r - 2)), min(w, int(cx + r + 3))
            by0, by1 = max(0, int(cy - r - 2)), min(h, int(cy + r + 3))
            if bx1 <= bx0 or by1 <= by0:
                continue
            d = np.sqrt(((xs[bx0:bx1] - cx) ** 2)[None, :] + ((ys[by0:by1] - cy) ** 2)[:, None])
            a = rng.uniform(0.06, 0.16) * np.clip((r - d) / (0.45 * r), 0, 1)
            patch = img[:, by0:by1, bx0:bx1]
            patch += (light - patch) * a[None]
    elif kind in ("brick", "tiles"):  # cells of varied tone between mortar lines
        if kind == "brick":
            ch = rng.uniform(12, 26)
            cw = ch * rng.uniform(2.0, 2.6)
            offsets = (0.0, cw / 2)  # every other course is shifted by half a brick
        else:
            ch = cw = rng.uniform(18, 46)
            offsets = (0.0, 0.0)
        line = 2.0 if kind == "brick" else 2.5
        row = np.floor(ys / ch).astype(np.int64)
        shades = rng.uniform(0.15, 0.55, size=(len(np.unique(row)) + 1, int(w / cw) + 3)).astype(np.float32)
        t = np.empty((h, w), np.float32)
        joint = np.empty((h, w), bool)
        for parity, off in enumerate(offsets):
            rows = np.flatnonzero(row % 2 == parity)
            col = np.floor((xs + off) / cw).astype(np.int64)
            t[rows] = shades[row[rows][:, None], col[None, :]]
            joint[rows] = (_frac((xs + off) / cw) * cw < line)[None, :]
        joint |= (_frac(ys / ch) * ch < line)[:, None]
        t += 0.12 * _smooth_noise(rng, h, w, 6.0, 6.0)
        t[joint] = 0.95 if rng.random() < 0.5 else -0.1
        img = _mix(t, c1, c2)
    elif kind == "linen":  # a fine woven cross texture
        p = rng.uniform(3.0, 5.0)
        warp = np.sin(xs * np.float32(2 * math.pi / p)) * 0.15 + 0.15
        weft = np.sin(ys * np.float32(2 * math.pi / p)) * 0.15 + 0.15
        t = warp[None, :] + weft[:, None] + 0.4 * _smooth_noise(rng, h, w, 70.0, 70.0) + _tile_noise(rng, h, w, 0.03)
        img = _mix(t, c1, c2)
    else:  # mosaic: coarse blocks of a few tones
        p = int(rng.integers(8, 18))
        levels = (np.floor(rng.random((h // p + 1, w // p + 1)) * 4) / 3).astype(np.float32)
        img = _mix(_upscale(levels, p)[:h, :w], c1, c2)
    return np.ascontiguousarray(img, np.float32)


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` (RGB, ``scene.width`` x ``scene.height``) in this renderer's styles; deterministic."""
    th = theme(scene)
    canvas = background(scene, th)
    for obj in scene.objects:
        _draw_object(canvas, obj, th)
    h, w = canvas.shape[1:]
    if th.vignette:
        u = ((np.arange(w, dtype=np.float32) - w / 2) / (w / 2)) ** 2
        v = ((np.arange(h, dtype=np.float32) - h / 2) / (h / 2)) ** 2
        canvas *= (1.0 - th.vignette * 0.5 * (u[None, :] + v[:, None]))[None]
    if th.grain:
        canvas += _tile_noise(np.random.default_rng(th.seed ^ 0xBEEF), h, w, th.grain)[None]
    canvas += 0.5
    np.clip(canvas, 0, 255, out=canvas)
    return Image.merge("RGB", [Image.fromarray(c) for c in canvas.astype(np.uint8)])
