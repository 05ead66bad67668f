"""Procedural grounded scenes: coloured shapes over varied backgrounds, deterministic by seed.

A :class:`Scene` is pure geometry (no pixels), so expressions, captions and traces can be derived and
verified without rendering; :func:`render_scene` draws it. Each shape is drawn at 2x into a small patch
and box-downsampled (anti-aliased, exact sub-pixel geometry) and pasted over a background made at 1x.

Object boxes are the *amodal* bounding boxes of the shapes (xyxy, pixels). Occlusion is kept partial:
an object overlaps another by at most ``SceneConfig.max_overlap`` of the smaller box.

Instance masks (:func:`object_mask`, :func:`scene_masks`) come from the very patch the render pastes (same
drawing code, same 2x supersampling), kept where more than half covered, so they are aligned with the pixels:
a mask pixel is one whose colour is more the object's than what lies under it. They are amodal like the boxes
(``visible=True`` removes what later objects cover); the ring keeps its hole.
"""

from __future__ import annotations

import colorsys
import math
import random
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")
# drawable, but never in the default vocabulary: new concepts for fine-tuning experiments, and unknown words
# for the box-score calibration (``scripts/calibrate_scores.py --unknown-shapes``)
EXTRA_SHAPES: tuple[str, ...] = ("pentagon", "octagon", "trapezoid", "arrow")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 215, 30),
    "purple": (140, 60, 180), "orange": (250, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ORDINALS: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottom-most")
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes", "checker", "dots")
VARIED_BACKGROUNDS: tuple[str, ...] = BACKGROUNDS + ("photo", "texture")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
LOOKS: tuple[str, ...] = ("classic", "varied")


@dataclass(frozen=True)
class SceneConfig:
    """What scenes look like. ``extra_shapes`` adds shapes (e.g. ``("pentagon",)``) to the pool."""

    shapes: tuple[str, ...] = SHAPES
    extra_shapes: tuple[str, ...] = ()
    colors: tuple[str, ...] = tuple(COLORS)
    min_side: int = 128  # image sides are drawn from [min_side, max_side]
    max_side: int = 512
    min_aspect: float = 0.6  # shorter / longer side
    min_objects: int = 2
    max_objects: int = 6
    small_range: tuple[float, float] = (0.10, 0.17)  # object side as a fraction of the shorter image side
    large_range: tuple[float, float] = (0.23, 0.35)
    max_overlap: float = 0.25  # intersection / smaller box area, for any pair
    duplicate_prob: float = 0.5  # a new object copies attributes of an earlier one (distractors)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    # Domain randomisation (all off in the classic look; :meth:`varied` turns them on):
    rotate_prob: float = 0.0  # an object is turned by a uniform angle; the others keep the canonical pose
    outline_prob: float = 0.0  # an object is drawn as its outline only (its mask is still the whole shape)
    proportion_jitter: bool = False  # star points and inner radius, cross and ring strokes, aspect
    effects: bool = False  # lighting, contrast, colour cast, blur, noise, JPEG, anti-aliasing (``Look``)
    fixed_rotation: float | None = None  # every object turned by exactly this angle (the rotation sweep)

    @property
    def varied(self) -> bool:
        return bool(self.rotate_prob or self.outline_prob or self.proportion_jitter or self.effects
                    or self.fixed_rotation is not None)

    @classmethod
    def preset(cls, look: str = "classic", **overrides) -> SceneConfig:
        """``"classic"``: one pose and style per shape (the scenes the first models were trained on);
        ``"varied"``: domain randomisation (see ``docs/training.md``)."""
        if look == "classic":
            return cls(**overrides)
        if look != "varied":
            raise ValueError(f"unknown look {look!r}; use one of {LOOKS}")
        return cls(**({"min_side": 112, "max_side": 640, "min_aspect": 0.45, "max_overlap": 0.35,
                       "backgrounds": VARIED_BACKGROUNDS, "rotate_prob": 0.7, "outline_prob": 0.15,
                       "proportion_jitter": True, "effects": True} | overrides))

    @property
    def shape_pool(self) -> tuple[str, ...]:
        return tuple(self.shapes) + tuple(s for s in self.extra_shapes if s not in self.shapes)


@dataclass(frozen=True)
class SceneObject:
    index: int  # draw order: later objects occlude earlier ones
    shape: str
    color: str
    size: str  # "small" | "large"
    box: Box  # amodal xyxy pixels
    rgb: tuple[int, int, int]  # jittered fill colour
    # Varied scenes only (``pose`` None: the classic drawing, the shape stretched to fill ``box``):
    pose: Pose | None = None

    @cached_property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Pose:
    """How a varied object is drawn: the shape at ``center``, ``extent`` (w, h) before it is turned by
    ``rotation`` degrees (clockwise on screen), with its proportions and style."""

    center: tuple[float, float]
    extent: tuple[float, float]
    rotation: float = 0.0
    detail: float = 0.0  # star: inner radius; cross: arm width; ring: stroke (fractions of the extent)
    points: int = 5  # star points
    outline: float = 0.0  # > 0: drawn as an outline this wide (fraction of the shorter extent)
    shading: float = 0.0  # fill brightness change across the object (-: darker at the bottom right)


@dataclass(frozen=True)
class Look:
    """Image-level effects of a varied scene (applied after the objects are drawn)."""

    supersample: int = 2  # 1: aliased edges, 2 or 4: anti-aliased
    brightness: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: float = 0.0  # Gaussian radius, pixels
    noise: float = 0.0  # Gaussian sigma, grey levels
    jpeg: int = 0  # re-encoded at this quality (0: not)


@dataclass(frozen=True)
class Background:
    kind: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    angle: float  # gradient / stripe direction (radians)
    period: float  # stripe / checker / dot period in pixels
    texture_seed: int


@dataclass(frozen=True)
class Scene:
    seed: int
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)
    look: Look | None = None  # varied scenes only

    def fingerprint(self) -> tuple:
        """A content key (used to check that splits share no scene)."""
        return (self.width, self.height, tuple((o.shape, o.color, o.size, tuple(round(v, 2) for v in o.box))
                                              for o in self.objects))


def scene_seed(seed: int, split: str, index: int) -> int:
    """Seed of scene ``index`` of ``split``; distinct splits draw from independent streams."""
    code = SPLIT_CODES.get(split)
    if code is None:
        code = 1000 + zlib.crc32(split.encode())
    return int(np.random.SeedSequence([int(seed), code, int(index)]).generate_state(1, np.uint64)[0])


# ---- sampling --------------------------------------------------------------------------------------

def _overlap_ok(box: Box, others: list[Box], max_overlap: float) -> bool:
    area = (box[2] - box[0]) * (box[3] - box[1])
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw <= 0 or ih <= 0:
            continue
        smaller = min(area, (o[2] - o[0]) * (o[3] - o[1]))
        if iw * ih > max_overlap * smaller:
            return False
    return True


def _sample_background(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two muted colours (low saturation, mid value) so every object colour stays visible."""
    h = rng.random()
    s = rng.uniform(0.0, 0.3)
    v = rng.uniform(0.35, 0.72)
    c1 = colorsys.hsv_to_rgb(h, s, v)
    h2 = (h + rng.uniform(-0.15, 0.15)) % 1.0
    v2 = min(0.8, max(0.3, v + rng.choice((-1, 1)) * rng.uniform(0.08, 0.2)))
    c2 = colorsys.hsv_to_rgb(h2, rng.uniform(0.0, 0.3), v2)
    return tuple(int(255 * c) for c in c1), tuple(int(255 * c) for c in c2)  # type: ignore[return-value]


def generate_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """Sample a scene (geometry and attributes only) from ``seed``."""
    cfg = config or SceneConfig()
    rng = random.Random(seed)
    longer = rng.randint(cfg.min_side, cfg.max_side)
    shorter = max(cfg.min_side, round(longer * rng.uniform(cfg.min_aspect, 1.0)))
    width, height = (longer, shorter) if rng.random() < 0.5 else (shorter, longer)
    side = min(width, height)
    background = Background(rng.choice(cfg.backgrounds), _sample_background(rng), rng.uniform(0, math.pi),
                            rng.uniform(8, 40), rng.getrandbits(32))
    pool = cfg.shape_pool
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    objects: list[SceneObject] = []
    boxes: list[Box] = []
    for _ in range(n * 6):
        if len(objects) >= n:
            break
        if objects and rng.random() < cfg.duplicate_prob:
            ref = rng.choice(objects)
            keep = rng.sample(("shape", "color", "size"), rng.randint(1, 3))
            shape = ref.shape if "shape" in keep else rng.choice(pool)
            color = ref.color if "color" in keep else rng.choice(cfg.colors)
            size = ref.size if "size" in keep else rng.choice(SIZES)
        else:
            shape, color, size = rng.choice(pool), rng.choice(cfg.colors), rng.choice(SIZES)
        lo, hi = cfg.small_range if size == "small" else cfg.large_range
        s = rng.uniform(lo, hi) * side
        if cfg.varied:
            placed = _place_varied(rng, cfg, shape, s, width, height, boxes)
            if placed is None:
                continue
            box, pose = placed
        else:
            aspect = rng.uniform(0.85, 1.18)
            w, h = s * math.sqrt(aspect), s / math.sqrt(aspect)
            for _attempt in range(12):
                x1 = rng.uniform(1, width - w - 1)
                y1 = rng.uniform(1, height - h - 1)
                box = (x1, y1, x1 + w, y1 + h)
                if _overlap_ok(box, boxes, cfg.max_overlap):
                    break
            else:
                continue
            pose = None
        base = COLORS[color]
        rgb = tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in base)
        objects.append(SceneObject(len(objects), shape, color, size, box, rgb, pose))  # type: ignore[arg-type]
        boxes.append(box)
    look = _sample_look(rng) if cfg.effects else None
    return Scene(seed, width, height, background, tuple(objects), look)


# Proportions of varied shapes. The unturned extent's aspect (w / h) keeps "diamond" distinct from "square"
# in every pose: a diamond is a rhombus clearly taller than wide (diagonals 1 : 0.5-0.72, angles of about
# 53-72 degrees), a square has equal sides and right angles, so a square turned 45 degrees stays a square.
ASPECTS: dict[str, tuple[float, float]] = {
    "square": (0.92, 1.08), "diamond": (0.5, 0.72), "circle": (0.85, 1.18), "ring": (0.85, 1.18),
    "hexagon": (0.88, 1.14), "pentagon": (0.88, 1.14), "triangle": (0.8, 1.25), "star": (0.88, 1.14),
    "cross": (0.88, 1.14),
}
DETAILS: dict[str, tuple[float, float]] = {"star": (0.36, 0.55), "cross": (0.26, 0.42), "ring": (0.14, 0.3)}
CANONICAL_DETAIL = {"star": 0.45, "cross": 1 / 3, "ring": 0.22}


def _sample_pose(rng: random.Random, cfg: SceneConfig, shape: str, s: float) -> Pose:
    lo, hi = ASPECTS.get(shape, (0.85, 1.18)) if cfg.proportion_jitter else (1.0, 1.0)
    if shape == "diamond" and not cfg.proportion_jitter:
        lo, hi = 0.62, 0.62
    aspect = rng.uniform(lo, hi)
    rotation = rng.uniform(0.0, 360.0) if rng.random() < cfg.rotate_prob else 0.0
    if cfg.fixed_rotation is not None:
        rotation = cfg.fixed_rotation
    if cfg.proportion_jitter and shape in DETAILS:
        detail = rng.uniform(*DETAILS[shape])
    else:
        detail = CANONICAL_DETAIL.get(shape, 0.0)
    points = rng.choice((5, 5, 6)) if cfg.proportion_jitter and shape == "star" else 5
    # a circle drawn as its outline would be a ring: circles are always filled
    outline = rng.uniform(0.1, 0.2) if rng.random() < cfg.outline_prob and shape != "circle" else 0.0
    shading = rng.uniform(-0.15, 0.15) if cfg.effects else 0.0
    return Pose((0.0, 0.0), (s * math.sqrt(aspect), s / math.sqrt(aspect)), rotation, detail, points, outline,
                shading)


def _place_varied(rng: random.Random, cfg: SceneConfig, shape: str, s: float, width: int, height: int,
                  boxes: list[Box]) -> tuple[Box, Pose] | None:
    """Pose a varied object and place it: its box is the tight box of the turned shape."""
    pose = _sample_pose(rng, cfg, shape, s)
    x0, y0, x1, y1 = _bounds(shape_polygons(shape, pose))
    if x1 - x0 > width - 2 or y1 - y0 > height - 2:
        return None
    for _attempt in range(12):
        cx = rng.uniform(1 - x0, width - 1 - x1)
        cy = rng.uniform(1 - y0, height - 1 - y1)
        box = (cx + x0, cy + y0, cx + x1, cy + y1)
        if _overlap_ok(box, boxes, cfg.max_overlap):
            return box, Pose((cx, cy), pose.extent, pose.rotation, pose.detail, pose.points, pose.outline,
                             pose.shading)
    return None


def _sample_look(rng: random.Random) -> Look:
    def maybe(p: float, lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) if rng.random() < p else 0.0

    cast = tuple(rng.uniform(0.95, 1.05) for _ in range(3)) if rng.random() < 0.4 else (1.0, 1.0, 1.0)
    return Look(supersample=rng.choice((1, 2, 2, 4)), brightness=rng.uniform(0.86, 1.12),
                contrast=rng.uniform(0.8, 1.15), gamma=rng.uniform(0.85, 1.18), cast=cast,  # type: ignore[arg-type]
                blur=maybe(0.3, 0.4, 1.2), noise=maybe(0.3, 2.0, 9.0),
                jpeg=rng.randint(30, 85) if rng.random() < 0.4 else 0)


# ---- rendering -------------------------------------------------------------------------------------

def _regular(n: int, start: float) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * k / n), math.sin(start + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _fit_unit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Stretch a polygon to fill the unit square exactly (so the object box is tight)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / sx, (y - y0) / sy) for x, y in points]


_t = 1 / 3
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": _fit_unit(_regular(6, 0.0)),
    "pentagon": _fit_unit(_regular(5, -math.pi / 2)),
    "octagon": _fit_unit(_regular(8, math.pi / 8)),
    "trapezoid": [(0.25, 0), (0.75, 0), (1, 1), (0, 1)],
    "arrow": [(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)],
    "star": _fit_unit(_star()),
    "cross": [(_t, 0), (2 * _t, 0), (2 * _t, _t), (1, _t), (1, 2 * _t), (2 * _t, 2 * _t), (2 * _t, 1),
              (_t, 1), (_t, 2 * _t), (0, 2 * _t), (0, _t), (_t, _t)],
}
DRAWABLE = frozenset(POLYGONS) | {"circle", "ring"}


def _unit_polygons(shape: str, detail: float, points: int) -> list[tuple[list[tuple[float, float]], list]]:
    """The shape in a unit box centred on the origin: [(exterior, [holes])]."""
    if shape in ("circle", "ring"):
        outer = [(0.5 * x, 0.5 * y) for x, y in _regular(72, 0.0)]
        if shape == "circle":
            return [(outer, [])]
        r = 0.5 - detail
        return [(outer, [[(r * x, r * y) for x, y in _regular(72, 0.0)]])]
    if shape == "star":
        pts = []
        for k in range(2 * points):
            r = 1.0 if k % 2 == 0 else detail
            a = -math.pi / 2 + math.pi * k / points
            pts.append((r * math.cos(a), r * math.sin(a)))
        unit = _fit_unit(pts)
    elif shape == "cross":
        a, b = 0.5 - detail / 2, 0.5 + detail / 2
        unit = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    else:
        unit = POLYGONS[shape]
    return [([(x - 0.5, y - 0.5) for x, y in unit], [])]


def shape_polygons(shape: str, pose: Pose) -> list[tuple[list[tuple[float, float]], list]]:
    """A posed shape in image pixels: [(exterior, [holes])], each ring a list of (x, y)."""
    if shape not in DRAWABLE:
        raise ValueError(f"unknown shape {shape!r}; drawable shapes are {sorted(DRAWABLE)}")
    w, h = pose.extent
    cos, sin = math.cos(math.radians(pose.rotation)), math.sin(math.radians(pose.rotation))
    cx, cy = pose.center

    def move(ring):
        return [(cx + x * w * cos - y * h * sin, cy + x * w * sin + y * h * cos) for x, y in ring]

    return [(move(ext), [move(hole) for hole in holes])
            for ext, holes in _unit_polygons(shape, pose.detail, pose.points)]


def _bounds(polygons) -> Box:
    xs = [x for ext, _ in polygons for x, _ in ext]
    ys = [y for ext, _ in polygons for _, y in ext]
    return min(xs), min(ys), max(xs), max(ys)


def posed_mask(shape: str, pose: Pose, supersample: int = 2, *, outline: bool = False
               ) -> tuple[Image.Image, int, int]:
    """An ``L`` mask of a posed shape drawn at ``supersample``x and box-downsampled -> (mask, left, top).
    ``outline``: only the band of width ``pose.outline`` inside the shape's edges (its strokes)."""
    polygons = shape_polygons(shape, pose)
    x0, y0, x1, y1 = _bounds(polygons)
    left, top = int(math.floor(x0)), int(math.floor(y0))
    pw, ph = int(math.ceil(x1)) - left + 1, int(math.ceil(y1)) - top + 1
    k = supersample

    def draw_rings(target: Image.Image, rings, inset: float = 0.0) -> None:
        draw = ImageDraw.Draw(target)
        for ext, holes in rings:
            draw.polygon([(k * (x - left), k * (y - top)) for x, y in ext], fill=255)
            for hole in holes:
                draw.polygon([(k * (x - left), k * (y - top)) for x, y in hole], fill=0)

    big = Image.new("L", (k * pw, k * ph), 0)
    if outline and pose.outline > 0:
        from shapely.geometry import Polygon

        stroke = max(1.5, pose.outline * min(pose.extent))
        band = []
        for ext, holes in polygons:
            shape_poly = Polygon(ext, holes)
            inner = shape_poly.buffer(-stroke, join_style=2)
            ring = shape_poly.difference(inner)
            parts = getattr(ring, "geoms", [ring])
            band += [(list(p.exterior.coords), [list(i.coords) for i in p.interiors]) for p in parts if not p.is_empty]
        draw_rings(big, band)
    else:
        draw_rings(big, polygons)
    return (big.reduce(k) if k > 1 else big), left, top


def shape_mask(shape: str, box: Box) -> tuple[Image.Image, int, int]:
    """An anti-aliased ``L`` mask of ``shape`` filling ``box``; returns (mask, left, top) to paste at."""
    if shape not in DRAWABLE:
        raise ValueError(f"unknown shape {shape!r}; drawable shapes are {sorted(DRAWABLE)}")
    left, top = int(math.floor(box[0])), int(math.floor(box[1]))
    pw, ph = int(math.ceil(box[2])) - left + 1, int(math.ceil(box[3])) - top + 1
    big = Image.new("L", (2 * pw, 2 * ph), 0)
    draw = ImageDraw.Draw(big)
    ox, oy = 2 * (box[0] - left), 2 * (box[1] - top)
    w, h = 2 * (box[2] - box[0]), 2 * (box[3] - box[1])
    if shape in ("circle", "ring"):
        draw.ellipse((ox, oy, ox + w, oy + h), fill=255)
        if shape == "ring":
            t = 0.22
            draw.ellipse((ox + t * w, oy + t * h, ox + (1 - t) * w, oy + (1 - t) * h), fill=0)
    else:
        draw.polygon([(ox + x * w, oy + y * h) for x, y in POLYGONS[shape]], fill=255)
    return big.reduce(2), left, top


def _background(scene: Scene) -> Image.Image:
    """Background at 1x: a scalar field t in [0, 1] mapped through a 2-colour palette (fast gather)."""
    bg = scene.background
    w, h = scene.width, scene.height
    if bg.kind == "flat":
        return Image.new("RGB", (w, h), bg.colors[0])
    rng = np.random.default_rng(bg.texture_seed)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    if bg.kind in ("gradient", "stripes"):
        u = xs * math.cos(bg.angle) + ys * math.sin(bg.angle)
        if bg.kind == "gradient":
            lo, hi = float(u.min()), float(u.max())
            t = (u - lo) / max(hi - lo, 1.0)
        else:
            t = 0.5 + 0.5 * np.sin(u * np.float32(2 * math.pi / bg.period))
    elif bg.kind == "checker":
        p = bg.period
        t = (((xs // p).astype(np.int32) + (ys // p).astype(np.int32)) & 1).astype(np.float32)
    elif bg.kind == "dots":
        p = bg.period
        t = (((xs % p) - p / 2) ** 2 + ((ys % p) - p / 2) ** 2 < (p * 0.22) ** 2).astype(np.float32)
    elif bg.kind == "photo":  # several octaves of smooth noise: a blurry, photo-like backdrop
        t = np.zeros((h, w), np.float32)
        for cell, weight in ((64, 0.5), (16, 0.3), (4, 0.2)):
            octave = rng.random((max(2, h // cell + 2), max(2, w // cell + 2)))
            t += weight * np.asarray(Image.fromarray((octave * 255).astype(np.uint8), "L").resize(
                (w, h), Image.BICUBIC), np.float32) / 255.0
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif bg.kind == "texture":  # short strokes in random directions (grass, fabric, scribbles)
        field = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(field)
        for _ in range(int(w * h / max(bg.period, 8) ** 2 * 6)):
            x, y = rng.random() * w, rng.random() * h
            a = bg.angle + rng.normal(0, 0.6)
            length = bg.period * rng.uniform(0.3, 1.0)
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=int(rng.integers(90, 256)),
                      width=int(rng.integers(1, 3)))
        t = np.asarray(field, np.float32) / 255.0
    else:  # noise: smooth low-frequency field plus fine grain
        low = Image.fromarray((rng.random((max(2, h // 32), max(2, w // 32))) * 255).astype(np.uint8), "L")
        t = np.asarray(low.resize((w, h), Image.BICUBIC), np.float32) / 255.0
    index = np.broadcast_to(t * 255.0, (h, w))
    if bg.kind == "noise":
        grain = rng.integers(-40, 41, size=(61, 67), dtype=np.int16)  # a tile: random numbers are costly
        index = index + np.tile(grain, (h // 61 + 1, w // 67 + 1))[:h, :w]
    index = np.clip(index, 0, 255).astype(np.uint8)
    c1 = np.asarray(bg.colors[0], np.float32)
    c2 = np.asarray(bg.colors[1], np.float32)
    palette = (c1 + np.linspace(0, 1, 256, dtype=np.float32)[:, None] * (c2 - c1)).round().astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    return image.convert("RGB")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image of ``scene.width`` x ``scene.height``."""
    canvas = _background(scene)
    for obj in scene.objects:
        if obj.pose is None:
            mask, left, top = shape_mask(obj.shape, obj.box)
            canvas.paste(obj.rgb, (left, top, left + mask.width, top + mask.height), mask)
            continue
        supersample = scene.look.supersample if scene.look else 2
        mask, left, top = posed_mask(obj.shape, obj.pose, supersample, outline=obj.pose.outline > 0)
        canvas.paste(_shaded_fill(obj, mask.size), (left, top, left + mask.width, top + mask.height), mask)
    return apply_look(canvas, scene.look, scene.background.texture_seed) if scene.look else canvas


def _shaded_fill(obj: SceneObject, size: tuple[int, int]) -> Image.Image:
    """The object's colour, brighter towards one corner and darker towards the other by ``pose.shading``."""
    w, h = size
    ramp = (np.arange(w, dtype=np.float32)[None, :] / max(w - 1, 1)
            + np.arange(h, dtype=np.float32)[:, None] / max(h - 1, 1)) / 2 - 0.5
    scale = 1.0 + 2 * obj.pose.shading * ramp if obj.pose else np.ones((h, w), np.float32)
    rgb = np.asarray(obj.rgb, np.float32)[None, None, :] * scale[..., None]
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")


def apply_look(image: Image.Image, look: Look, seed: int) -> Image.Image:
    """Lighting, contrast, colour cast, blur, sensor noise and JPEG artefacts, in that order."""
    from io import BytesIO

    from PIL import ImageFilter

    x = np.asarray(image, np.float32) / 255.0
    x = (x - 0.5) * look.contrast + 0.5
    x = np.clip(x * look.brightness, 0, 1) ** look.gamma
    x = x * np.asarray(look.cast, np.float32)[None, None, :]
    out = Image.fromarray(np.clip(x * 255, 0, 255).round().astype(np.uint8), "RGB")
    if look.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(look.blur))
    if look.noise > 0:
        rng = np.random.default_rng(seed ^ 0x9E3779B9)
        grain = rng.normal(0, look.noise, size=(61, 67, 3)).astype(np.float32)  # a tile, as for backgrounds
        h, w = out.height, out.width
        noisy = np.asarray(out, np.float32) + np.tile(grain, (h // 61 + 1, w // 67 + 1, 1))[:h, :w]
        out = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")
    if look.jpeg:
        buffer = BytesIO()
        out.save(buffer, format="JPEG", quality=look.jpeg)
        out = Image.open(BytesIO(buffer.getvalue())).convert("RGB")
    return out


# ---- instance masks --------------------------------------------------------------------------------

def object_patch_mask(obj: SceneObject) -> tuple[np.ndarray, int, int]:
    """The object's binary mask on its patch: the pixels of the render's anti-aliased patch
    (:func:`shape_mask`) covered more than half (alpha > 128: an exactly half-covered pixel, 2 of its 4
    samples, is out, so a box edge on a pixel boundary does not spill a pixel) -> (mask [ph, pw] bool, left,
    top) to place at."""
    if obj.pose is None:
        patch, left, top = shape_mask(obj.shape, obj.box)
    else:  # the whole shape, also for an object drawn as an outline (a labeller outlines the whole object)
        patch, left, top = posed_mask(obj.shape, obj.pose, 2)
    return np.asarray(patch) > 128, left, top


def place_patch(patch: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(width, left + patch.shape[1]), min(height, top + patch.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def object_mask(scene: Scene, index: int, *, visible: bool = False) -> np.ndarray:
    """Instance mask [height, width] (bool) of object ``index``, aligned with :func:`render_scene`'s pixels.

    Amodal (the whole shape, like the object's box) unless ``visible``: then the pixels that later objects
    cover are removed."""
    obj = scene.objects[index]
    mask = place_patch(*object_patch_mask(obj), scene.width, scene.height)
    if visible:
        for other in scene.objects[index + 1:]:
            mask &= ~place_patch(*object_patch_mask(other), scene.width, scene.height)
    return mask


def scene_masks(scene: Scene, *, visible: bool = False) -> list[np.ndarray]:
    """Instance masks of all objects, in object order (see :func:`object_mask`)."""
    masks = [place_patch(*object_patch_mask(o), scene.width, scene.height) for o in scene.objects]
    if visible:
        covered = np.zeros((scene.height, scene.width), bool)
        for m in reversed(masks):  # later objects are drawn over earlier ones
            amodal = m.copy()
            m &= ~covered
            covered |= amodal
    return masks
