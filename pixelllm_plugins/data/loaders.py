"""Readers of the public formats into :class:`GroundedSample` lists.

- :func:`load_localized_narratives`: LN JSONL (spec 4.1: traces interpolated, 16 samples per utterance,
  utterance bbox, validity). The token <-> utterance assignment happens in collate (it needs the tokenizer).
- :func:`load_refcoco`: MDETR-style RefCOCO/+/g json, regrouped per original image.
- :func:`load_vg`: GRiT-style Visual Genome json (region captions); with ``instances``, the regions that
  are instances of a COCO instances json (same image id, the same box) get its mask.
- :func:`load_coco_captions`: COCO captions json.

A file that cannot be used raises :class:`AnnotationError` naming the file and field; a malformed record is
skipped with an :class:`AnnotationWarning` and the rest loads.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..masks import segmentation_to_rle
from .types import AnnotationError, AnnotationWarning, Box, GroundedSample, PromptRecord

LN_SAMPLES_PER_UTTERANCE = 16
_MAX_WARNINGS = 10


class _Skip(Exception):
    """A record is malformed; the message says which field."""


class _Warner:
    """Warn once per skipped record (up to a limit), then once with the total."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0

    def skip(self, where: str, why: str) -> None:
        self.count += 1
        if self.count <= _MAX_WARNINGS:
            warnings.warn(f"{self.path}: {where} skipped: {why}", AnnotationWarning, stacklevel=3)

    def done(self) -> None:
        if self.count > _MAX_WARNINGS:
            warnings.warn(f"{self.path}: {self.count} malformed records skipped in all", AnnotationWarning,
                          stacklevel=3)


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path} is not valid JSON ({exc}); is it the right file?") from exc


def _top_list(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise AnnotationError(f"{path}: top-level field '{key}' (a list) is missing; expected a COCO-style json "
                              "with 'images' and 'annotations'")
    return data[key]


def _field(record: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(record, dict) or name not in record:
        raise _Skip(f"missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _Skip(f"field '{name}' has the wrong type ({type(value).__name__})")
    return value


def _text(record: Any, name: str) -> str:
    value = _field(record, name, str).strip()
    if not value:
        raise _Skip(f"field '{name}' is empty")
    return value


def _xywh_box(record: Any, width: float | None = None, height: float | None = None) -> Box:
    bbox = _field(record, "bbox", (list, tuple))
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        raise _Skip(f"field 'bbox' must be 4 numbers x,y,w,h, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _Skip(f"field 'bbox' has no area: {bbox!r}")
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width and height:
        x1, x2 = max(0.0, x1), min(float(width), x2)
        y1, y2 = max(0.0, y1), min(float(height), y2)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            raise _Skip(f"field 'bbox' {bbox!r} lies outside the {width}x{height} image")
    return (x1, y1, x2, y2)


def _images(data: Any, path: Path, warner: _Warner, need_caption: bool = False) -> dict[Any, dict]:
    out: dict[Any, dict] = {}
    for k, rec in enumerate(_top_list(data, "images", path)):
        try:
            image_id = _field(rec, "id", (int, str))
            _text(rec, "file_name")
            for name in ("width", "height"):
                if _field(rec, name, (int, float)) <= 0:
                    raise _Skip(f"field '{name}' must be positive")
            if need_caption:
                _text(rec, "caption")
        except _Skip as exc:
            warner.skip(f"images[{k}]", str(exc))
            continue
        out[image_id] = rec
    return out


def _sample(rec: dict, image_dir: Path, prompts: list[PromptRecord], gt_boxes: list[Box], source: str,
            image_id: Any) -> GroundedSample:
    return GroundedSample(image=image_dir / rec["file_name"], prompts=prompts, gt_boxes=gt_boxes,
                          width=int(rec["width"]), height=int(rec["height"]), image_id=str(image_id),
                          source=source)


# ---- RefCOCO (MDETR) -----------------------------------------------------------------------------------

def _mask(ann: dict, rec: dict, k: int, warner: _Warner) -> dict | None:
    """The annotation's ``segmentation`` as compressed RLE of the image record's size; None when absent or
    malformed (warned; the box is kept)."""
    segmentation = ann.get("segmentation")
    if segmentation is None or segmentation == []:
        return None
    try:
        return segmentation_to_rle(segmentation, int(rec["height"]), int(rec["width"]))
    except (ValueError, TypeError, OverflowError) as exc:
        warner.skip(f"annotations[{k}] 'segmentation'", f"{exc}; the box is kept without a mask")
        return None


def load_refcoco(path: str | Path, image_dir: str | Path, *, task: str = "refer",
                 source: str = "refcoco") -> list[GroundedSample]:
    """MDETR RefCOCO json -> one sample per original image, one prompt per expression.

    ``task="refer"`` gives referring-localization prompts (global box, the expression as text, the object
    box as target); ``task="region"`` gives location-conditioned captioning prompts (box -> expression).
    ``gt_boxes`` are the distinct referred objects of the image. An annotation's optional ``segmentation``
    (COCO polygons, compressed or uncompressed RLE) becomes the prompt's ``target_mask`` (compressed RLE of
    the image record's size); a malformed one is dropped with a warning and the box kept.
    """
    if task not in ("refer", "region"):
        raise ValueError(f"task must be 'refer' or 'region', got {task!r}")
    path, image_dir = Path(path), Path(image_dir)
    data = _read_json(path)
    warner = _Warner(path)
    images = _images(data, path, warner, need_caption=True)
    boxes: dict[Any, tuple[Box, Any, dict | None]] = {}
    for k, ann in enumerate(_top_list(data, "annotations", path)):
        try:
            image_id = _field(ann, "image_id", (int, str))
            if image_id not in images:
                raise _Skip(f"image_id {image_id!r} has no image record")
            rec = images[image_id]
            if image_id in boxes:
                continue  # MDETR refexp records have one annotation; keep the first
            box = _xywh_box(ann, rec["width"], rec["height"])
            boxes[image_id] = (box, ann.get("original_id", ann.get("id")), _mask(ann, rec, k, warner))
        except _Skip as exc:
            warner.skip(f"annotations[{k}]", str(exc))
    grouped: dict[Any, tuple[dict, list[PromptRecord], dict[Any, Box]]] = {}
    for image_id, rec in images.items():
        if image_id not in boxes:
            warner.skip(f"image {image_id!r}", "no usable annotation with a 'bbox'")
            continue
        box, object_id, mask = boxes[image_id]
        original = rec.get("original_img_id", rec.get("original_id", rec["file_name"]))
        caption = rec["caption"].strip()
        prompt = (PromptRecord("refer", caption, target_box=box, ref_id=str(image_id), target_mask=mask)
                  if task == "refer" else
                  PromptRecord("region", caption, box=box, target_box=box, ref_id=str(image_id),
                               target_mask=mask))
        entry = grouped.setdefault(original, (rec, [], {}))
        entry[1].append(prompt)
        entry[2].setdefault(object_id if object_id is not None else box, box)
    warner.done()
    return [_sample(rec, image_dir, prompts, list(objs.values()), source, original)
            for original, (rec, prompts, objs) in grouped.items()]


# ---- Visual Genome (GRiT) and COCO captions ------------------------------------------------------------

def _grouped_annotations(path: Path, data: Any, images: dict, warner: _Warner, parse: Callable[[dict, dict], Any]):
    per_image: dict[Any, list] = {}
    for k, ann in enumerate(_top_list(data, "annotations", path)):
        try:
            image_id = _field(ann, "image_id", (int, str))
            if image_id not in images:
                raise _Skip(f"image_id {image_id!r} has no image record")
            per_image.setdefault(image_id, []).append(parse(ann, images[image_id]))
        except _Skip as exc:
            warner.skip(f"annotations[{k}]", str(exc))
    return per_image


INSTANCE_MATCH_IOU = 0.9  # a region takes an instance's mask when their boxes overlap at least this much


def load_vg(path: str | Path, image_dir: str | Path, *, source: str = "vg",
            instances: str | Path | None = None) -> list[GroundedSample]:
    """GRiT Visual Genome json -> one sample per image with one region prompt per region (file order).

    ``instances``: a COCO instances json (``segmentation`` per annotation, e.g. ``instances_<split>.json`` of
    a synthetic folder) of the same images: a region whose image id has an instance with the same box (IoU
    >= :data:`INSTANCE_MATCH_IOU`; the same annotation id first) gets that instance's mask as ``target_mask``,
    so region prompts train the mask decoder too. Regions without a match keep no mask.
    """
    path, image_dir = Path(path), Path(image_dir)
    data = _read_json(path)
    warner = _Warner(path)
    images = _images(data, path, warner)

    def parse(ann: dict, rec: dict) -> tuple[Box, str, str]:
        return _xywh_box(ann, rec["width"], rec["height"]), _text(ann, "caption"), str(ann.get("id", ""))

    per_image = _grouped_annotations(path, data, images, warner, parse)
    warner.done()
    masks = load_instance_masks(instances) if instances is not None else {}
    out = []
    for image_id, regions in per_image.items():
        objects = masks.get(image_id, [])
        prompts = [PromptRecord("region", cap, box=box, target_box=box, ref_id=rid,
                                target_mask=_matching_mask(box, rid, objects))
                   for box, cap, rid in regions]
        out.append(_sample(images[image_id], image_dir, prompts, [b for b, _, _ in regions], source, image_id))
    return out


def load_instance_masks(path: str | Path) -> dict[Any, list[tuple[str, Box, dict]]]:
    """COCO instances json -> per image id: (annotation id, xyxy box, mask as compressed RLE of the image
    record's size) of every annotation with a usable ``segmentation`` (malformed ones are warned and skipped)."""
    path = Path(path)
    data = _read_json(path)
    warner = _Warner(path)
    images = _images(data, path, warner)
    out: dict[Any, list[tuple[str, Box, dict]]] = {}
    for k, ann in enumerate(_top_list(data, "annotations", path)):
        try:
            image_id = _field(ann, "image_id", (int, str))
            if image_id not in images:
                raise _Skip(f"image_id {image_id!r} has no image record")
            rec = images[image_id]
            box = _xywh_box(ann, rec["width"], rec["height"])
        except _Skip as exc:
            warner.skip(f"annotations[{k}]", str(exc))
            continue
        mask = _mask(ann, rec, k, warner)
        if mask is not None:
            out.setdefault(image_id, []).append((str(ann.get("id", "")), box, mask))
    warner.done()
    return out


def _box_iou(a: Box, b: Box) -> float:
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _matching_mask(box: Box, region_id: str, objects: list[tuple[str, Box, dict]]) -> dict | None:
    """The mask of the instance whose box is the region's (the same id first, then the best IoU)."""
    best, best_key = None, (False, INSTANCE_MATCH_IOU)
    for ann_id, obj_box, mask in objects:
        overlap = _box_iou(box, obj_box)
        key = (bool(region_id) and ann_id == region_id, overlap)
        if overlap >= INSTANCE_MATCH_IOU and key >= best_key:
            best, best_key = mask, key
    return best


def load_coco_captions(path: str | Path, image_dir: str | Path, *, source: str = "coco_captions") -> list[GroundedSample]:
    """COCO captions json -> one sample per image with one caption prompt per caption."""
    path, image_dir = Path(path), Path(image_dir)
    data = _read_json(path)
    warner = _Warner(path)
    images = _images(data, path, warner)
    per_image = _grouped_annotations(path, data, images, warner,
                                     lambda ann, rec: (_text(ann, "caption"), str(ann.get("id", ""))))
    warner.done()
    return [_sample(images[i], image_dir, [PromptRecord("caption", c, ref_id=r) for c, r in caps], [], source, i)
            for i, caps in per_image.items()]


# ---- Localized Narratives ------------------------------------------------------------------------------

def default_ln_file_name(image_id: str) -> str:
    """COCO naming, as the LN release assumes: ``%012d.jpg`` for numeric ids, else ``<id>.jpg``."""
    return f"{int(image_id):012d}.jpg" if image_id.isdigit() else f"{image_id}.jpg"


def _interp(ts: np.ndarray, t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Linear interpolation with linear extrapolation at both ends (scipy ``interp1d`` semantics)."""
    out = np.interp(ts, t, v)
    if len(t) >= 2:
        for sel, (i, j) in ((ts < t[0], (0, 1)), (ts > t[-1], (-2, -1))):
            dt = t[j] - t[i]
            if sel.any() and dt > 0:
                out[sel] = v[i] + (ts[sel] - t[i]) * (v[j] - v[i]) / dt
    return out


def utterance_boxes(timed_caption: list[dict], traces: list[list[dict]],
                    num_samples: int = LN_SAMPLES_PER_UTTERANCE) -> tuple[list[Box | None], list[bool]]:
    """Per utterance: the bbox of ``num_samples`` interpolated trace points in [start, end] (clipped to
    [0, 1]) and its validity (non-empty text, trace centre with both coordinates > 1e-5)."""
    points = sorted(((float(p["t"]), float(p["x"]), float(p["y"])) for seg in traces for p in seg),
                    key=lambda p: p[0])
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    t, x, y = arr[:, 0], arr[:, 1], arr[:, 2]
    boxes: list[Box | None] = []
    valid: list[bool] = []
    if not timed_caption:
        return boxes, valid
    start = np.asarray([float(u["start_time"]) for u in timed_caption])
    end = np.asarray([float(u["end_time"]) for u in timed_caption])
    ts = start[:, None] + (end - start)[:, None] * np.linspace(0.0, 1.0, num_samples)[None, :]  # [U, 16]
    xs = _interp(ts.ravel(), t, x).reshape(ts.shape)
    ys = _interp(ts.ravel(), t, y).reshape(ts.shape)
    dur = end - start
    safe = np.where(dur < 1e-5, 1.0, dur)
    dts = np.diff(ts, axis=1)
    cx = np.where(dur < 1e-5, xs.mean(1), np.sum((xs[:, 1:] + xs[:, :-1]) / 2 * dts, axis=1) / safe)
    cy = np.where(dur < 1e-5, ys.mean(1), np.sum((ys[:, 1:] + ys[:, :-1]) / 2 * dts, axis=1) / safe)
    lo = np.clip(np.stack([xs.min(1), ys.min(1)], 1), 0.0, 1.0)
    hi = np.clip(np.stack([xs.max(1), ys.max(1)], 1), 0.0, 1.0)
    for k, u in enumerate(timed_caption):
        ok = bool(str(u["utterance"]).strip()) and cx[k] > 1e-5 and cy[k] > 1e-5
        valid.append(ok)
        boxes.append((float(lo[k, 0]), float(lo[k, 1]), float(hi[k, 0]), float(hi[k, 1])) if ok else None)
    return boxes, valid


def _ln_record(rec: Any) -> tuple[str, PromptRecord]:
    image_id = str(_field(rec, "image_id", (str, int)))
    caption = _text(rec, "caption")
    timed = _field(rec, "timed_caption", list)
    traces = _field(rec, "traces", list)
    try:
        for u in timed:
            float(u["start_time"]), float(u["end_time"]), str(u["utterance"])
        n_points = sum(len(seg) for seg in traces)
        boxes, valid = utterance_boxes(timed, traces) if n_points > 1 else ([], [])
    except (KeyError, TypeError, ValueError) as exc:
        raise _Skip(f"malformed 'timed_caption' or 'traces' ({type(exc).__name__}: {exc})") from exc
    if n_points <= 1:
        raise _Skip("'traces' has at most one point")
    prompt = PromptRecord("trace", caption, utterances=tuple(str(u["utterance"]) for u in timed),
                          utterance_valid=tuple(valid), utterance_boxes_rel=tuple(boxes),
                          ref_id=str(rec.get("annotator_id", "")))
    return image_id, prompt


def load_localized_narratives(paths: str | Path | Iterable[str | Path], image_dir: str | Path, *,
                              file_name: Callable[[str], str] = default_ln_file_name,
                              source: str = "ln") -> list[GroundedSample]:
    """LN JSONL file(s) -> one sample per image, one trace prompt per narrative.

    LN states no image size, so samples have ``width``/``height`` None and utterance boxes are relative.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    image_dir = Path(image_dir)
    grouped: dict[str, list[PromptRecord]] = {}
    for path in map(Path, paths):
        warner = _Warner(path)
        if not path.is_file():
            raise AnnotationError(f"Localized Narratives file {path} not found; check the path")
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise _Skip(f"not JSON ({exc})") from exc
                    image_id, prompt = _ln_record(rec)
                except _Skip as exc:
                    warner.skip(f"line {lineno}", str(exc))
                    continue
                grouped.setdefault(image_id, []).append(prompt)
        warner.done()
    return [GroundedSample(image=image_dir / file_name(i), prompts=p, image_id=i, source=source)
            for i, p in grouped.items()]
