"""Learning from labels in FiftyOne: ``run_finetune`` trains a named LoRA adapter from a labelled view, and
``with_adapter`` makes the other runs use it.

The labels are a ``fo.Detections`` field: each detection's ``label`` is the referring expression of its box
(``caption_attribute``, if given, names an attribute holding a region caption for the same box; else the
label is the caption too); an instance ``mask`` on a detection trains the mask decoder. They are exported
in the training formats and go through the core's gated round
(``pixelllm_plugins.training.corrections.run_correction_round``: held-out slice, replay of synthetic base
scenes, the new adapter kept only if its held-out refer P@0.5 is not below the current version's).

Adapters live in :func:`adapters_dir` (``PIXELLLM_FO_ADAPTER_DIR``, default
``~/.cache/pixelllm/fiftyone/adapters``): each accepted round of adapter ``NAME`` is a folder ``NAME-v<k>``,
and ``NAME.json`` names the current one. Runs take ``adapter="NAME"`` (the current version),
``adapter="NAME-v<k>"`` or an adapter folder's path. An interrupted ``run_finetune`` started again on the
same labels resumes its training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fiftyone.core.collections as foc
import fiftyone.core.labels as fol
import numpy as np
from PIL import Image

from ...errors import InvalidParameterError, PixelLLMError
from ...geometry import clip_box, fo_relative_to_xyxy
from ...io import load_image
from ...tokenizer import validate_text
from .params import MAX_PROMPT_CHARS, FieldError, _attribute_name, _field_name, _model_name, _shown, _tag

log = logging.getLogger(__name__)

DEFAULT_ADAPTER_NAME = "fiftyone"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_VERSION = re.compile(r"(.+)-v(\d+)")

FinetuneProgress = Callable[[float, str], None]  # (fraction done, what is happening)


def adapters_dir() -> Path:
    """``PIXELLLM_FO_ADAPTER_DIR``, else ``~/.cache/pixelllm/fiftyone/adapters``."""
    env = os.environ.get("PIXELLLM_FO_ADAPTER_DIR", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "pixelllm" / "fiftyone" / "adapters"


def adapter_name(value: object, param: str = "name") -> str:
    """An adapter name: letters, digits, ``_ -``, starting with a letter or digit, at most 64 characters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_ADAPTER_NAME
    if not isinstance(value, str) or not _ADAPTER_NAME.fullmatch(value.strip()) or _VERSION.fullmatch(value.strip()):
        raise _tag(InvalidParameterError(
            f"{param} {_shown(value)} is not an adapter name; use letters, digits, '_', '-' (at most 64, "
            "starting with a letter or digit, not ending in -v<number>)"), param)
    return value.strip()


def current_version(name: str) -> str | None:
    """The folder name of adapter ``name``'s current version (``NAME-v<k>``), or None if it has none."""
    try:
        version = json.loads((adapters_dir() / f"{name}.json").read_text())["current"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) and (adapters_dir() / version).is_dir() else None


def resolve_adapter(value: object) -> tuple[str, str] | None:
    """(name, folder) of the adapter a run asks for: a trained name (its current version), a version
    ``NAME-v<k>`` or an adapter folder's path; None for none. Raises ``InvalidParameterError`` (``param``
    ``adapter``) for anything else."""
    text = _model_name(value, "adapter")
    if text is None:
        return None
    if _ADAPTER_NAME.fullmatch(text):
        version = text if (adapters_dir() / text).is_dir() else current_version(text)
        if version is not None:
            return version, str(adapters_dir() / version)
    path = Path(text).expanduser()
    if path.is_absolute() and (path / "adapter_config.json").is_file():
        return path.name, str(path)
    known = sorted(p.stem for p in adapters_dir().glob("*.json")) if adapters_dir().is_dir() else []
    raise _tag(InvalidParameterError(
        f"adapter {_shown(value)} is neither a trained adapter name nor an adapter folder (an absolute path "
        f"with adapter_config.json); trained here: {', '.join(known) or 'none'} (train one with the finetune "
        "operator)"), "adapter")


class AdapterPredictor:
    """A predictor that runs every call with one adapter; its ``model_version`` names the adapter, so labels
    made with different adapters (or versions) are told apart."""

    def __init__(self, predictor, name: str | None, adapter: str | None):
        self.predictor, self.name, self.adapter = predictor, name, adapter
        base = getattr(predictor, "base_version", None) or str(predictor.model_version).split("+")[0]
        self.model_version = f"{base}+{name}" if name else base

    def refer(self, images, texts, **kwargs):
        return self.predictor.refer(images, texts, **{**kwargs, "adapter": self.adapter})

    def caption_regions(self, images, boxes=None, points=None, **kwargs):
        return self.predictor.caption_regions(images, boxes, points, **{**kwargs, "adapter": self.adapter})

    def caption(self, images, **kwargs):
        return self.predictor.caption(images, **{**kwargs, "adapter": self.adapter})

    def dense_caption(self, images, **kwargs):
        return self.predictor.dense_caption(images, **{**kwargs, "adapter": self.adapter})

    def segment(self, images, texts=None, boxes=None, points=None, point_labels=None, **kwargs):
        return self.predictor.segment(images, texts, boxes, points, point_labels, **{**kwargs, "adapter": self.adapter})


def with_adapter(predictor, adapter: object):
    """``predictor`` running with ``adapter`` (see :func:`resolve_adapter`); itself when none is asked.
    A GPU worker gets the adapter's name (it must share the folder: ``PIXELLLM_WORKER_ADAPTER_DIR``)."""
    found = resolve_adapter(adapter)
    if found is None:
        base = getattr(predictor, "base_version", None)
        # a shared Predictor still names the adapter of its last call: these calls run without one
        return predictor if base is None or predictor.model_version == base else AdapterPredictor(predictor, None, None)
    name, path = found
    local = hasattr(predictor, "load_adapter") and not type(predictor).__name__.startswith("Remote")
    return AdapterPredictor(predictor, name, path if local else name)


# ---- export -----------------------------------------------------------------------------------------------

def _full_mask(det_mask: np.ndarray, box, width: int, height: int) -> np.ndarray | None:
    """A detection's box-cropped instance mask, resized to its box and placed in the image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if x2 <= x1 or y2 <= y1 or det_mask.ndim != 2 or not det_mask.size:
        return None
    crop = Image.fromarray(np.asarray(det_mask).astype(bool).astype(np.uint8) * 255)
    crop = np.asarray(crop.resize((x2 - x1, y2 - y1), Image.NEAREST)) >= 128
    full = np.zeros((height, width), bool)
    full[y1:y2, x1:x2] = crop
    return full if full.any() else None


def export_corrections(samples, label_field: str, out_dir: str | Path, *, caption_attribute: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the detections of ``label_field`` as ``refcoco_train.json`` / ``vg_train.json`` with the images
    under ``images/train/``; returns counts and per-sample problems (a sample that cannot be read is left
    out, not fatal)."""
    from ...data.formats import OBJECT_CATEGORIES, refcoco_entry, vg_region
    from ...masks import mask_to_rle, rle_area

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images" / "train").mkdir(parents=True)
    ref_images, ref_anns, vg_images, vg_anns, problems = [], [], [], [], []
    ids, paths, labels = samples.values(["id", "filepath", label_field])
    n_images = n_masks = 0
    for i, (sid, filepath, dets) in enumerate(zip(ids, paths, labels), start=1):
        if progress is not None:
            progress(i - 1, len(ids))
        if not isinstance(dets, fol.Detections) or not dets.detections:
            continue
        try:  # decoded whole, within the pixel limits: a truncated file is this sample's problem, not the round's
            width, height = load_image(filepath).size
        except (PixelLLMError, OSError, ValueError) as exc:
            problems.append({"sample_id": sid, "filepath": filepath, "error": f"cannot read the image: {exc}"})
            continue
        file_name = f"{sid}{Path(filepath).suffix.lower() or '.png'}"
        entry = {"file_name": file_name, "width": width, "height": height}
        regions = 0
        for k, det in enumerate(dets.detections):
            try:
                text = validate_text(det.label or "", "label", max_chars=MAX_PROMPT_CHARS)
            except PixelLLMError as exc:
                problems.append({"sample_id": sid, "filepath": filepath, "error": f"detection {k}: {exc}"})
                continue
            if det.bounding_box is None or len(det.bounding_box) != 4:
                continue
            try:
                box = clip_box(fo_relative_to_xyxy(det.bounding_box, width, height), width, height)
            except PixelLLMError as exc:  # NaN, or no area inside the image: this detection is left out
                problems.append({"sample_id": sid, "filepath": filepath, "error": f"detection {k}: {exc}"})
                continue
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            ref_id = i * 1000 + k
            extra = {}
            mask = getattr(det, "mask", None)
            full = _full_mask(mask, box, width, height) if mask is not None else None
            if full is not None:
                rle = mask_to_rle(full)
                extra = {"segmentation": rle, "area": rle_area(rle)}
                n_masks += 1
            record, annotation = refcoco_entry(entry, ref_id, text, box, original_img_id=i, sentence_id=k,
                                               dataset_name="fiftyone", **extra)
            ref_images.append(record)
            ref_anns.append(annotation)
            caption = det[caption_attribute] if caption_attribute and det.has_field(caption_attribute) else None
            caption = caption.strip() if isinstance(caption, str) and caption.strip() else text
            vg_anns.append(vg_region(ref_id, i, box, caption))
            regions += 1
        if regions:
            vg_images.append(entry | {"id": i})
            target = out_dir / "images" / "train" / file_name
            try:
                os.link(filepath, target)
            except OSError:
                shutil.copy2(filepath, target)
            n_images += 1
    if progress is not None:
        progress(len(ids), len(ids))
    if ref_anns:
        (out_dir / "refcoco_train.json").write_text(json.dumps(
            {"images": ref_images, "annotations": ref_anns, "categories": OBJECT_CATEGORIES}, sort_keys=True))
        (out_dir / "vg_train.json").write_text(json.dumps(
            {"images": vg_images, "annotations": vg_anns, "categories": OBJECT_CATEGORIES}, sort_keys=True))
    return {"images": n_images, "boxes": len(ref_anns), "masks": n_masks, "problems": problems}


# ---- the run ----------------------------------------------------------------------------------------------

@dataclass
class FinetuneSummary:
    """What ``run_finetune`` did; ``to_dict()`` is the operator's result."""

    name: str
    adapter: str | None = None  # the version runs now use (NAME-v<k>), None: still the base
    accepted: bool = False
    gate: str = ""
    new_score: float | None = None
    current_score: float | None = None
    images: int = 0
    boxes: int = 0
    masks: int = 0
    errors: list[dict] = field(default_factory=list)
    round: dict = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _fraction(value: object, param: str, low: float, high: float, default: float) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise _tag(InvalidParameterError(f"{param} must be a number from {low} to {high}, got {_shown(value)}"),
                   param)
    return float(value)


def _integer(value: object, param: str, low: int, high: int, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value) or not low <= int(value) <= high:
        raise _tag(InvalidParameterError(f"{param} must be a whole number from {low} to {high}, got "
                                         f"{_shown(value)}"), param)
    return int(value)


FINETUNE_PARAMETERS = ("label_field", "name", "caption_attribute", "model", "steps", "holdout_fraction",
                       "replay", "seed")


def finetune_kwargs(params) -> dict:
    """The checked keyword arguments of :func:`run_finetune` for the operator's ``ctx.params`` (errors carry
    ``param``), without touching a dataset or a model."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParameterError(f"the parameters must be a dict, got {type(params).__name__}")
    label_field = _field_name(params.get("label_field"), "label_field")
    if label_field is None:
        raise _tag(FieldError("label_field is required: a Detections field whose labels are the referring "
                              "expressions"), "label_field")
    caption = params.get("caption_attribute")
    return {
        "label_field": label_field,
        "name": adapter_name(params.get("name")),
        "caption_attribute": _attribute_name(caption, "caption_attribute", "") if caption else None,
        "model": _model_name(params.get("model")),
        "steps": _integer(params.get("steps"), "steps", 0, 100_000, 0),
        "holdout_fraction": _fraction(params.get("holdout_fraction"), "holdout_fraction", 0.0, 0.9, 0.25),
        "replay": _fraction(params.get("replay"), "replay", 0.0, 0.9, 0.5),
        "seed": _integer(params.get("seed"), "seed", 0, 2**31 - 1, 0),
    }


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("refcoco_train.json", "vg_train.json"):
        path = folder / name
        h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()[:12]


def _drop_cached(version: str) -> None:
    """Forget a stale adapter of that folder name in this process's cached predictors (none is stale today:
    versions are never reused; kept cheap and defensive)."""
    from ... import predictors

    for p in list(getattr(predictors, "_predictors", {}).values()):
        if version in getattr(p, "_adapter_paths", {}):
            p.unload_adapter(version)


def run_finetune(samples, *, label_field: str, name: str = DEFAULT_ADAPTER_NAME,
                 caption_attribute: str | None = None, model: str | None = None, steps: int = 0,
                 holdout_fraction: float = 0.25, replay: float = 0.5, seed: int = 0,
                 progress: FinetuneProgress | None = None, trainer=None, evaluator=None) -> FinetuneSummary:
    """Train adapter ``name`` from the ``fo.Detections`` of ``label_field`` on ``samples`` (a dataset or
    view) over ``model`` (default: the embedded model), gated against the adapter's current version (or the
    base). ``steps`` 0: chosen from the number of labelled images. ``trainer`` / ``evaluator``: see
    ``run_correction_round``; without them, called off the main thread (the App's operators), the whole round
    runs in a child process (``training.isolated``). Accepted: a new version ``NAME-v<k>`` becomes the current
    one."""
    from ...training.isolated import correction_round_isolated

    kwargs = finetune_kwargs({"label_field": label_field, "name": name, "caption_attribute": caption_attribute,
                              "model": model, "steps": steps, "holdout_fraction": holdout_fraction,
                              "replay": replay, "seed": seed})
    name = kwargs["name"]
    if not isinstance(samples, foc.SampleCollection):
        raise FieldError(f"finetune runs on a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type != "image":
        raise FieldError(f"finetune works on image collections, not {samples.media_type!r}")
    schema = samples.get_field_schema()
    field_ = schema.get(kwargs["label_field"])
    if field_ is None or getattr(field_, "document_type", None) is not fol.Detections:
        kind = "missing" if field_ is None else f"a {getattr(field_, 'document_type', type(field_)).__name__}"
        raise _tag(FieldError(f"label_field {kwargs['label_field']!r} is {kind}; name a Detections field "
                              "whose labels are the referring expressions"), "label_field")
    base = kwargs["model"]
    if base is None:
        from ...checkpoint import DEFAULT_MODEL_DIR

        base = str(DEFAULT_MODEL_DIR)
    if not Path(base).is_dir():
        raise _tag(InvalidParameterError(f"model {_shown(base)} is not a checkpoint folder: fine-tuning needs "
                                         "a trained checkpoint (leave it empty for the embedded model)"), "model")

    def report(fraction: float, label: str) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), label)

    root = adapters_dir()
    work = root / ".work" / name
    examples = work / "examples"
    exported = export_corrections(samples, kwargs["label_field"], examples,
                                  caption_attribute=kwargs["caption_attribute"],
                                  progress=lambda d, t: report(0.1 * d / max(1, t), f"exporting {d}/{t} samples"))
    summary = FinetuneSummary(name=name, adapter=current_version(name), images=exported["images"],
                              boxes=exported["boxes"], masks=exported["masks"], errors=exported["problems"][:50])
    if not exported["boxes"]:
        raise _tag(FieldError(f"no usable labelled boxes in {kwargs['label_field']!r} on this view: each "
                              "Detection needs a bounding_box and a text label (its referring expression)"),
                   "label_field")
    current = summary.adapter
    candidate = root / ".candidates" / f"{name}-candidate"
    round_dir = work / f"round-{_digest(examples)}"  # same labels: the training run resumes
    report(0.1, f"training on {exported['images']} images ({exported['boxes']} boxes)")
    result = correction_round_isolated(base, examples, candidate, current_adapter=root / current if current else None,
                                       holdout_fraction=kwargs["holdout_fraction"], replay=kwargs["replay"],
                                       seed=kwargs["seed"], steps=kwargs["steps"] or None, work_dir=round_dir,
                                       trainer=trainer, evaluator=evaluator)
    report(0.95, "gate: " + result.gate)
    summary.round, summary.gate, summary.accepted = result.to_dict(), result.gate, result.accepted
    summary.new_score, summary.current_score = result.new_score, result.current_score
    if result.accepted:
        k = int(_VERSION.fullmatch(current).group(2)) + 1 if current and _VERSION.fullmatch(current) else 1
        version = f"{name}-v{k}"
        if (root / version).exists():
            shutil.rmtree(root / version)
        os.replace(candidate, root / version)
        _drop_cached(version)
        pointer = root / f"{name}.json"
        tmp = pointer.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"current": version, "base": base, "round": result.to_dict()}, indent=1))
        os.replace(tmp, pointer)
        summary.adapter = version
        summary.message = (f"adapter {name!r} is now {version} ({result.summary()}); use it with "
                           f"adapter={name!r}")
    else:
        shutil.rmtree(candidate, ignore_errors=True)
        summary.message = (f"the new adapter was not kept ({result.summary()}); adapter {name!r} stays "
                           f"{current or 'the base model'}. Label more examples, then train again")
    shutil.rmtree(round_dir, ignore_errors=True)
    log.info("finetune %s: %s", name, summary.message)
    report(1.0, summary.message[:200])
    return summary
