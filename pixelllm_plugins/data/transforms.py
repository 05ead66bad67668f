"""Image + box transforms (spec 5.4): resize the longer side to S*U(a,b), random S crop, pad to S.

Every box of a sample (prompt boxes, target boxes, LN utterance boxes, gt boxes) goes through the same
affine map as the pixels; a prompt's ``target_mask`` goes through the same flip, resize (bilinear, then half
coverage) and crop as the pixels, into the un-padded canvas image's frame. A crop drops a whole prompt
(context, text, boxes and mask together) whose target keeps less than ``min_visible`` of its area; contexts
are built from the surviving prompts only, so the upstream context/box desync (spec section 8) cannot
happen. Randomness comes only from the generator (masks draw none).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import VisionConfig
from ..inference.preprocess import normalise_and_pad, resize_longer_side
from ..masks import mask_to_rle, rle_to_mask
from .types import AnnotationWarning, Box, GroundedSample, PromptRecord


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (1.0, 1.0)  # longer side -> S * U(a, b)
    hflip: float = 0.0  # probability; samples whose text says left/right are never flipped
    min_visible: float = 0.5  # keep a target (and its prompt) only if this share of its area survives
    max_tries: int = 10  # crops that would drop every prompt are re-drawn, then the eval transform is used


# spec 5.4 ranges; VG's (0.1, 2.0) is narrowed for small synthetic objects
TASK_AUGMENT: dict[str, AugmentConfig] = {
    "refer": AugmentConfig(scale=(0.75, 1.25)),
    "trace": AugmentConfig(),
    "region": AugmentConfig(scale=(0.5, 1.5), hflip=0.5),
    "caption": AugmentConfig(scale=(0.75, 1.25)),
}


@dataclass
class TransformedSample:
    """A sample on the model canvas. Boxes are canvas pixels; ``utterance_boxes_rel`` are relative to the
    un-padded image; ``canvas = original * scale - offset``."""

    pixel_values: torch.Tensor  # [3,S,S] float32, normalised, zero padding
    image_size: tuple[float, float]  # (w, h) of the un-padded image on the canvas
    prompts: list[PromptRecord]
    gt_boxes: list[Box]
    original_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]
    image_id: str = ""
    source: str = ""
    flipped: bool = False  # horizontally, before scaling

    def to_original(self, box: Box) -> Box:
        """Canvas pixels -> original image pixels."""
        sx, sy = self.scale
        ox, oy = self.offset
        x1, y1, x2, y2 = (box[0] + ox) / sx, (box[1] + oy) / sy, (box[2] + ox) / sx, (box[3] + oy) / sy
        if self.flipped:
            W = self.original_size[0]
            x1, x2 = W - x2, W - x1
        return (x1, y1, x2, y2)


class _Rng:
    """Uniform draws from a torch or numpy generator (or torch's global one)."""

    def __init__(self, generator: torch.Generator | np.random.Generator | None):
        self.g = generator

    def uniform(self, a: float, b: float) -> float:
        if isinstance(self.g, np.random.Generator):
            u = float(self.g.random())
        else:
            u = float(torch.rand((), generator=self.g))
        return a + (b - a) * u

    def randint(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        if hi <= lo:
            return lo
        if isinstance(self.g, np.random.Generator):
            return int(self.g.integers(lo, hi + 1))
        return int(torch.randint(lo, hi + 1, (), generator=self.g))


def _map(box: Box | None, sx: float, sy: float, ox: float, oy: float) -> Box | None:
    if box is None:
        return None
    return (box[0] * sx - ox, box[1] * sy - oy, box[2] * sx - ox, box[3] * sy - oy)


def _clip(box: Box, w: float, h: float) -> Box:
    return (min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h))


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _visible(box: Box, w: float, h: float, min_visible: float) -> Box | None:
    clipped = _clip(box, w, h)
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        return None
    return clipped if _area(clipped) >= min_visible * _area(box) - 1e-6 else None


def _flip(box: Box | None, width: float) -> Box | None:
    return None if box is None else (width - box[2], box[1], width - box[0], box[3])


def _geometry(sample: GroundedSample, prompts: list[PromptRecord], gt: list[Box], W: int, H: int, flip: bool,
              sx: float, sy: float, ox: float, oy: float, cw: float, ch: float,
              min_visible: float) -> tuple[list[PromptRecord], list[Box]]:
    """Map every box through flip -> scale -> crop offset; drop prompts whose target is cropped away."""
    def tf(b: Box | None) -> Box | None:
        return _map(_flip(b, W) if flip else b, sx, sy, ox, oy)

    out: list[PromptRecord] = []
    for p in prompts:
        if p.task in ("refer", "region"):
            target = tf(p.target_box if p.target_box is not None else p.box)
            if target is None:
                continue
            target = _visible(target, cw, ch, min_visible)
            if target is None:
                continue
            box = target if p.task == "region" else None
            out.append(dataclasses.replace(p, box=box, target_box=target))
        elif p.task == "trace":
            rel = []
            for b in p.utterance_boxes_rel:
                pix = tf(None if b is None else (b[0] * W, b[1] * H, b[2] * W, b[3] * H))
                c = None if pix is None else _clip(pix, cw, ch)
                if (pix is None or pix[2] < 0 or pix[3] < 0 or pix[0] > cw or pix[1] > ch
                        or (pix[2] > pix[0] and c[2] <= c[0]) or (pix[3] > pix[1] and c[3] <= c[1])):
                    rel.append(None)  # the utterance's trace lies outside the crop
                    continue
                rel.append((c[0] / cw, c[1] / ch, c[2] / cw, c[3] / ch))
            out.append(dataclasses.replace(p, box=None, utterance_boxes_rel=tuple(rel)))
        else:
            out.append(dataclasses.replace(p, box=None))
    boxes = [v for v in (_visible(tf(b), cw, ch, min_visible) for b in gt) if v is not None]  # type: ignore[arg-type]
    return out, boxes


def _annotation_scale(sample: GroundedSample, W: int, H: int) -> tuple[list[PromptRecord], list[Box]]:
    """Rescale pixel boxes when the annotation's stated size differs from the actual image."""
    if not sample.width or not sample.height or (sample.width, sample.height) == (W, H):
        return list(sample.prompts), list(sample.gt_boxes)
    fx, fy = W / sample.width, H / sample.height

    def s(b: Box | None) -> Box | None:
        return _map(b, fx, fy, 0.0, 0.0)

    prompts = [dataclasses.replace(p, box=s(p.box), target_box=s(p.target_box)) for p in sample.prompts]
    return prompts, [s(b) for b in sample.gt_boxes]  # type: ignore[misc]


def _mask_on_canvas(rle: dict, flip: bool, nw: int, nh: int, ox: int, oy: int, cw: int, ch: int,
                    image_pixels: int = 0) -> dict:
    """A mask (RLE of any size: the annotation's frame) -> RLE of the ``cw x ch`` canvas window at
    ``(ox, oy)`` of the image flipped (``flip``) and resized to ``nw x nh``: the pixels' own ops (PIL
    bilinear, as ``resize_longer_side``), kept where coverage >= 1/2. Only the mask's neighbourhood is
    resampled (PIL's ``box``: the same filter taps as the whole image's resize). A mask stated far larger
    than the image (``image_pixels``) is refused before it is decoded."""
    h0, w0 = (int(v) for v in rle["size"])
    if h0 * w0 > 16 * max(1, nw * nh, image_pixels):
        raise ValueError(f"mask size {w0}x{h0} is far larger than the image")  # before decoding it
    m = rle_to_mask(rle)
    out = np.zeros((ch, cw), bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not len(rows):
        return mask_to_rle(out)
    if flip:
        m = m[:, ::-1]
        cols = w0 - 1 - cols[::-1]
    if (nw, nh) == (w0, h0):
        out[:] = m[oy:oy + ch, ox:ox + cw]
        return mask_to_rle(out)
    sx, sy = nw / w0, nh / h0
    rx, ry = max(1.0, 1.0 / sx) + 1.0, max(1.0, 1.0 / sy) + 1.0  # filter reach in source pixels, and a margin
    j0 = max(ox, math.floor((cols[0] - rx) * sx) - 1)
    j1 = min(ox + cw, math.ceil((cols[-1] + 1 + rx) * sx) + 1)
    i0 = max(oy, math.floor((rows[0] - ry) * sy) - 1)
    i1 = min(oy + ch, math.ceil((rows[-1] + 1 + ry) * sy) + 1)
    if j1 <= j0 or i1 <= i0:
        return mask_to_rle(out)
    source = Image.fromarray(np.ascontiguousarray(m, dtype=np.uint8) * np.uint8(255), "L")
    region = source.resize((j1 - j0, i1 - i0), Image.BILINEAR, box=(j0 / sx, i0 / sy, j1 / sx, i1 / sy))
    out[i0 - oy:i1 - oy, j0 - ox:j1 - ox] = np.asarray(region) >= 128
    return mask_to_rle(out)


def _masks(prompts: list[PromptRecord], flip: bool, nw: int, nh: int, ox: int, oy: int, cw: int,
           ch: int, enabled: bool = True, image_pixels: int = 0) -> list[PromptRecord]:
    """Map every prompt's ``target_mask`` onto the canvas (a mask shared by prompts is mapped once); a
    malformed mask is dropped with a warning. ``enabled=False`` drops them all (never left in the wrong
    frame)."""
    done: dict[tuple, dict | None] = {}
    out = []
    for p in prompts:
        if p.target_mask is None or not enabled:
            out.append(p if p.target_mask is None else dataclasses.replace(p, target_mask=None))
            continue
        key = (tuple(p.target_mask.get("size", ())), str(p.target_mask.get("counts")))
        if key not in done:
            try:
                done[key] = _mask_on_canvas(p.target_mask, flip, nw, nh, ox, oy, cw, ch, image_pixels)
            except (ValueError, TypeError, KeyError) as exc:
                warnings.warn(f"prompt {p.ref_id!r}: target_mask dropped: {exc}", AnnotationWarning,
                              stacklevel=3)
                done[key] = None
        out.append(dataclasses.replace(p, target_mask=done[key]))
    return out


def _to_tensor(image: Image.Image, size: int, vision: VisionConfig) -> torch.Tensor:
    return normalise_and_pad(image, size, vision)  # the same pixels the Predictor feeds the model


_SIDES = re.compile(r"\b(left|right)", re.IGNORECASE)


def _mentions_sides(prompts: list[PromptRecord]) -> bool:
    """A flip would falsify "left of" / "rightmost" / ..., so such samples are never flipped."""
    return any(_SIDES.search(p.text) or (p.context and _SIDES.search(p.context)) for p in prompts)


def _resize(image: Image.Image, longer: int) -> tuple[Image.Image, float, float]:
    return resize_longer_side(image, longer)


def eval_transform(sample: GroundedSample, vision: VisionConfig, image: Image.Image | None = None, *,
                   masks: bool = True) -> TransformedSample:
    """Resize the longer side to ``vision.image_size`` and pad; no prompt is dropped. ``masks=False`` drops
    the prompts' ``target_mask`` instead of mapping them (for batches that do not use them)."""
    image = image if image is not None else sample.load_image()
    W, H = image.size
    S = vision.image_size
    prompts, gt = _annotation_scale(sample, W, H)
    resized, sx, sy = _resize(image, S)
    cw, ch = resized.size
    prompts, boxes = _geometry(sample, prompts, gt, W, H, False, sx, sy, 0.0, 0.0, cw, ch, 0.0)
    prompts = _masks(prompts, False, cw, ch, 0, 0, cw, ch, masks, W * H)
    return TransformedSample(_to_tensor(resized, S, vision), (float(cw), float(ch)), prompts, boxes, (W, H),
                             (sx, sy), (0.0, 0.0), sample.image_id, sample.source)


def train_transform(sample: GroundedSample, vision: VisionConfig, augment: AugmentConfig | None = None,
                    generator: torch.Generator | np.random.Generator | None = None,
                    image: Image.Image | None = None, *, masks: bool = True) -> TransformedSample:
    """Random flip (``augment.hflip``), random resize, random S crop, pad; deterministic given the generator
    (masks draw nothing: ``masks=False``, which drops them, gives the same sample otherwise)."""
    aug = augment or AugmentConfig()
    rng = _Rng(generator)
    image = image if image is not None else sample.load_image()
    W, H = image.size
    S = vision.image_size
    prompts, gt = _annotation_scale(sample, W, H)
    flip = aug.hflip > 0 and rng.uniform(0, 1) < aug.hflip and not _mentions_sides(prompts)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    resized, sx, sy = _resize(image, max(1, round(S * rng.uniform(*aug.scale))))
    nw, nh = resized.size
    cw, ch = min(nw, S), min(nh, S)
    for _ in range(max(1, aug.max_tries)):
        ox, oy = rng.randint(0, nw - cw), rng.randint(0, nh - ch)
        kept, boxes = _geometry(sample, prompts, gt, W, H, flip, sx, sy, ox, oy, cw, ch, aug.min_visible)
        if kept or not prompts:
            break
    else:
        return eval_transform(sample, vision, image=image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image,
                              masks=masks)
    crop = resized if (cw, ch) == (nw, nh) else resized.crop((ox, oy, ox + cw, oy + ch))
    kept = _masks(kept, flip, nw, nh, ox, oy, cw, ch, masks, W * H)
    return TransformedSample(_to_tensor(crop, S, vision), (float(cw), float(ch)), kept, boxes, (W, H),
                             (sx, sy), (float(ox), float(oy)), sample.image_id, sample.source, flip)
