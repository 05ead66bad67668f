"""Conversions between PixelLLM results and FiftyOne labels (no database).

Boxes: the predictor speaks ``x1, y1, x2, y2`` pixels; FiftyOne stores relative ``[x, y, w, h]``.
The conversions are the ones in ``pixelllm_plugins.geometry``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import fiftyone.core.labels as fol

from ...errors import InvalidBoxError
from ...geometry import as_box, clip_box, fo_relative_to_xyxy, point_to_relative, xyxy_to_fo_relative
from ...inference.results import Detection, RegionCaption, TracedCaption
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
