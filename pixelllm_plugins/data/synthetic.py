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
EXTRA_SHAPES: tuple[str, ...] = ("pentagon",)  # drawable, but not in the default vocabulary
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 215, 30),
    "purple": (140, 60, 180), "orange": (250, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ORDINALS: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottom-most")
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "stripes", "checker", "dots")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


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

    @cached_property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size}


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
        base = COLORS[color]
        rgb = tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in base)
        objects.append(SceneObject(len(objects), shape, color, size, box, rgb))  # type: ignore[arg-type]
        boxes.append(box)
    return Scene(seed, width, height, background, tuple(objects))


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
    "star": _fit_unit(_star()),
    "cross": [(_t, 0), (2 * _t, 0), (2 * _t, _t), (1, _t), (1, 2 * _t), (2 * _t, 2 * _t), (2 * _t, 1),
              (_t, 1), (_t, 2 * _t), (0, 2 * _t), (0, _t), (_t, _t)],
}
DRAWABLE = frozenset(POLYGONS) | {"circle", "ring"}


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
        mask, left, top = shape_mask(obj.shape, obj.box)
        canvas.paste(obj.rgb, (left, top, left + mask.width, top + mask.height), mask)
    return canvas


# ---- instance masks --------------------------------------------------------------------------------

def object_patch_mask(obj: SceneObject) -> tuple[np.ndarray, int, int]:
    """The object's binary mask on its patch: the pixels of the render's anti-aliased patch
    (:func:`shape_mask`) covered more than half (alpha > 128: an exactly half-covered pixel, 2 of its 4
    samples, is out, so a box edge on a pixel boundary does not spill a pixel) -> (mask [ph, pw] bool, left,
    top) to place at."""
    patch, left, top = shape_mask(obj.shape, obj.box)
    return np.asarray(patch) > 128, left, top


def _place(patch: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
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
    mask = _place(*object_patch_mask(obj), scene.width, scene.height)
    if visible:
        for other in scene.objects[index + 1:]:
            mask &= ~_place(*object_patch_mask(other), scene.width, scene.height)
    return mask


def scene_masks(scene: Scene, *, visible: bool = False) -> list[np.ndarray]:
    """Instance masks of all objects, in object order (see :func:`object_mask`)."""
    masks = [_place(*object_patch_mask(o), scene.width, scene.height) for o in scene.objects]
    if visible:
        covered = np.zeros((scene.height, scene.width), bool)
        for m in reversed(masks):  # later objects are drawn over earlier ones
            amodal = m.copy()
            m &= ~covered
            covered |= amodal
    return masks
