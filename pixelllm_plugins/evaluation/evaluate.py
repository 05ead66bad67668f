"""Drive any ``PredictorProtocol`` (in-process ``Predictor``, ``RemotePredictor``, a fake) over a data folder.

The folder uses the public formats the generator writes (``refcoco_<split>.json``, ``vg_<split>.json``,
``ln_<split>.jsonl``, ``coco_captions_<split>.json``, images under ``images/<split>/``). Tasks:

- ``refer``: RefCOCO box P@0.5 (IoU > 0.5) of the top detection per expression (spec 6.1);
- ``region``: location-conditioned captioning on the VG regions: BLEU-4 / METEOR / ROUGE-L / CIDEr against
  the region's caption (spec 6.3) plus attribute accuracy, from the GT boxes and from loose boxes (each side
  moved out by 5 % of the box's size, as people draw them: ``loose_box_attribute_accuracy``);
- ``dense``: dense-captioning mAP on VG with the Visual Genome protocol (spec 6.2);
- ``trace``: point L1 of the teacher-forced GT narrative (spec 6.5). It needs per-token points, which the
  protocol does not return: it runs through the predictor's in-process model (``predictor.model`` and
  ``predictor.tokenizer``, as ``Predictor`` has) or :func:`trace_l1_from_model`; otherwise it is skipped
  with a notice;
- ``caption`` (not in the defaults): COCO-style whole-image captioning scores (spec 6.4), plus the caption
  object F1: the ``(size, colour, shape)`` objects each caption names against the image's objects, as
  listed by the VG region captions of the split (``vg_<split>.json``: one "size colour shape" caption per
  object in the synthetic data; the instances json names only the shape). Micro precision / recall / F1
  over the split (``caption_object_*``) and the per-image means (``caption_object_*_per_image``);
  ``caption_object_f1_references`` is the same F1 of the GT captions themselves (they name at most three
  objects, so recall below 1 is expected);
- ``segment`` (not in the defaults): masks from ``predictor.segment`` against the RefCOCO ``segmentation``
  masks, for three prompts: text -> mask per expression (``cIoU``, ``mIoU``, ``P@0.5``), box -> mask per
  referred object with its GT box (``box_*``) and point -> mask per referred object with one positive point
  inside its GT mask (``point_*``: :func:`~.metrics.interior_point`, the pixel farthest from the border).
  ``ring_*`` / ``box_ring_*`` / ``point_ring_*``: the same on the objects whose GT mask has a hole (rings),
  so a mask that fills the hole scores lower. Skipped with a notice when the predictor cannot segment (no
  mask decoder and no mask engine) or the data has no masks; a prompt whose call fails counts as an empty
  mask (``failed_prompts``); a prompt kind whose every prompt fails is reported as null, not 0, and points
  are left out (with a notice) for a model's own decoder without ``prompt.points``.

``limit`` caps the number of images per task (the first ones, in file order). :func:`evaluate_splits`
evaluates several splits and keys the results by split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.formats import SyntheticDataset
from ..data.types import GroundedSample
from ..geometry import clip_box
from ..inference.protocol import PredictorProtocol
from .metrics import (
    DenseDetection,
    DenseGT,
    EvaluationError,
    attribute_accuracy,
    box_iou_matrix,
    box_precision,
    caption_object_f1,
    caption_objects,
    caption_scores,
    densecap_map,
    ece_floor,
    expected_calibration_error,
    has_holes,
    interior_point,
    mask_intersection_union,
    mask_scores_from_counts,
    trace_point_l1,
    trace_point_l1_image,
)

log = logging.getLogger(__name__)

TASKS = ("refer", "region", "dense", "trace", "caption", "segment")
DEFAULT_TASKS = ("refer", "region", "dense", "trace")
SEGMENT_PROMPTS = ("text", "box", "point")


# ---- data ---------------------------------------------------------------------------------------------

def load_task_samples(data_dir: str | Path, split: str, task: str, limit: int | None = None) -> list[GroundedSample]:
    """The samples of one task, read with the ``data`` loaders (first ``limit`` images)."""
    from ..data.loaders import load_coco_captions, load_localized_narratives, load_refcoco, load_vg

    ds = SyntheticDataset.at(data_dir, split)
    files = {"refer": ds.refcoco, "region": ds.vg, "dense": ds.vg, "trace": ds.ln, "caption": ds.coco_captions,
             "segment": ds.refcoco}
    if task not in files:
        raise EvaluationError(f"unknown evaluation task {task!r}; choose from {TASKS}")
    path = files[task]
    if not path.is_file():
        raise EvaluationError(f"{task}: {path} not found; write the split with "
                              f"`pixelllm synth --out {data_dir} --split {split}` or export it in that format")
    if task in ("refer", "segment"):
        samples = load_refcoco(path, ds.image_dir, task="refer", source=task)
    elif task in ("region", "dense"):
        samples = load_vg(path, ds.image_dir, source=task)
    elif task == "trace":
        samples = load_localized_narratives(path, ds.image_dir, source="trace")
    else:
        samples = load_coco_captions(path, ds.image_dir, source="caption")
    return samples[:limit] if limit is not None else samples


def _chunks(items: Sequence, size: int):
    for k in range(0, len(items), max(1, size)):
        yield items[k:k + size]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


# ---- tasks --------------------------------------------------------------------------------------------

@dataclass
class ReferOutcomes:
    """Per expression: the predicted box (None when nothing came back), the target, IoU and score."""

    preds: list = field(default_factory=list)
    gts: list = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def right(self) -> list[bool]:
        return [v >= 0.5 for v in self.ious]


def refer_outcomes(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                   progress: bool = False, adapter: str | None = None) -> ReferOutcomes:
    out_ = ReferOutcomes()
    with _bar(len(samples), "refer", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            texts = [[p.text for p in s.prompts] for s in chunk]
            out = predictor.refer([s.image for s in chunk], texts, adapter=adapter)
            for sample, per_text in zip(chunk, out):
                for prompt, dets in zip(sample.prompts, per_text):
                    best = dets[0] if dets else None
                    out_.preds.append(best.box_xyxy if best else None)
                    out_.gts.append(prompt.target_box)
                    out_.scores.append(best.score if best else 0.0)
                    out_.ious.append(float(box_iou_matrix([best.box_xyxy], [prompt.target_box])[0, 0])
                                     if best else 0.0)
            bar.update(len(chunk))
    return out_


def eval_refer(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
               progress: bool = False, adapter: str | None = None) -> dict:
    o = refer_outcomes(predictor, samples, batch_size, progress, adapter)
    return {"P@0.5": box_precision(o.preds, o.gts), "mean_IoU": float(np.mean(o.ious)) if o.ious else math.nan,
            "mean_score": float(np.mean(o.scores)) if o.scores else math.nan,
            "score_ECE": expected_calibration_error(o.scores, o.right) if o.scores else math.nan,
            "score_ECE_floor": ece_floor(o.scores) if o.scores else math.nan,
            "count": len(o.gts), "images": len(samples)}


# Loose boxes: each side of the GT box moved out by this fraction of its width or height (clipped to the
# image), as labellers and region proposals draw them. Captions that read the shape from the box's exact
# extent instead of the pixels lose most here.
LOOSE_BOX_GROWTH = 0.05


def loose_box(box, size: tuple[int, int], growth: float = LOOSE_BOX_GROWTH) -> list[float]:
    """``box`` (x1, y1, x2, y2) grown by ``growth`` of its width / height on every side, clipped to ``size``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = growth * (x2 - x1), growth * (y2 - y1)
    return list(clip_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy), *size))


def _sample_size(sample: GroundedSample) -> tuple[int, int]:
    if sample.width and sample.height:
        return int(sample.width), int(sample.height)
    if isinstance(sample.image, Image.Image):
        return sample.image.size
    with Image.open(sample.image) as im:  # the header only
        return im.size


def _region_captions(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int, progress: bool,
                     adapter: str | None, desc: str, growth: float = 0.0) -> list[str]:
    preds: list[str] = []
    with _bar(len(samples), desc, progress) as bar:
        for chunk in _chunks(samples, batch_size):
            boxes = [[p.box for p in s.prompts] for s in chunk]
            if growth:
                sizes = [_sample_size(s) for s in chunk]  # one header read per image, not per box
                boxes = [[loose_box(b, size, growth) for b in image_boxes] for image_boxes, size in zip(boxes, sizes)]
            out = predictor.caption_regions([s.image for s in chunk], boxes, adapter=adapter)
            for sample, caps in zip(chunk, out):
                if len(caps) != len(sample.prompts):
                    raise EvaluationError(f"caption_regions returned {len(caps)} captions for "
                                          f"{len(sample.prompts)} boxes of image {sample.image_id}")
                preds += [c.text for c in caps]
            bar.update(len(chunk))
    return preds


def eval_region(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                progress: bool = False, adapter: str | None = None, meteor: bool = True,
                loose_growth: float = LOOSE_BOX_GROWTH) -> dict:
    """Captioning scores and attribute accuracy from the GT boxes; where the captions carry attribute words,
    also ``loose_box_attribute_accuracy``: the same from boxes grown by ``loose_growth`` per side (0: skip)."""
    preds = _region_captions(predictor, samples, batch_size, progress, adapter, "region")
    refs = [p.text for s in samples for p in s.prompts]
    scores = caption_scores(preds, [[r] for r in refs], meteor=meteor).to_dict()
    scores["attribute_accuracy"] = attribute_accuracy(preds, refs)
    if loose_growth > 0 and not math.isnan(scores["attribute_accuracy"]):
        loose = _region_captions(predictor, samples, batch_size, progress, adapter, "region, loose boxes",
                                 loose_growth)
        scores["loose_box_attribute_accuracy"] = attribute_accuracy(loose, refs)
        scores["loose_box_growth"] = loose_growth
    scores["images"] = len(samples)
    return scores


def eval_dense(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
               progress: bool = False, adapter: str | None = None, max_regions: int = 50,
               min_score: float = 0.0, meteor: bool = True) -> dict:
    dets, gts = [], []
    with _bar(len(samples), "dense", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            out = predictor.dense_caption([s.image for s in chunk], max_regions=max_regions, min_score=min_score,
                                          adapter=adapter)
            for sample, regions in zip(chunk, out):
                dets.append([DenseDetection(tuple(r.box_xyxy), r.text, float(r.score)) for r in regions])
                gts.append(DenseGT([tuple(p.box) for p in sample.prompts], [p.text for p in sample.prompts]))
            bar.update(len(chunk))
    meteor_fn = None if meteor else (lambda pairs: [1.0] * len(pairs))
    result = densecap_map(dets, gts, meteor_fn=meteor_fn)
    if not meteor:
        result["mAP"] = None
        result.pop("breakdown", None)
        result["notices"].append("METEOR disabled: only mAP_detection reported")
    result["images"] = len(samples)
    return result


def scene_objects_from_vg(data_dir: str | Path, split: str) -> tuple[dict[str, list[tuple[str, str, str]]], str | None]:
    """Each image's objects as ``(size, colour, shape)`` triples, from the split's VG region captions (one
    "size colour shape" caption per object in the synthetic data), keyed by image path; and a notice when
    there are none (no VG file, or captions outside the scene vocabulary)."""
    try:
        samples = load_task_samples(data_dir, split, "dense")
    except EvaluationError as exc:
        return {}, f"caption object F1 skipped: {exc}"
    objects = {str(s.image): [t for p in s.prompts for t in caption_objects(p.text)] for s in samples}
    if not any(objects.values()):
        return {}, ("caption object F1 skipped: no VG region caption of the split names a (size, colour, "
                    "shape) object of the synthetic vocabulary")
    return objects, None


def _caption_object_report(samples: list[GroundedSample], preds: list[str], refs: list[list[str]],
                           scene_objects: dict[str, list[tuple[str, str, str]]]) -> tuple[dict, list[str]]:
    keep = [k for k, s in enumerate(samples) if str(s.image) in scene_objects]
    notices = []
    if len(keep) < len(samples):
        notices.append(f"caption object F1: {len(samples) - len(keep)} of {len(samples)} images have no VG "
                       "regions and are left out")
    if not keep:
        return {}, notices + ["caption object F1 skipped: no captioned image has VG regions"]
    scenes = [scene_objects[str(samples[k].image)] for k in keep]
    f1 = caption_object_f1([preds[k] for k in keep], scenes)
    ref_f1 = caption_object_f1([r for k in keep for r in refs[k]],
                               [s for k, s in zip(keep, scenes) for _ in refs[k]])
    report = {f"caption_object_{key}": f1[key] for key in ("f1", "precision", "recall", "f1_per_image",
                                                           "precision_per_image", "recall_per_image")}
    report |= {"caption_objects_named": f1["predicted"], "caption_objects_matched": f1["matched"],
               "caption_objects_in_scenes": f1["ground_truth"], "caption_object_images": f1["images"],
               "caption_object_f1_references": ref_f1["f1"]}
    return report, notices


def eval_caption(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                 progress: bool = False, adapter: str | None = None, meteor: bool = True,
                 scene_objects: dict[str, list[tuple[str, str, str]]] | None = None) -> dict:
    """COCO caption scores; with ``scene_objects`` (image path -> its objects' triples, see
    :func:`scene_objects_from_vg`) also the caption object F1."""
    preds, refs = [], []
    with _bar(len(samples), "caption", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            out = predictor.caption([s.image for s in chunk], trace=False, adapter=adapter)
            preds += [c.text for c in out]
            refs += [[p.text for p in s.prompts] for s in chunk]
            bar.update(len(chunk))
    result = caption_scores(preds, refs, meteor=meteor).to_dict()
    result["images"] = len(samples)
    if scene_objects is not None:
        report, notices = _caption_object_report(samples, preds, refs, scene_objects)
        result |= report
        result.setdefault("notices", []).extend(notices)
    return result


# ---- segment --------------------------------------------------------------------------------------------

_NO_SEGMENT_HINT = "pass --mask-engine sam:PATH (a local SAM checkpoint folder) or set PIXELLLM_MASK_ENGINE"


def segment_unavailable(predictor) -> str | None:
    """Why ``predictor`` cannot segment, or None when it can (or may: a remote predictor tells on its
    first call). An in-process ``Predictor`` segments with its own mask decoder
    (``config.heads.mask_decoder > 0``) or its mask engine."""
    if not callable(getattr(predictor, "segment", None)):
        return f"{type(predictor).__name__} has no segment method"
    if not hasattr(predictor, "mask_engine"):
        return None
    if hasattr(predictor, "mask_source"):  # "sam" / "model" / None
        source = predictor.mask_source
    else:
        heads = getattr(getattr(predictor, "config", None), "heads", None)
        source = ("engine" if predictor.mask_engine is not None
                  else "model" if int(getattr(heads, "mask_decoder", 0) or 0) > 0 else None)
    if source is None:
        return f"the model has no mask decoder and no mask engine is given; {_NO_SEGMENT_HINT}"
    return None


def _cannot_segment(exc: Exception) -> bool:
    """An error that says the predictor cannot segment at all (not that one prompt failed)."""
    text = str(exc).lower()
    return "no mask decoder" in text or "no mask engine" in text


class _SegmentCounts:
    """Per prompt kind: (intersection, union, ring?) of every prompt."""

    def __init__(self, kinds: Sequence[str]):
        self.rows: dict[str, list[tuple[int, int, bool]]] = {k: [] for k in kinds}

    def add(self, kind: str, pred, gt: np.ndarray, ring: bool) -> None:
        inter, union = mask_intersection_union(None if pred is None else _fit(pred, gt.shape), gt)
        self.rows[kind].append((inter, union, ring))

    def summary(self) -> dict:
        out: dict = {}
        for kind, rows in self.rows.items():
            prefix = "" if kind == "text" else f"{kind}_"
            every = mask_scores_from_counts([r[0] for r in rows], [r[1] for r in rows])
            rings = [r for r in rows if r[2]]
            ring = mask_scores_from_counts([r[0] for r in rings], [r[1] for r in rings])
            out |= {f"{prefix}cIoU": every["cIoU"], f"{prefix}mIoU": every["mIoU"],
                    f"{prefix}P@0.5": every["P@0.5"], f"{prefix}count": every["count"],
                    f"{prefix}ring_mIoU": ring["mIoU"], f"{prefix}ring_count": ring["count"]}
        return out


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A predicted mask at the GT's size (nearest neighbour when the image differs from the annotation)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    return np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST), dtype=bool)


def eval_segment(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                 progress: bool = False, adapter: str | None = None,
                 prompts: Sequence[str] = SEGMENT_PROMPTS) -> dict:
    """Mask IoUs of ``predictor.segment`` on RefCOCO samples with masks (module docstring: ``segment``).

    One ``segment`` call per ``batch_size`` images, each image entered once per prompt kind (its texts, its
    objects' boxes, its objects' points), so a mask engine that caches image embeddings encodes it once. A
    call that fails is retried image by image, then prompt by prompt; a prompt that still fails is an empty
    mask."""
    from ..errors import PixelLLMError
    from ..masks import rle_to_mask

    unknown = [k for k in prompts if k not in SEGMENT_PROMPTS]
    if unknown or not prompts:
        raise EvaluationError(f"segment prompts must be some of {SEGMENT_PROMPTS}, got {list(prompts)}")
    reason = segment_unavailable(predictor)
    if reason:
        return {"skipped": f"segment: {reason}"}
    notices = []
    prompt_config = getattr(getattr(predictor, "config", None), "prompt", None)
    if ("point" in prompts and getattr(predictor, "mask_source", None) == "model"
            and not getattr(prompt_config, "points", True)):
        prompts = tuple(k for k in prompts if k != "point")
        notices.append("point -> mask skipped: the model's own mask decoder takes no point prompts "
                       "(prompt.points is false); a mask engine (--mask-engine) takes them")
        if not prompts:
            return {"skipped": "segment: " + notices[0]}
    with_masks = [s for s in samples if any(p.target_mask for p in s.prompts)]
    if not with_masks:
        return {"skipped": "segment: no referring expression of the split has a `segmentation` mask; the task "
                           "needs RefCOCO annotations with masks (pixelllm synth writes them)"}
    counts = _SegmentCounts(prompts)
    failed = dict.fromkeys(prompts, 0)
    failures: dict[str, str] = {}  # the first message per prompt kind
    images = objects = rings = 0

    def call(entries):
        """entries: (image, kind, prompt list) -> per entry a list of masks (or None per failed prompt)."""
        arg = {kind: [e[2] if e[1] == kind else None for e in entries] for kind in ("text", "box", "point")}
        try:
            out = predictor.segment([e[0] for e in entries], texts=arg["text"] if any(arg["text"]) else None,
                                    boxes=arg["box"] if any(arg["box"]) else None,
                                    points=arg["point"] if any(arg["point"]) else None, adapter=adapter)
            if len(out) != len(entries) or any(len(r) != len(e[2]) for r, e in zip(out, entries)):
                raise EvaluationError("segment answered a different number of masks than prompts")
            return [[rle_to_mask(r.mask) for r in per] for per in out]
        except PixelLLMError as exc:
            if _cannot_segment(exc):
                raise
            if len(entries) > 1:
                return [m for e in entries for m in call([e])]
            (image, kind, items), = entries
            if len(items) > 1:
                return [[m for item in items for m in call([(image, kind, [item])])[0]]]
            failed[kind] += 1
            failures.setdefault(kind, f"{kind} prompt {items[0]!r}: {exc}")
            return [[None]]

    with _bar(len(with_masks), "segment", progress) as bar:
        for chunk in _chunks(with_masks, batch_size):
            entries, targets = [], []  # targets: per entry, per prompt (GT mask, ring?)
            for sample in chunk:
                image = sample.load_image()
                expressions, seen = [], {}
                for p in sample.prompts:
                    if not p.target_mask:
                        continue
                    key = (tuple(p.target_mask["size"]), p.target_mask["counts"])
                    if key not in seen:
                        gt = rle_to_mask(p.target_mask)
                        seen[key] = (gt, has_holes(gt), p.target_box)
                    expressions.append((p.text, key))
                images += 1
                objects += len(seen)
                rings += sum(v[1] for v in seen.values())
                if "text" in prompts:
                    entries.append((image, "text", [text for text, _ in expressions]))
                    targets.append([seen[key][:2] for _, key in expressions])
                if "box" in prompts:
                    entries.append((image, "box", [list(v[2]) for v in seen.values()]))
                    targets.append([v[:2] for v in seen.values()])
                if "point" in prompts:
                    entries.append((image, "point", [list(interior_point(v[0])) for v in seen.values()]))
                    targets.append([v[:2] for v in seen.values()])
            try:
                answers = call(entries)
            except PixelLLMError as exc:  # the predictor cannot segment at all
                return {"skipped": f"segment: {exc}"}
            for (_, kind, _), masks, gts in zip(entries, answers, targets):
                for pred, (gt, ring) in zip(masks, gts):
                    counts.add(kind, pred, gt, ring)
            bar.update(len(chunk))
    result = counts.summary()
    for kind, n in failed.items():
        if not n:
            continue
        prefix = "" if kind == "text" else f"{kind}_"
        if n == result[f"{prefix}count"]:  # every prompt of the kind failed: not measured rather than 0
            for metric in ("cIoU", "mIoU", "P@0.5", "ring_mIoU"):
                result[f"{prefix}{metric}"] = None
            notices.append(f"{kind} -> mask not measured: all {n} prompts failed, e.g. {failures[kind]}")
        else:
            notices.append(f"{n} {kind} prompts failed and count as empty masks, e.g. {failures[kind]}")
    source = getattr(predictor, "mask_source", None)
    if source is not None:
        result["mask_source"] = source
    result |= {"images": images, "objects": objects, "ring_objects": rings, "prompts": list(prompts),
               "failed_prompts": sum(failed.values()), "notices": notices,
               "point_rule": "one positive point per object: the centre of the GT-mask pixel farthest from "
                             "the mask border (distance transform)"}
    if len(with_masks) < len(samples):
        notices.append(f"{len(samples) - len(with_masks)} of {len(samples)} images have no masks and are left out")
    return result


@torch.inference_mode()
def trace_l1_from_model(model, tokenizer, samples: list[GroundedSample], batch_size: int = 16, *,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        progress: bool = False) -> dict:
    """Trace point L1 (spec 6.5) of a PixelLLM on LN samples: the GT narrative is teacher-forced, every
    word-piece position's 2 predicted points are compared with its utterance-box corners (normalised)."""
    from ..data.mixture import iterate_eval_batches

    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    was_training = model.training
    model.eval()
    per_image = []
    try:
        with _bar(len(samples), "trace", progress) as bar:
            for batch in iterate_eval_batches(samples, tokenizer, model.config, batch_size, task="trace"):
                inputs = batch.to(device, dtype)
                inputs.text_loss_mask, inputs.gt_boxes = None, None  # no loss needed
                target, mask = inputs.target_points, inputs.point_mask & inputs.prompt_mask[..., None]
                inputs.target_points, inputs.point_mask = None, None
                out = model(inputs)
                pred = out.points.float().cpu().numpy()
                gt = target.float().cpu().numpy()
                valid = mask.cpu().numpy()
                b, n, t = valid.shape
                for i in range(b):
                    per_image.append(trace_point_l1_image(pred[i].reshape(n, t, 2, 2), gt[i].reshape(n, t, 2, 2),
                                                          valid[i]))
                bar.update(b)
    finally:
        model.train(was_training)
    counted = [v for v in per_image if not math.isnan(v)]
    return {"point_l1": trace_point_l1(per_image), "images": len(samples), "images_with_points": len(counted),
            "method": "teacher-forced GT narrative, per-token points"}


def eval_trace(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
               progress: bool = False, adapter: str | None = None) -> dict:
    model, tokenizer = getattr(predictor, "model", None), getattr(predictor, "tokenizer", None)
    if not isinstance(model, torch.nn.Module) or tokenizer is None:
        return {"point_l1": None, "images": 0,
                "notices": [f"trace skipped: {type(predictor).__name__} exposes no in-process model, and the "
                            "protocol returns word boxes, not the per-token points of a given caption. Evaluate "
                            "with an in-process Predictor (--model PATH) or call trace_l1_from_model(model, "
                            "tokenizer, samples)"]}
    if adapter is not None and hasattr(predictor, "_use_adapter"):
        predictor._use_adapter(adapter)
    lock = getattr(predictor, "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        return trace_l1_from_model(model, tokenizer, samples, batch_size, device=getattr(predictor, "device", None),
                                   dtype=getattr(predictor, "dtype", None), progress=progress)


# ---- the driver ----------------------------------------------------------------------------------------

def evaluate(predictor: PredictorProtocol, data_dir: str | Path, split: str = "val",
             tasks: Sequence[str] = DEFAULT_TASKS, limit: int | None = None, batch_size: int = 16,
             progress: bool = True, *, adapter: str | None = None, meteor: bool = True,
             dense_max_regions: int = 50, segment_prompts: Sequence[str] = SEGMENT_PROMPTS) -> dict:
    """Evaluate ``predictor`` on the ``split`` of ``data_dir``; returns a JSON-ready dict of metrics.

    A task whose annotation file is missing (or ``segment`` with a predictor that cannot segment, or data
    without masks) is reported as skipped (with the reason) rather than failing the whole run; an unknown
    task name raises :class:`EvaluationError`. ``segment_prompts``: which of text / box / point -> mask the
    ``segment`` task runs.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvaluationError(f"unknown evaluation task(s) {unknown}; choose from {TASKS}")
    if not Path(data_dir).is_dir():
        raise EvaluationError(f"data folder {data_dir} does not exist")
    results: dict = {"model_version": getattr(predictor, "model_version", "unknown"), "data_dir": str(data_dir),
                     "split": split, "limit": limit, "tasks": {}, "timing_s": {}}
    runners = {"refer": eval_refer, "region": eval_region, "dense": eval_dense, "trace": eval_trace,
               "caption": eval_caption, "segment": eval_segment}
    for task in tasks:
        started = time.time()
        try:
            samples = load_task_samples(data_dir, split, task, limit)
        except EvaluationError as exc:
            log.warning("%s", exc)
            results["tasks"][task] = {"skipped": str(exc)}
            continue
        kwargs: dict = {"batch_size": batch_size, "progress": progress, "adapter": adapter}
        if task in ("region", "dense", "caption"):
            kwargs["meteor"] = meteor
        if task == "dense":
            kwargs["max_regions"] = dense_max_regions
        if task == "segment":
            kwargs["prompts"] = tuple(segment_prompts)
        notice = None
        if task == "caption":
            kwargs["scene_objects"], notice = scene_objects_from_vg(data_dir, split)
        results["tasks"][task] = runners[task](predictor, samples, **kwargs)
        if notice:
            results["tasks"][task].setdefault("notices", []).append(notice)
        if "skipped" in results["tasks"][task]:
            log.warning("%s", results["tasks"][task]["skipped"])
        results["timing_s"][task] = round(time.time() - started, 2)
    return json_safe(results)


def evaluate_splits(predictor: PredictorProtocol, data_dir: str | Path, splits: Sequence[str] | str = ("val",),
                    **kwargs) -> dict:
    """:func:`evaluate` on each of ``splits`` (e.g. ``["test", "test_shift"]``). One split: exactly
    :func:`evaluate`'s dict. Several: ``{"model_version", "data_dir", "limit", "splits": {split: <evaluate's
    dict>}}`` in the given order (:func:`markdown_table` then puts the splits side by side)."""
    splits = [splits] if isinstance(splits, str) else list(dict.fromkeys(splits))
    if not splits:
        raise EvaluationError("give at least one split to evaluate")
    if len(splits) == 1:
        return evaluate(predictor, data_dir, splits[0], **kwargs)
    per_split = {split: evaluate(predictor, data_dir, split, **kwargs) for split in splits}
    first = per_split[splits[0]]
    return {"model_version": first["model_version"], "data_dir": first["data_dir"], "limit": first["limit"],
            "splits": per_split}


def is_multi_split(results: dict) -> bool:
    """True for :func:`evaluate_splits`' several-split form."""
    return isinstance(results.get("splits"), dict)


def json_safe(value):
    """NaN / inf -> None and numpy scalars -> Python numbers, so the results are strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- reports -------------------------------------------------------------------------------------------

HEADLINE = {"refer": ("P@0.5", "mean_IoU"), "region": ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L", "attribute_accuracy",
                       "loose_box_attribute_accuracy"),
            "dense": ("mAP", "mAP_detection"), "trace": ("point_l1",),
            "caption": ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L", "caption_object_f1", "caption_object_precision",
                        "caption_object_recall", "caption_object_f1_per_image"),
            "segment": ("cIoU", "mIoU", "P@0.5", "ring_mIoU", "box_mIoU", "box_ring_mIoU", "point_mIoU",
                        "point_ring_mIoU")}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _split_table(results: dict) -> str:
    """Several splits side by side: ``| task | metric | <split> | ... |``, with an ``n`` row per task."""
    per_split = results["splits"]
    names = list(per_split)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for split, res in per_split.items():
        for task, values in res.get("tasks", {}).items():
            if "skipped" in values:
                rows.setdefault((task, "skipped"), {})[split] = values["skipped"].split(";")[0].replace("|", "/")
                continue
            for metric in HEADLINE.get(task, ()):
                if metric in values:
                    rows.setdefault((task, metric), {})[split] = _fmt(values[metric])
            rows.setdefault((task, "n"), {})[split] = _fmt(values.get("count", values.get("images", "")))
    order: dict[str, int] = {}
    for task, _ in rows:
        order.setdefault(task, len(order))
    keys = sorted(rows, key=lambda k: (order[k[0]], k[1] == "n"))  # tasks as first seen, n last
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metric in keys:
        lines.append(f"| {task} | {metric} | " + " | ".join(rows[(task, metric)].get(s, "") for s in names) + " |")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """One row per headline metric: ``| task | metric | value | n |``; for :func:`evaluate_splits`' several
    splits, one column per split instead."""
    if is_multi_split(results):
        return _split_table(results)
    lines = ["| task | metric | value | n |", "|---|---|---|---|"]
    for task, values in results.get("tasks", {}).items():
        if "skipped" in values:
            lines.append(f"| {task} | skipped | {values['skipped'].split(';')[0]} | 0 |")
            continue
        n = values.get("count", values.get("images", ""))
        for metric in HEADLINE.get(task, ()):
            if metric in values:
                lines.append(f"| {task} | {metric} | {_fmt(values[metric])} | {n} |")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` and ``report.md`` into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    if is_multi_split(results):
        notices = [f"- {split} {task}: {n}" for split, r in results["splits"].items()
                   for task, v in r.get("tasks", {}).items() for n in v.get("notices", [])]
        where = "splits " + ", ".join(f"`{s}`" for s in results["splits"])
    else:
        notices = [f"- {task}: {n}" for task, v in results.get("tasks", {}).items() for n in v.get("notices", [])]
        where = f"split `{results.get('split')}`"
    md = (f"# Evaluation of `{results.get('model_version', 'unknown')}`\n\n"
          f"Data: `{results.get('data_dir')}` {where}"
          + (f", first {results['limit']} images per task" if results.get("limit") else "") + "\n\n"
          + markdown_table(results) + "\n" + ("\nNotices:\n\n" + "\n".join(notices) + "\n" if notices else ""))
    path = out / "report.md"
    path.write_text(md)
    return path
