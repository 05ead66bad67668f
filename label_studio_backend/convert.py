"""Label Studio JSON <-> the predictor's results. Pixels <-> percent conversions go through
``pixelllm_plugins.geometry`` (the one place they live)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from pixelllm_plugins.geometry import clip_box, ls_percent_to_xyxy, xyxy_to_ls_percent
from pixelllm_plugins.inference.results import Detection, RegionCaption, TracedCaption

from .label_config import ControlTag, LabelConfig

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
