"""Drive any ``PredictorProtocol`` (in-process ``Predictor``, ``RemotePredictor``, a fake) over a data folder.

The folder uses the public formats the generator writes (``refcoco_<split>.json``, ``vg_<split>.json``,
``ln_<split>.jsonl``, ``coco_captions_<split>.json``, images under ``images/<split>/``). Tasks:

- ``refer``: RefCOCO box P@0.5 (IoU > 0.5) of the top detection per expression (spec 6.1);
- ``region``: location-conditioned captioning on the VG regions: BLEU-4 / METEOR / ROUGE-L / CIDEr against
  the region's caption (spec 6.3) plus attribute accuracy;
- ``dense``: dense-captioning mAP on VG with the Visual Genome protocol (spec 6.2);
- ``trace``: point L1 of the teacher-forced GT narrative (spec 6.5). It needs per-token points, which the
  protocol does not return: it runs through the predictor's in-process model (``predictor.model`` and
  ``predictor.tokenizer``, as ``Predictor`` has) or :func:`trace_l1_from_model`; otherwise it is skipped
  with a notice;
- ``caption`` (not in the defaults): COCO-style whole-image captioning scores (spec 6.4).

``limit`` caps the number of images per task (the first ones, in file order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.formats import SyntheticDataset
from ..data.types import GroundedSample
from ..inference.protocol import PredictorProtocol
from .metrics import (
    DenseDetection,
    DenseGT,
    EvaluationError,
    attribute_accuracy,
    box_iou_matrix,
    box_precision,
    caption_scores,
    densecap_map,
    trace_point_l1,
    trace_point_l1_image,
)

log = logging.getLogger(__name__)

TASKS = ("refer", "region", "dense", "trace", "caption")
DEFAULT_TASKS = ("refer", "region", "dense", "trace")


# ---- data ---------------------------------------------------------------------------------------------

def load_task_samples(data_dir: str | Path, split: str, task: str, limit: int | None = None) -> list[GroundedSample]:
    """The samples of one task, read with the ``data`` loaders (first ``limit`` images)."""
    from ..data.loaders import load_coco_captions, load_localized_narratives, load_refcoco, load_vg

    ds = SyntheticDataset.at(data_dir, split)
    files = {"refer": ds.refcoco, "region": ds.vg, "dense": ds.vg, "trace": ds.ln, "caption": ds.coco_captions}
    if task not in files:
        raise EvaluationError(f"unknown evaluation task {task!r}; choose from {TASKS}")
    path = files[task]
    if not path.is_file():
        raise EvaluationError(f"{task}: {path} not found; write the split with "
                              f"`pixelllm synth --out {data_dir} --split {split}` or export it in that format")
    if task == "refer":
        samples = load_refcoco(path, ds.image_dir, task="refer", source="refer")
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

def eval_refer(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
               progress: bool = False, adapter: str | None = None) -> dict:
    preds, gts, ious, scores = [], [], [], []
    with _bar(len(samples), "refer", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            texts = [[p.text for p in s.prompts] for s in chunk]
            out = predictor.refer([s.image for s in chunk], texts, adapter=adapter)
            for sample, per_text in zip(chunk, out):
                for prompt, dets in zip(sample.prompts, per_text):
                    best = dets[0] if dets else None
                    preds.append(best.box_xyxy if best else None)
                    gts.append(prompt.target_box)
                    scores.append(best.score if best else 0.0)
                    ious.append(float(box_iou_matrix([best.box_xyxy], [prompt.target_box])[0, 0]) if best else 0.0)
            bar.update(len(chunk))
    return {"P@0.5": box_precision(preds, gts), "mean_IoU": float(np.mean(ious)) if ious else math.nan,
            "mean_score": float(np.mean(scores)) if scores else math.nan, "count": len(gts),
            "images": len(samples)}


def eval_region(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                progress: bool = False, adapter: str | None = None, meteor: bool = True) -> dict:
    preds, refs = [], []
    with _bar(len(samples), "region", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            boxes = [[p.box for p in s.prompts] for s in chunk]
            out = predictor.caption_regions([s.image for s in chunk], boxes, adapter=adapter)
            for sample, caps in zip(chunk, out):
                if len(caps) != len(sample.prompts):
                    raise EvaluationError(f"caption_regions returned {len(caps)} captions for "
                                          f"{len(sample.prompts)} boxes of image {sample.image_id}")
                preds += [c.text for c in caps]
                refs += [p.text for p in sample.prompts]
            bar.update(len(chunk))
    scores = caption_scores(preds, [[r] for r in refs], meteor=meteor).to_dict()
    scores["attribute_accuracy"] = attribute_accuracy(preds, refs)
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


def eval_caption(predictor: PredictorProtocol, samples: list[GroundedSample], batch_size: int = 16,
                 progress: bool = False, adapter: str | None = None, meteor: bool = True) -> dict:
    preds, refs = [], []
    with _bar(len(samples), "caption", progress) as bar:
        for chunk in _chunks(samples, batch_size):
            out = predictor.caption([s.image for s in chunk], trace=False, adapter=adapter)
            preds += [c.text for c in out]
            refs += [[p.text for p in s.prompts] for s in chunk]
            bar.update(len(chunk))
    result = caption_scores(preds, refs, meteor=meteor).to_dict()
    result["images"] = len(samples)
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
             dense_max_regions: int = 50) -> dict:
    """Evaluate ``predictor`` on the ``split`` of ``data_dir``; returns a JSON-ready dict of metrics.

    A task whose annotation file is missing is reported as skipped (with the reason) rather than failing
    the whole run; an unknown task name raises :class:`EvaluationError`.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvaluationError(f"unknown evaluation task(s) {unknown}; choose from {TASKS}")
    if not Path(data_dir).is_dir():
        raise EvaluationError(f"data folder {data_dir} does not exist")
    results: dict = {"model_version": getattr(predictor, "model_version", "unknown"), "data_dir": str(data_dir),
                     "split": split, "limit": limit, "tasks": {}, "timing_s": {}}
    runners = {"refer": eval_refer, "region": eval_region, "dense": eval_dense, "trace": eval_trace,
               "caption": eval_caption}
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
        results["tasks"][task] = runners[task](predictor, samples, **kwargs)
        results["timing_s"][task] = round(time.time() - started, 2)
    return json_safe(results)


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

HEADLINE = {"refer": ("P@0.5", "mean_IoU"), "region": ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L", "attribute_accuracy"),
            "dense": ("mAP", "mAP_detection"), "trace": ("point_l1",),
            "caption": ("CIDEr", "METEOR", "BLEU-4", "ROUGE-L")}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(results: dict) -> str:
    """One row per headline metric: ``| task | metric | value | n |``."""
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
    notices = [f"- {task}: {n}" for task, v in results.get("tasks", {}).items() for n in v.get("notices", [])]
    md = (f"# Evaluation of `{results.get('model_version', 'unknown')}`\n\n"
          f"Data: `{results.get('data_dir')}` split `{results.get('split')}`"
          + (f", first {results['limit']} images per task" if results.get("limit") else "") + "\n\n"
          + markdown_table(results) + "\n" + ("\nNotices:\n\n" + "\n".join(notices) + "\n" if notices else ""))
    path = out / "report.md"
    path.write_text(md)
    return path
