"""Conversions between PixelLLM results and FiftyOne labels (no database).

Boxes: the predictor speaks ``x1, y1, x2, y2`` pixels; FiftyOne stores relative ``[x, y, w, h]``.
The conversions are the ones in ``pixelllm_plugins.geometry``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import fiftyone.core.labels as fol

from ...errors import InvalidBoxError
from ...geometry import as_box, clip_box, fo_relative_to_xyxy, point_to_relative, xyxy_to_fo_relative
from ...inference.results import Detection, MaskResult, RegionCaption, TracedCaption
from ...masks import mask_to_fo_instance, polygons_to_fo_points, rle_to_mask
from .params import _shown

_STOP = {"a", "an", "the", "this", "that", "some"}
_BREAK = {"on", "in", "of", "with", "to", "at", "near", "next", "left", "right", "above", "below", "under",
          "behind", "beside", "and", "or", "which", "that", "is", "are", "holding", "from", "over", "by"}


def short_label(text: str, max_words: int = 3) -> str:
    """A short filterable label for a region caption: the head phrase without articles.

    ``"a red circle to the left of a square"`` -> ``"red circle"``.
    """
    words = [w for w in re.split(r"[\s,;.]+", text.strip().lower()) if w]
    while words and words[0] in _STOP:
        words = words[1:]
    head: list[str] = []
    for w in words:
        if head and w in _BREAK:
            break
        head.append(w)
    head = head[:max_words]
    return " ".join(head) if head else (text.strip()[:40] or "region")


def refer_to_detections(per_text: Sequence[Sequence[Detection]], prompts: Sequence[str], width: float,
                        height: float, model_version: str) -> fol.Detections:
    """Refer results for one image -> ``fo.Detections`` (label = prompt; confidence, prompt, model version)."""
    dets = []
    for prompt, found in zip(prompts, per_text):
        for d in found:
            dets.append(fol.Detection(label=prompt, bounding_box=xyxy_to_fo_relative(d.box_xyxy, width, height),
                                      confidence=float(d.score), prompt=prompt,
                                      model_version=d.model_version or model_version))
    return fol.Detections(detections=dets, model_version=model_version, pixelllm_request=_refer_key(prompts))


def dense_to_detections(regions: Sequence[RegionCaption], width: float, height: float,
                        model_version: str, request: str = "") -> fol.Detections:
    """Dense-caption regions -> ``fo.Detections`` with a short ``label`` and the full ``caption``."""
    dets = [fol.Detection(label=short_label(r.text), bounding_box=xyxy_to_fo_relative(r.box_xyxy, width, height),
                          confidence=float(r.score), caption=r.text,
                          model_version=r.model_version or model_version) for r in regions]
    return fol.Detections(detections=dets, model_version=model_version, pixelllm_request=request)


def trace_to_labels(traced: TracedCaption, width: float, height: float,
                    model_version: str) -> tuple[fol.Classification, fol.Keypoints, fol.Polylines]:
    """A traced caption -> (caption ``Classification``, one ``Keypoint`` per word, one ``Polyline`` path)."""
    version = traced.model_version or model_version
    caption = fol.Classification(label=traced.text, confidence=float(traced.score), model_version=version)
    keypoints, path, words = [], [], []
    for i, word in enumerate(traced.words):
        points = [point_to_relative(p, width, height) for p in word.points] or \
            [point_to_relative(word.center, width, height)]
        keypoints.append(fol.Keypoint(label=word.text, points=points, index=i, word_index=i,
                                      box=xyxy_to_fo_relative(word.box_xyxy, width, height)))
        path.append(tuple(point_to_relative(word.center, width, height)))
        words.append(word.text)
    lines = [fol.Polyline(label="trace", points=[path], closed=False, filled=False, words=words,
                          caption=traced.text)] if path else []
    return (caption, fol.Keypoints(keypoints=keypoints, model_version=version),
            fol.Polylines(polylines=lines, model_version=version))


def path_field_for(trace_field: str) -> str:
    """The field holding the word-trace ``Polyline`` next to ``trace_field``'s ``Keypoints``."""
    return f"{trace_field}_path"


def _refer_key(prompts: Sequence[str]) -> str:
    return json.dumps(list(prompts), ensure_ascii=False)


def _box_xyxy(det, width: float, height: float):
    """A stored box in pixels, clipped to the image; ``InvalidBoxError`` for a missing, malformed, non-finite
    or empty one (stored data can hold anything)."""
    rel = getattr(det, "bounding_box", None)
    if rel is None:
        raise InvalidBoxError("the box has no bounding_box")
    try:
        rel = as_box(rel)
    except InvalidBoxError:
        raise InvalidBoxError(f"bounding_box {_shown(rel)} is not 4 finite numbers [x, y, width, "
                              "height]") from None
    return clip_box(fo_relative_to_xyxy(rel, width, height), width, height)


# ---- masks (segment) and point prompts ---------------------------------------------------------------------

MASK_OUTPUTS = ("instance_masks", "polylines")


def _finite_unit(value) -> tuple[float, float] | str:
    """A stored relative point ``[x, y]`` (FiftyOne keypoints), checked: the point or why it cannot be used."""
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError):
        return f"{_shown(value)} is not 2 numbers [x, y]"
    if not (math.isfinite(x) and math.isfinite(y)):
        return f"[{x:g}, {y:g}] is not 2 finite numbers (FiftyOne marks a missing keypoint with NaN)"
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        return f"[{x:g}, {y:g}] lies outside the image (relative coordinates are in [0, 1])"
    return (x, y)


def keypoint_prompts(value, name: str, wanted: set[str] | None = None):
    """The points of a ``Keypoints`` (or ``Keypoint``) field value as prompts.

    Returns ``(path, prompts, errors)``: ``path`` the label path for ``set_label_values`` (``None`` when the
    value is not keypoints), ``prompts`` a list of ``(keypoint, index, (x, y))`` with relative ``x, y`` in
    [0, 1], ``errors`` one message per point that cannot be used (non-finite, outside the image, malformed):
    those points are skipped. ``wanted``: only the keypoints with these ids."""
    if isinstance(value, fol.Keypoints):
        kps, path = value.keypoints, f"{name}.keypoints"
    elif isinstance(value, fol.Keypoint):
        kps, path = [value], name
    else:
        return None, [], [f"points_field {name!r} holds {type(value).__name__}, not Keypoints"]
    prompts, errors = [], []
    for kp in kps:
        if wanted is not None and kp.id not in wanted:
            continue
        points = kp.points if isinstance(kp.points, (list, tuple)) else []
        if not points:
            errors.append(f"keypoint {kp.id}: no points")
        for j, p in enumerate(points):
            checked = _finite_unit(p)
            if isinstance(checked, str):
                errors.append(f"keypoint {kp.id} point {j}: {checked}; skipped")
            else:
                prompts.append((kp, j, checked))
    return path, prompts, errors


def box_prompts(value, name: str, width: float, height: float):
    """The boxes of a ``Detections`` (or ``Detection``) field value as pixel prompts: ``(prompts, errors)``,
    ``prompts`` a list of ``(detection, (x1, y1, x2, y2))`` clipped to the image, ``errors`` one message per
    box that cannot be used (skipped)."""
    if isinstance(value, fol.Detections):
        dets = value.detections
    elif isinstance(value, fol.Detection):
        dets = [value]
    else:
        return [], [f"boxes_field {name!r} holds {type(value).__name__}, not Detections"]
    prompts, errors = [], []
    for det in dets:
        try:
            prompts.append((det, _box_xyxy(det, width, height)))
        except InvalidBoxError as exc:
            errors.append(f"box {det.id}: {exc}; skipped")
    return prompts, errors


def masks_to_labels(results: Sequence[MaskResult], prompts: Sequence[dict], width: int, height: int,
                    model_version: str, output: str = "instance_masks",
                    request: str = "") -> tuple[fol.Detections | fol.Polylines, list[str]]:
    """Segment results for one image -> FiftyOne labels, plus one message per mask that could not be stored.

    ``prompts``: per result, the attributes of its prompt (``label``, and ``prompt`` / ``prompt_box`` /
    ``prompt_point`` / ``source_id``), stored on the label. ``output="instance_masks"``: ``fo.Detections``
    whose ``bounding_box`` is the mask's tight box and ``mask`` the boolean mask cropped to it (FiftyOne's
    convention); ``"polylines"``: ``fo.Polylines``, one filled, closed ``Polyline`` per mask whose shapes are
    every polygon's exterior and holes (read even-odd, see ``masks.polygons_to_fo_points``). Both carry
    ``confidence`` (the prompt's score), ``mask_score`` and ``model_version``."""
    labels, errors = [], []
    for k, r in enumerate(results):
        meta = dict(prompts[k]) if k < len(prompts) else {}
        label = meta.pop("label", None) or (r.text or "object")
        attrs = {"confidence": float(r.score), "mask_score": float(r.mask_score),
                 "model_version": r.model_version or model_version, **meta}
        if r.text and "prompt" not in attrs:
            attrs["prompt"] = r.text
        if output == "polylines":
            points = polygons_to_fo_points(r.polygons, width, height)
            if not points:
                errors.append(f"mask {k} ({label}): empty; not stored")
                continue
            labels.append(fol.Polyline(label=label, points=points, closed=True, filled=True,
                                       num_holes=sum(len(p.get("holes") or []) for p in r.polygons), **attrs))
        else:
            full = rle_to_mask(r.mask)
            if full.shape != (int(height), int(width)):
                errors.append(f"mask {k} ({label}): size {list(full.shape)} is not the image's "
                              f"[{int(height)}, {int(width)}]; not stored")
                continue
            try:
                box, crop = mask_to_fo_instance(full)
            except ValueError:
                errors.append(f"mask {k} ({label}): empty; not stored")
                continue
            labels.append(fol.Detection(label=label, bounding_box=box, mask=crop, **attrs))
    if output == "polylines":
        return fol.Polylines(polylines=labels, model_version=model_version, pixelllm_request=request), errors
    return fol.Detections(detections=labels, model_version=model_version, pixelllm_request=request), errors
