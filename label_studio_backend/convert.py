"""Label Studio JSON <-> the predictor's results. Pixels <-> percent conversions go through
``pixelllm_plugins.geometry`` (the one place they live)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pixelllm_plugins.geometry import clip_box, ls_percent_to_xyxy, xyxy_to_ls_percent
from pixelllm_plugins.inference.results import Detection, MaskResult, RegionCaption, TracedCaption
from pixelllm_plugins.masks import (
    keyhole_ring,
    ls_points_to_polygon,
    ls_rle_to_mask,
    mask_to_box,
    mask_to_ls_rle,
    polygon_to_ls_points,
    polygons_to_mask,
    rle_to_mask,
)

from .errors import InvalidRegionError, printable
from .label_config import BRUSH_TYPES, POLYGON_TYPES, ControlTag, LabelConfig

RECT_TYPES = ("rectanglelabels", "rectangle")


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def _score(value: float) -> float:
    value = float(value)
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def _frame(width: int, height: int) -> dict:
    return {"original_width": int(width), "original_height": int(height), "image_rotation": 0}


def rect_result(cfg: LabelConfig, box_xyxy, width: int, height: int, *, text: str, score: float,
                region_id: str | None = None, control: ControlTag | None = None) -> dict:
    """A ``rectanglelabels`` (or ``rectangle``) region; its label comes from ``text`` via
    ``predicted_values``."""
    control = control or cfg.box_control
    image = cfg.image
    geom = {k: round(v, 4) for k, v in xyxy_to_ls_percent(box_xyxy, width, height).items()}
    value = {**geom, "rotation": 0}
    label = cfg.label_for(text, control)
    if control.type == "rectanglelabels" and label is not None:
        value["rectanglelabels"] = [label]
    return {"id": region_id or new_region_id(), "from_name": control.name, "to_name": image.name,
            "type": control.type, **_frame(width, height), "value": value, "score": _score(score)}


def text_result(control: ControlTag, to_name: str, text: str, width: int, height: int, *,
                region_id: str | None = None, geometry: dict | None = None) -> dict:
    """A TextArea result; with ``geometry`` (percent x/y/width/height) it is a per-region caption and
    must share ``region_id`` with its rectangle."""
    value = {**geometry, "rotation": 0} if geometry else {}
    value["text"] = [text]
    return {"id": region_id or new_region_id(), "from_name": control.name, "to_name": to_name,
            "type": "textarea", **_frame(width, height), "value": value}


def box_with_caption(cfg: LabelConfig, box_xyxy, width: int, height: int, *, caption: str, score: float,
                     label_text: str | None = None) -> list[dict]:
    """A rectangle plus, when the config has a per-region TextArea, its caption (same id)."""
    rect = rect_result(cfg, box_xyxy, width, height, text=label_text or caption, score=score)
    out = [rect]
    cap = cfg.caption_control
    if cap is not None and caption:
        geometry = {k: rect["value"][k] for k in ("x", "y", "width", "height")}
        out.append(text_result(cap, cfg.image.name, caption, width, height, region_id=rect["id"],
                               geometry=geometry))
    return out


def boxes_to_results(cfg: LabelConfig, items: Iterable[Detection | RegionCaption], width: int, height: int
                     ) -> list[dict]:
    """Detections (text -> box) or region captions: each a rectangle with its text as the caption."""
    results = []
    for item in items:
        results += box_with_caption(cfg, item.box_xyxy, width, height, caption=item.text, score=item.score)
    return results


def traced_caption_to_results(cfg: LabelConfig, caption: TracedCaption, width: int, height: int) -> list[dict]:
    """Whole-image caption into the image-caption TextArea, each word as a box with its word as caption,
    and (when the config has ``<KeyPointLabels>``) the word's 2 trace points."""
    results = []
    image = cfg.image
    whole = cfg.image_caption_control
    if whole is not None and caption.text:
        results.append(text_result(whole, image.name, caption.text, width, height))
    kp = cfg.keypoint_control
    for w in caption.words:
        try:
            box = clip_box(w.box_xyxy, width, height)
        except Exception:  # a degenerate word box: keep the caption, skip the box
            continue
        results += box_with_caption(cfg, box, width, height, caption=w.text, score=caption.score)
        if kp is not None:
            label = cfg.label_for(w.text, kp)
            for px, py in w.points:
                value = {"x": round(100.0 * px / width, 4), "y": round(100.0 * py / height, 4), "width": 0.5}
                if label:
                    value["keypointlabels"] = [label]
                results.append({"id": new_region_id(), "from_name": kp.name, "to_name": image.name,
                                "type": "keypointlabels", **_frame(width, height), "value": value})
    return results


# ------------------------------------------------------------------ masks (segmentation configs)
def polygon_results(control: ControlTag, to_name: str, polygons: list[dict], width: int, height: int, *,
                    label: str | None, score: float) -> list[dict]:
    """One ``polygonlabels`` result per part of a mask (pixel polygons, see ``pixelllm_plugins.masks``), points
    in percent of the original image. Label Studio polygons cannot hold holes: a part's holes are joined to
    its outline by a zero-width cut (``masks.keyhole_ring``), so the filled area keeps them."""
    out = []
    for polygon in polygons:
        ring = keyhole_ring(polygon)
        if len(ring) < 3:
            continue
        value: dict = {"points": [[round(x, 4), round(y, 4)] for x, y in polygon_to_ls_points(ring, width, height)],
                       "closed": True}
        if control.type == "polygonlabels" and label is not None:
            value["polygonlabels"] = [label]
        out.append({"id": new_region_id(), "from_name": control.name, "to_name": to_name, "type": control.type,
                    **_frame(width, height), "value": value, "score": _score(score)})
    return out


def brush_result(control: ControlTag, to_name: str, mask, width: int, height: int, *, label: str | None,
                 score: float, region_id: str | None = None) -> dict:
    """A ``brushlabels`` result: the mask (bool ``[H, W]`` or COCO RLE) in Label Studio's brush RLE."""
    m = rle_to_mask(mask) if isinstance(mask, dict) else np.asarray(mask, bool)
    value: dict = {"format": "rle", "rle": mask_to_ls_rle(m)}
    if control.type == "brushlabels" and label is not None:
        value["brushlabels"] = [label]
    return {"id": region_id or new_region_id(), "from_name": control.name, "to_name": to_name, "type": control.type,
            **_frame(width, height), "value": value, "score": _score(score)}


def mask_to_results(cfg: LabelConfig, found: MaskResult, width: int, height: int, *, brush: bool = False,
                    caption: str | None = None) -> list[dict]:
    """A ``MaskResult`` as Label Studio regions: polygons (one result per part) on a ``<PolygonLabels>``
    config, else (or with ``brush``) one brush mask; plus, when the config has a per-region ``<TextArea>``
    and there is a caption (the prompt's text, or ``caption``), that caption on the same region id (on the
    first part of a polygon)."""
    image = cfg.image
    text = caption if caption is not None else (found.text or "")
    control = cfg.brush_control if brush and cfg.brush_control is not None else cfg.mask_control
    label = cfg.label_for(text, control)
    if control.type in POLYGON_TYPES:
        out = polygon_results(control, image.name, found.polygons, width, height, label=label, score=found.score)
    else:
        out = [brush_result(control, image.name, found.mask, width, height, label=label, score=found.score)]
    cap = cfg.caption_control
    if cap is not None and text and out:
        out.append(text_result(cap, image.name, text, width, height, region_id=out[0]["id"]))
    return out


def prediction(results: list[dict], model_version: str, *, score: float | None = None) -> dict:
    """One prediction per task: ``score`` is the mean region score (0 when there are none)."""
    if score is None:
        scores = [r["score"] for r in results if isinstance(r.get("score"), (int, float))]
        score = sum(scores) / len(scores) if scores else 0.0
    return {"result": results, "score": round(_score(score), 6), "model_version": model_version}


def error_prediction(message: str, model_version: str) -> dict:
    """A per-task failure: no regions, the reason in ``error``. The version differs from the current one
    (``-failed``) so Label Studio asks again next time instead of treating the task as done."""
    return {"result": [], "score": 0.0, "model_version": f"{model_version}-failed", "error": message}


# ------------------------------------------------------------------ reading Label Studio results
@dataclass
class Region:
    """A box read from Label Studio results, in pixels, with its caption/label if any."""

    id: str
    box_xyxy: tuple[float, float, float, float]
    caption: str | None = None
    label: str | None = None


def _num(v) -> float:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("non-finite")
    return f


def regions_from_results(results: object, width: int | None = None, height: int | None = None) -> list[Region]:
    """Boxes (and their per-region captions, matched by id) from a list of LS results. Malformed items
    are skipped. ``width``/``height`` override ``original_width``/``original_height`` when given."""
    if not isinstance(results, list):
        return []
    boxes: dict[str, Region] = {}
    captions: dict[str, str] = {}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            continue
        value = r["value"]
        rid = r.get("id")
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" else f"_r{i}"
        kind = _type(r)
        if kind in RECT_TYPES:
            try:
                w = _num(width or r.get("original_width"))
                h = _num(height or r.get("original_height"))
                box = ls_percent_to_xyxy({k: _num(value[k]) for k in ("x", "y", "width", "height")}, w, h)
                box = clip_box(box, w, h)
            except (KeyError, TypeError, ValueError, ArithmeticError, Exception):
                continue
            labels = value.get("rectanglelabels")
            label = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
            boxes[rid] = Region(rid, box, label=label)
        elif kind == "textarea":
            text = value.get("text")
            if isinstance(text, list):
                text = " ".join(t for t in text if isinstance(t, str)).strip()
            if isinstance(text, str) and text.strip():
                captions[rid] = text.strip()
    for rid, text in captions.items():
        if rid in boxes:
            boxes[rid].caption = text
    return list(boxes.values())


def _type(result: object) -> str:
    """A result's ``type`` in lower case; "" when the result is not a dict or the type not a string (a
    nested list is never turned into text)."""
    kind = result.get("type") if isinstance(result, dict) else None
    return kind.lower() if isinstance(kind, str) else ""


def texts_from_results(results: object, control_names: Iterable[str]) -> list[str]:
    """Non-empty texts of whole-image TextArea results of the given controls (e.g. the prompt)."""
    names = set(control_names)
    out = []
    if not isinstance(results, list):
        return out
    for r in results:
        if _type(r) != "textarea":
            continue
        if names and (not isinstance(r.get("from_name"), str) or r["from_name"] not in names):
            continue
        value = r.get("value") if isinstance(r.get("value"), dict) else {}
        if any(k in value for k in ("x", "y", "width", "height")):
            continue  # a per-region caption, not a prompt
        text = value.get("text")
        items = text if isinstance(text, list) else [text]
        out += [t.strip() for t in items if isinstance(t, str) and t.strip()]
    return out


# ------------------------------------------------------------------ reading masks and clicks
MAX_POLYGON_POINTS = 100_000


@dataclass
class MaskRegion:
    """A mask read from Label Studio results (a polygon or a brush region), at ``width`` x ``height``."""

    id: str
    mask: np.ndarray  # bool [height, width]
    width: int
    height: int
    label: str | None = None
    caption: str | None = None

    @property
    def box_xyxy(self) -> tuple[float, float, float, float]:
        return mask_to_box(self.mask)


def _size_of(r: dict, width, height) -> tuple[int, int]:
    w, h = width or r.get("original_width"), height or r.get("original_height")
    for name, v in (("original_width", w), ("original_height", h)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1 or v != int(v):
            raise InvalidRegionError(f"{name} must be a positive whole number of pixels, got {printable(v)}")
        if v > 100_000:
            raise InvalidRegionError(f"{name} {int(v):,} is larger than any image this backend reads")
    return int(w), int(h)


def _labels(value: dict, key: str) -> str | None:
    labels = value.get(key)
    return labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None


def mask_from_result(r: object, width: int | None = None, height: int | None = None) -> MaskRegion:
    """One ``polygonlabels`` / ``brushlabels`` result as a mask; ``InvalidRegionError`` saying what is wrong
    (fewer than 3 points, coordinates that are not finite numbers, a brush RLE that does not decode, a size
    that is not a positive whole number, an empty mask)."""
    if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
        raise InvalidRegionError("a region must be an object with a 'value' object")
    kind, value = _type(r), r["value"]
    w, h = _size_of(r, width, height)
    rid = r.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "" else new_region_id()
    if kind in POLYGON_TYPES:
        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            n = len(points) if isinstance(points, list) else printable(points)
            raise InvalidRegionError(f"polygon {printable(rid, 20)} has {n} points; a polygon needs at least 3")
        if len(points) > MAX_POLYGON_POINTS:
            raise InvalidRegionError(f"polygon has {len(points):,} points; at most {MAX_POLYGON_POINTS:,}")
        try:
            pts = [[_num(p[0]), _num(p[1])] for p in points if isinstance(p, (list, tuple)) and len(p) == 2
                   and not isinstance(p[0], bool) and not isinstance(p[1], bool)]
        except (TypeError, ValueError):
            pts = []
        if len(pts) != len(points):
            raise InvalidRegionError(f"polygon {printable(rid, 20)}: every point must be [x, y], two finite numbers "
                                     "(percent of the image)")
        if any(abs(v) > 1000 for p in pts for v in p):
            raise InvalidRegionError(f"polygon {printable(rid, 20)} has a point far outside the image (percent "
                                     "coordinates beyond +-1000)")
        try:
            mask = polygons_to_mask([ls_points_to_polygon(pts, w, h)], w, h)
        except ValueError as exc:
            raise InvalidRegionError(f"polygon {printable(rid, 20)}: {exc}") from None
        label = _labels(value, "polygonlabels")
    elif kind in BRUSH_TYPES:
        if value.get("format", "rle") != "rle":
            raise InvalidRegionError(f"brush {printable(rid, 20)}: format {printable(value.get('format'))} is not "
                                     "supported; Label Studio writes 'rle'")
        try:
            mask = ls_rle_to_mask(value.get("rle"), w, h)
        except ValueError as exc:
            raise InvalidRegionError(f"brush {printable(rid, 20)}: {exc}") from None
        label = _labels(value, "brushlabels")
    else:
        raise InvalidRegionError(f"region type {printable(r.get('type'))} is not a polygon or brush mask")
    if not mask.any():
        raise InvalidRegionError(f"{kind} {printable(rid, 20)} covers no pixel of the {w}x{h} image")
    return MaskRegion(rid, mask, w, h, label=label)


def masks_from_results(results: object, width: int | None = None, height: int | None = None,
                       errors: list[str] | None = None) -> list[MaskRegion]:
    """Polygon and brush regions of a list of LS results as masks, with their per-region captions (matched by
    id). A malformed region is skipped; its message goes to ``errors`` when given."""
    if not isinstance(results, list):
        if errors is not None:
            errors.append(f"'result' must be a list, got {type(results).__name__}")
        return []
    found: list[MaskRegion] = []
    captions: dict[str, str] = {}
    for r in results:
        kind = _type(r)
        if kind in POLYGON_TYPES or kind in BRUSH_TYPES:
            try:
                found.append(mask_from_result(r, width, height))
            except InvalidRegionError as exc:
                if errors is not None:
                    errors.append(str(exc))
        elif kind == "textarea" and isinstance(r.get("value"), dict) and isinstance(r.get("id"), (str, int)):
            text = r["value"].get("text")
            if isinstance(text, list):
                text = " ".join(t for t in text if isinstance(t, str)).strip()
            if isinstance(text, str) and text.strip():
                captions[str(r["id"])] = text.strip()
    for m in found:
        m.caption = captions.get(m.id)
    return found


@dataclass
class Click:
    """A keypoint click in pixels; ``positive`` false for an Alt-click (not the object)."""

    x: float
    y: float
    positive: bool = True


def click_from_result(r: object, width: int, height: int) -> Click:
    """A ``keypointlabels`` result as a click in pixels of the ``width`` x ``height`` image;
    ``InvalidRegionError`` for coordinates that are not finite numbers or lie outside the image."""
    value = r.get("value") if isinstance(r, dict) else None
    if not isinstance(value, dict):
        raise InvalidRegionError("a click must be an object with a 'value' object")
    try:
        if not all(isinstance(value[k], (int, float)) and not isinstance(value[k], bool) for k in ("x", "y")):
            raise TypeError("a coordinate must be a number")
        x, y = _num(value["x"]), _num(value["y"])
    except (KeyError, TypeError, ValueError):
        raise InvalidRegionError("a click needs 'x' and 'y', finite numbers (percent of the image)") from None
    if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
        raise InvalidRegionError(f"the click at ({x:.4g} %, {y:.4g} %) lies outside the image; click on it")
    positive = r.get("is_positive", True)
    px, py = min(x * width / 100.0, width - 0.5), min(y * height / 100.0, height - 0.5)
    return Click(px, py, positive is not False)
