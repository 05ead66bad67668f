"""FiftyOne adapter: label conversions, batched runs over a collection, and a ``fiftyone`` Model wrapper.

Everything the ``@pixelllm/pixelllm`` plugin does lives here, so that SDK users, the model zoo and the
App operators share one code path and the model stays cached in this (importable) package:

- ``run_refer`` / ``run_caption_regions`` / ``run_dense_caption`` / ``run_caption_with_trace``: batched
  inference over a sample collection, results written in bulk after every batch (an interrupted run keeps
  what it wrote), samples already labeled by the same model version for the same request skipped unless
  ``overwrite``, and per-sample errors recorded in the ``pixelllm_error`` field and the run summary.
- ``PixelLLMModel``: ``fiftyone.core.models.Model`` + ``SamplesMixin`` for ``dataset.apply_model``.
- ``download_model`` / ``load_model`` / ``resolve_input`` and ``install_zoo_source``: a local model-zoo
  source (manifest in ``fiftyone_zoo.json`` next to this file).
- ``install_plugin``: links the installed ``fiftyone_plugin`` package into ``fo.config.plugins_dir``.

Boxes: the predictor speaks ``x1, y1, x2, y2`` pixels; FiftyOne stores relative ``[x, y, w, h]``.
The conversions are the ones in ``pixelllm_plugins.geometry``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fiftyone as fo
import fiftyone.core.collections as foc
import fiftyone.core.labels as fol
import fiftyone.core.models as fom
import numpy as np
from bson import ObjectId
from PIL import Image

from ..bounds import BOUNDS
from ..bounds import check as check_bound
from ..errors import InvalidBoxError, InvalidParameterError, InvalidPromptError, PixelLLMError, RemoteError
from ..geometry import as_box, clip_box, fo_relative_to_xyxy, point_to_relative, xyxy_to_fo_relative
from ..inference import get_predictor, release_predictors
from ..inference.protocol import PredictorProtocol
from ..inference.results import Detection, RegionCaption, TracedCaption
from ..io import load_image, open_encoded
from ..tokenizer import validate_text

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REFER_FIELD", "DEFAULT_DENSE_FIELD", "DEFAULT_CAPTION_FIELD", "DEFAULT_TRACE_FIELD",
    "ERROR_FIELD", "FieldError", "RunSummary", "OPERATOR_PARAMETERS", "COMMON_PARAMETERS", "operator_kwargs",
    "RUNNERS", "PixelLLMModel", "run_refer", "run_caption_regions",
    "run_dense_caption", "run_caption_with_trace", "free_model", "refer_to_detections",
    "dense_to_detections", "trace_to_labels", "short_label", "path_field_for", "download_model",
    "load_model", "resolve_input", "install_zoo_source", "install_plugin", "ZOO_MANIFEST_PATH",
]

DEFAULT_REFER_FIELD = "pixelllm"
DEFAULT_DENSE_FIELD = "pixelllm_regions"
DEFAULT_CAPTION_FIELD = "pixelllm_caption"
DEFAULT_TRACE_FIELD = "pixelllm_trace"
DEFAULT_CAPTION_ATTRIBUTE = "caption"
DEFAULT_BATCH_SIZE = 8
ERROR_FIELD = "pixelllm_error"
MAX_REPORTED_ERRORS = 50
ZOO_MANIFEST_PATH = Path(__file__).with_name("fiftyone_zoo.json")
ZOO_SOURCE_NAME = "pixelllm"

ProgressCallback = Callable[[int, int, "RunSummary"], None]
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch: "$" would let "name\n" through
MAX_FIELD_NAME_CHARS = 200
MAX_MODEL_CHARS = 4096
MAX_PROMPT_CHARS = int(BOUNDS["max_text_chars"].high)
MAX_PROMPTS = int(BOUNDS["max_texts"].high)
# sample fields FiftyOne (or PixelLLM's error log) manages: never an output field
_RESERVED_FIELDS = frozenset({"id", "filepath", "tags", "metadata", "media_type", "frames", "created_at",
                              "last_modified_at", "dataset_id", "group", ERROR_FIELD})
# a box's own attributes: a caption written there would destroy the box
_RESERVED_ATTRIBUTES = frozenset(name for name in fol.Detection._fields_ordered) | {"id", "attributes"}


class FieldError(PixelLLMError, ValueError):
    """A field named in the request is missing or not a valid field name, or a field to write holds another
    label type."""


# ---- request checks (no database) --------------------------------------------------------------------------
#
# Every parameter of a run is checked here before the dataset is read, the model loaded or anything written.
# Numbers go through ``bounds.check``, texts through ``tokenizer.validate_text``; field names must be plain
# FiftyOne field names. Each error carries ``param``: the operator parameter it is about (the FiftyOne form
# marks that input invalid with the message).


def _shown(value: object) -> str:
    """``repr`` of a user's value, short and ASCII-safe (lone surrogates are escaped, not echoed)."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tag(exc: PixelLLMError, param: str) -> PixelLLMError:
    exc.param = param  # type: ignore[attr-defined]
    return exc


def _number(name: str, value: object, param: str) -> int | float:
    try:
        return check_bound(name, value, label=param)
    except InvalidParameterError as exc:
        raise _tag(exc, param) from None


def _flag(value: object, param: str) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _tag(InvalidParameterError(f"{param} must be true or false, got {_shown(value)}"), param)


def _field_name(value: object, param: str, *, default: str | None = None, path: bool = False) -> str | None:
    """A field name parameter, checked for form only: ``default`` when None or blank, else letters, digits and
    underscores not starting with ``_`` (``path``: such names joined by dots, an embedded field)."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise _tag(FieldError(f"{param} must be a field name (text), got {type(value).__name__}"), param)
    name = value.strip()
    if not name:
        return default
    parts = name.split(".") if path else [name]
    if len(name) > MAX_FIELD_NAME_CHARS or not all(_FIELD_NAME.fullmatch(part) and not part.startswith("_")
                                                   for part in parts):
        joined = ", parts joined by dots" if path else ""
        raise _tag(FieldError(f"{param} {_shown(value)} is not a valid field name; use letters, digits and "
                              f"underscores, not starting with '_'{joined} (at most {MAX_FIELD_NAME_CHARS} "
                              "characters)"), param)
    return name


def _output_field_name(value: object, param: str, default: str) -> str:
    name = _field_name(value, param, default=default)
    assert name is not None
    if name in _RESERVED_FIELDS:
        raise _tag(FieldError(f"{param} {name!r} is a field FiftyOne or PixelLLM manages; choose another "
                              "output field name"), param)
    return name


def _prompt_list(prompt: object, param: str = "prompt") -> list[str]:
    """The prompts of a request (one text, or a list of texts), each cleaned by ``validate_text``; ``[]`` for
    none (None, ``""`` or an empty list)."""
    if prompt is None or (isinstance(prompt, (str, list, tuple)) and len(prompt) == 0):
        return []
    try:
        if isinstance(prompt, str):
            return [validate_text(prompt, param, max_chars=MAX_PROMPT_CHARS)]
        if not isinstance(prompt, (list, tuple)):
            raise InvalidPromptError(f"{param} must be text or a list of texts, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPTS:
            _number("max_texts", len(prompt), f"the number of {param}s")
        return [validate_text(p, f"{param} {k + 1}", max_chars=MAX_PROMPT_CHARS)
                for k, p in enumerate(prompt)]
    except PixelLLMError as exc:
        raise _tag(exc, param) from None


def _model_name(model: object, param: str = "model") -> str | None:
    if model is None:
        return None
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise _tag(InvalidParameterError(f"{param} must be a checkpoint folder or a preset name (text), got "
                                         f"{type(model).__name__}"), param)
    name = model.strip()
    if not name:
        return None
    try:
        name.encode("utf-8")
        ok = len(name) <= MAX_MODEL_CHARS and not any(unicodedata.category(c) == "Cc" for c in name)
    except UnicodeEncodeError:
        ok = False
    if not ok:
        raise _tag(InvalidParameterError(f"{param} {_shown(model)} is not a checkpoint folder or a preset "
                                         "name"), param)
    return name


def _attribute_name(value: object, param: str, default: str) -> str:
    name = _field_name(value, param, default=default)
    assert name is not None
    if name in _RESERVED_ATTRIBUTES:
        raise _tag(FieldError(f"{param} {name!r} is one of a box's own attributes; choose another name"),
                   param)
    return name


def _selected_labels(selected: object) -> list[dict] | None:
    """The App's label selection (``ctx.selected_labels``), checked: dicts with a sample id, a label id and a
    field name."""
    if selected is None or (isinstance(selected, (list, tuple)) and not selected):
        return None
    if not isinstance(selected, (list, tuple)):
        raise _tag(FieldError(f"selected_labels must be a list, got {type(selected).__name__}"),
                   "selected_labels")
    out = []
    for k, s in enumerate(selected):
        what = f"selected_labels[{k}]"
        if not isinstance(s, Mapping):
            raise _tag(FieldError(f"{what} must be a dict with sample_id, label_id and field, got "
                                  f"{type(s).__name__}"), "selected_labels")
        sid, lid = s.get("sample_id"), s.get("label_id")
        if not (isinstance(sid, str) and ObjectId.is_valid(sid)) or \
                not (isinstance(lid, str) and lid.strip()):
            raise _tag(FieldError(f"{what} needs a sample_id (a sample's id) and a label_id, got "
                                  f"{_shown(sid)} and {_shown(lid)}"), "selected_labels")
        name = _field_name(s.get("field"), f"{what}.field", path=True)
        if name is None:
            raise _tag(FieldError(f"{what} names no field"), "selected_labels")
        out.append({"sample_id": sid, "label_id": lid, "field": name})
    return out


# ---- label conversions (no database) -------------------------------------------------------------------

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
            dets.append(fol.Detection(label=prompt, bounding_box=d.to_fiftyone(width, height),
                                      confidence=float(d.score), prompt=prompt,
                                      model_version=d.model_version or model_version))
    return fol.Detections(detections=dets, model_version=model_version, pixelllm_request=_refer_key(prompts))


def dense_to_detections(regions: Sequence[RegionCaption], width: float, height: float,
                        model_version: str, request: str = "") -> fol.Detections:
    """Dense-caption regions -> ``fo.Detections`` with a short ``label`` and the full ``caption``."""
    dets = [fol.Detection(label=short_label(r.text), bounding_box=r.to_fiftyone(width, height),
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


# ---- batched runs over a collection ----------------------------------------------------------------------


@dataclass
class RunSummary:
    """What a run did; ``to_dict()`` is the operator's result."""

    operation: str
    model_version: str = ""
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    labels: int = 0
    fields: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    message: str = ""

    @property
    def done(self) -> int:
        return self.processed + self.skipped + self.failed

    def add_error(self, sample_id: str, filepath: str, message: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"sample_id": sample_id, "filepath": filepath, "error": message})

    def to_dict(self) -> dict:
        return {"operation": self.operation, "model_version": self.model_version, "total": self.total,
                "processed": self.processed, "skipped": self.skipped, "failed": self.failed,
                "labels": self.labels, "fields": list(self.fields), "errors": list(self.errors),
                "message": self.message}


@dataclass
class _Item:
    id: str
    filepath: str
    values: dict[str, Any]
    error_value: str | None = None
    payload: Any = None
    image: Any = None
    error: str | None = None
    skip: bool = False
    result: Any = None


class _Task:
    """One operation: which fields it reads, how it prepares, infers and writes a batch.

    The constructor checks every parameter without touching a dataset or a model (raising a
    ``PixelLLMError``); ``check`` then checks the fields against the collection; ``attach`` gives the model.
    """

    name = ""
    label_kind = "labels"
    predictor: PredictorProtocol
    version = ""

    def attach(self, predictor: PredictorProtocol) -> None:
        self.predictor = predictor
        self.version = str(predictor.model_version)

    def read_fields(self) -> list[str]:
        return []

    def check(self, samples) -> None:
        """Request-level checks against the collection (raise ``FieldError``): nothing is written."""

    def prepare(self, item: _Item, overwrite: bool) -> None:
        """Set ``item.skip`` / ``item.error`` / ``item.payload`` before any image is loaded."""

    def infer(self, items: list[_Item]) -> list[Any]:
        raise NotImplementedError

    def write(self, dataset, items: list[_Item]) -> int:
        """Bulk-write the results of ``items``; return the number of labels written."""
        raise NotImplementedError

    def output_fields(self) -> list[str]:
        return []


def _check_output_field(samples, name: str, expected: type) -> None:
    name = _output_field_name(name, "output field", name)  # a no-op for the names the tasks checked
    schema = samples._dataset.get_field_schema()
    if name in schema:
        f = schema[name]
        doc_type = getattr(f, "document_type", None)
        if doc_type is not expected:
            kind = doc_type.__name__ if doc_type else type(f).__name__
            raise FieldError(f"field {name!r} already holds {kind}, not {expected.__name__}; choose another "
                             f"field name or delete the field first")


def _check_input_field(samples, name: str, what: str) -> None:
    if not name:
        raise _tag(FieldError(f"no {what} given"), what)
    if not samples.has_field(name):
        choices = ", ".join(sorted(samples.get_field_schema())) or "(none)"
        raise _tag(FieldError(f"the dataset has no field {name!r} ({what}); available fields: {choices}"),
                   what)


def _made_by(label, version: str, request: str | None = None) -> bool | None:
    """True: ours, same version (and request); False: ours but stale; None: not ours."""
    if label is None:
        return False
    try:
        made = label.get_field("model_version") if label.has_field("model_version") else None
    except AttributeError:
        return None
    if made is None:
        return None
    if made != version:
        return False
    if request is not None:
        stored = label.get_field("pixelllm_request") if label.has_field("pixelllm_request") else None
        return stored == request
    return True


def _check_writable(item: _Item, label, field_name: str, version: str, request: str | None,
                    overwrite: bool) -> None:
    """Skip labels made by this model version for this request; refuse to clobber foreign labels."""
    ours = _made_by(label, version, request)
    if overwrite:
        return
    if ours is True:
        item.skip = True
    elif ours is None:
        item.error = (f"field {field_name!r} already holds labels not written by PixelLLM; choose another "
                      "field or set overwrite")


class _ReferTask(_Task):
    name = "refer"

    def __init__(self, prompt, prompt_field, label_field):
        self.prompts = _prompt_list(prompt)
        self.prompt_field = _field_name(prompt_field, "prompt_field", path=True)
        self.label_field = _output_field_name(label_field, "label_field", DEFAULT_REFER_FIELD)
        if not self.prompts and not self.prompt_field:
            raise _tag(InvalidPromptError("give a prompt (a referring expression for every sample) or a "
                                          "prompt_field (a text field holding one per sample)"), "prompt")

    def check(self, samples):
        if not self.prompts:
            _check_input_field(samples, self.prompt_field, "prompt_field")
        _check_output_field(samples, self.label_field, fol.Detections)

    def read_fields(self):
        return [self.label_field] + ([self.prompt_field] if not self.prompts else [])

    def output_fields(self):
        return [self.label_field]

    def prepare(self, item, overwrite):
        if self.prompts:
            prompts = self.prompts
        else:
            prompts = _texts_from(item.values.get(self.prompt_field), self.prompt_field)
            if isinstance(prompts, str):
                item.error = prompts
                return
        item.payload = prompts
        _check_writable(item, item.values.get(self.label_field), self.label_field, self.version,
                        _refer_key(prompts), overwrite)

    def infer(self, items):
        return self.predictor.refer([i.image for i in items], [i.payload for i in items])

    def write(self, dataset, items):
        values = {}
        for i in items:
            w, h = i.image.size
            values[i.id] = refer_to_detections(i.result, i.payload, w, h, self.version)
        dataset.set_values(self.label_field, values, key_field="id", dynamic=True)
        return sum(len(v.detections) for v in values.values())


def _blank(text: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) == "Cc" for c in text)


def _texts_from(value, field_name: str) -> list[str] | str:
    """Prompts from a per-sample field value (each through ``validate_text``; blank ones dropped), or an error
    message."""
    if value is None:
        return f"prompt_field {field_name!r} is empty for this sample"
    if isinstance(value, fol.Classification):
        value = value.label
    elif isinstance(value, fol.Classifications):
        value = [c.label for c in value.classifications]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return (f"prompt_field {field_name!r} holds {type(value).__name__}; it must hold text, a list of "
                "texts or a Classification")
    texts = []
    for v in value:
        if _blank(v):
            continue
        try:
            texts.append(validate_text(v, f"prompt_field {field_name!r}", max_chars=MAX_PROMPT_CHARS))
        except InvalidPromptError as exc:
            return str(exc)
    if not texts:
        return f"prompt_field {field_name!r} holds an empty prompt for this sample"
    if len(texts) > MAX_PROMPTS:
        return (f"prompt_field {field_name!r} holds {len(texts)} expressions for this sample, more than the "
                f"limit of {MAX_PROMPTS}")
    return texts


class _CaptionRegionsTask(_Task):
    name = "caption_regions"

    def __init__(self, boxes_field, caption_attribute, selected_labels, max_new_tokens, num_beams):
        self.boxes_field = _field_name(boxes_field, "boxes_field", path=True)
        self.attr = _attribute_name(caption_attribute, "caption_attribute", DEFAULT_CAPTION_ATTRIBUTE)
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        selected_labels = _selected_labels(selected_labels)
        # field -> set of label ids, or None for every box of boxes_field
        self.selected: dict[str, set[str]] | None = None
        if selected_labels:
            self.selected = {}
            for s in selected_labels:
                self.selected.setdefault(s["field"], set()).add(s["label_id"])

    def fields(self) -> list[str]:
        return sorted(self.selected) if self.selected is not None else [self.boxes_field]

    def check(self, samples):
        if self.selected is None and not self.boxes_field:
            self.boxes_field = _first_detections_field(samples)
            if self.boxes_field is None:
                raise _tag(FieldError("the dataset has no Detections field; give boxes_field or select "
                                      "boxes"), "boxes_field")
        for name in self.fields():
            _check_input_field(samples, name, "boxes_field")

    def read_fields(self):
        return self.fields()

    def output_fields(self):
        return self.fields()

    def prepare(self, item, overwrite):
        targets, errors = [], []
        for name in self.fields():
            value = item.values.get(name)
            if value is None:
                continue
            if isinstance(value, fol.Detections):
                dets, path = value.detections, f"{name}.detections"
            elif isinstance(value, fol.Detection):
                dets, path = [value], name
            else:
                errors.append(f"boxes_field {name!r} holds {type(value).__name__}, not Detections")
                continue
            wanted = self.selected.get(name) if self.selected is not None else None
            for det in dets:
                if wanted is not None and det.id not in wanted:
                    continue
                if not overwrite and det.has_field(self.attr) and det.get_field(self.attr) and \
                        det.has_field(f"{self.attr}_model_version") and \
                        det.get_field(f"{self.attr}_model_version") == self.version:
                    continue
                targets.append((path, det))
        if errors and not targets:
            item.error = "; ".join(errors)
        elif not targets:
            item.skip = True
        item.payload = {"targets": targets, "errors": errors}

    def _boxes(self, item) -> list:
        w, h = item.image.size
        kept, boxes = [], []
        for path, det in item.payload["targets"]:
            try:
                boxes.append(_box_xyxy(det, w, h))
                kept.append((path, det))
            except PixelLLMError as exc:
                item.payload["errors"].append(f"box {det.id}: {exc}")
        item.payload["targets"] = kept
        return boxes

    def infer(self, items):
        boxes = [self._boxes(i) for i in items]
        return self.predictor.caption_regions([i.image for i in items], boxes,
                                              max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def write(self, dataset, items):
        per_path: dict[str, list[tuple]] = {}
        for i in items:
            for (path, det), region in zip(i.payload["targets"], i.result):
                per_path.setdefault(path, []).append((i.id, det.id, region))
        n = 0
        for path, rows in per_path.items():
            for suffix, get in (("", lambda r: r.text), ("_score", lambda r: float(r.score)),
                                ("_model_version", lambda r: r.model_version or self.version)):
                dataset.set_label_values(
                    f"{path}.{self.attr}{suffix}",
                    [{"sample_id": sid, "label_id": lid, "value": get(r)} for sid, lid, r in rows],
                    dynamic=True)
            n += len(rows)
        return n


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


def _first_detections_field(samples) -> str | None:
    for name, f in samples.get_field_schema().items():
        if getattr(f, "document_type", None) is fol.Detections and not name.startswith("pixelllm"):
            return name
    for name, f in samples.get_field_schema().items():
        if getattr(f, "document_type", None) is fol.Detections:
            return name
    return None


class _DenseTask(_Task):
    name = "dense_caption"

    def __init__(self, label_field, max_regions, min_score):
        self.label_field = _output_field_name(label_field, "label_field", DEFAULT_DENSE_FIELD)
        self.max_regions = int(_number("max_regions", max_regions, "max_regions"))
        self.min_score = float(_number("min_score", min_score, "min_score"))
        self.request = f"max_regions={self.max_regions};min_score={self.min_score:g}"

    def check(self, samples):
        _check_output_field(samples, self.label_field, fol.Detections)

    def read_fields(self):
        return [self.label_field]

    def output_fields(self):
        return [self.label_field]

    def prepare(self, item, overwrite):
        _check_writable(item, item.values.get(self.label_field), self.label_field, self.version,
                        self.request, overwrite)

    def infer(self, items):
        return self.predictor.dense_caption([i.image for i in items], max_regions=self.max_regions,
                                            min_score=self.min_score)

    def write(self, dataset, items):
        values = {}
        for i in items:
            w, h = i.image.size
            values[i.id] = dense_to_detections(i.result, w, h, self.version, self.request)
        dataset.set_values(self.label_field, values, key_field="id", dynamic=True)
        return sum(len(v.detections) for v in values.values())


class _TraceTask(_Task):
    name = "caption_with_trace"

    def __init__(self, caption_field, trace_field, max_new_tokens, num_beams):
        self.caption_field = _output_field_name(caption_field, "caption_field", DEFAULT_CAPTION_FIELD)
        self.trace_field = _output_field_name(trace_field, "trace_field", DEFAULT_TRACE_FIELD)
        self.path_field = _output_field_name(path_field_for(self.trace_field), "trace_field",
                                             path_field_for(self.trace_field))
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        if len({self.caption_field, self.trace_field, self.path_field}) < 3:
            raise _tag(FieldError(f"caption_field and trace_field must differ, and caption_field must not "
                                  f"be trace_field + '_path' (got {self.caption_field!r} and "
                                  f"{self.trace_field!r})"), "caption_field")

    def check(self, samples):
        _check_output_field(samples, self.caption_field, fol.Classification)
        _check_output_field(samples, self.trace_field, fol.Keypoints)
        _check_output_field(samples, self.path_field, fol.Polylines)

    def read_fields(self):
        return [self.caption_field]

    def output_fields(self):
        return [self.caption_field, self.trace_field, self.path_field]

    def prepare(self, item, overwrite):
        _check_writable(item, item.values.get(self.caption_field), self.caption_field, self.version, None,
                        overwrite)

    def infer(self, items):
        return self.predictor.caption([i.image for i in items], trace=True,
                                      max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)

    def write(self, dataset, items):
        captions, traces, paths = {}, {}, {}
        for i in items:
            w, h = i.image.size
            captions[i.id], traces[i.id], paths[i.id] = trace_to_labels(i.result, w, h, self.version)
        dataset.set_values(self.caption_field, captions, key_field="id", dynamic=True)
        dataset.set_values(self.trace_field, traces, key_field="id", dynamic=True)
        dataset.set_values(self.path_field, paths, key_field="id", dynamic=True)
        return sum(len(t.keypoints) for t in traces.values())


def _infer_isolated(task: _Task, items: list[_Item]) -> None:
    """Run the batch; if it fails, run its samples one by one so one bad sample fails alone."""
    try:
        results = task.infer(items)
        if len(results) != len(items):
            raise PixelLLMError(f"the predictor returned {len(results)} results for {len(items)} images")
        for item, res in zip(items, results):
            item.result = res
        return
    except PixelLLMError as exc:
        if len(items) == 1:
            items[0].error = str(exc)
            return
        logger.info("batch of %d failed (%s); retrying one sample at a time", len(items), exc)
    remote_errors = 0
    for item in items:
        try:
            item.result = task.infer([item])[0]
        except RemoteError as exc:
            item.error = str(exc)
            remote_errors += 1
        except PixelLLMError as exc:
            item.error = str(exc)
    if remote_errors == len(items):
        raise RemoteError(f"the GPU worker failed on every sample of a batch: {items[0].error}")


def _check_common(batch_size: object, overwrite: object, model: object) -> tuple[int, bool, object]:
    """``batch_size``, ``overwrite`` and ``model`` of a run, checked (None: the default)."""
    batch_size = int(_number("batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                             "batch_size"))
    return batch_size, _flag(overwrite, "overwrite"), _model_name(model)


def _run(task: _Task, samples, *, overwrite: bool, batch_size: int | None, model: str | None,
         predictor: PredictorProtocol | None, progress: ProgressCallback | None) -> RunSummary:
    """Check the request (parameters, then fields), load the model, then label batch after batch.

    Nothing is read from the images or written to the dataset before every check passed; from then on a
    sample that fails (missing or unreadable image, bad per-sample input) gets its error recorded and the
    others go on."""
    batch_size, overwrite, model = _check_common(batch_size, overwrite, model)
    if progress is not None and not callable(progress):
        raise InvalidParameterError(f"progress must be a callable, got {type(progress).__name__}")
    if not isinstance(samples, foc.SampleCollection):
        raise FieldError(f"PixelLLM runs on a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type != "image":
        raise FieldError(f"PixelLLM works on image collections, not {samples.media_type!r}")
    task.check(samples)
    task.attach(_predictor(predictor, model))
    summary = RunSummary(task.name, model_version=task.version)
    summary.fields = task.output_fields()
    ids = samples.values("id")
    summary.total = len(ids)
    if not ids:
        summary.message = "the target view has no samples; nothing to do"
        if progress:
            progress(0, 0, summary)
        return summary
    dataset = samples._dataset
    read = [f for f in dict.fromkeys(task.read_fields()) if samples.has_field(f)]
    extra = [ERROR_FIELD] if samples.has_field(ERROR_FIELD) else []
    prefix = f"{task.name}: "
    for start in range(0, len(ids), batch_size):
        chunk = samples.select(ids[start:start + batch_size], ordered=True)
        columns = chunk.values(["id", "filepath", *read, *extra])
        items = []
        for k in range(len(columns[0])):
            values = {name: columns[2 + j][k] for j, name in enumerate(read)}  # absent fields: None
            err = columns[-1][k] if extra else None
            items.append(_Item(columns[0][k], columns[1][k], values, err))
        for item in items:
            task.prepare(item, overwrite)
        todo = [i for i in items if not i.skip and not i.error]
        for item in todo:
            try:
                item.image = open_encoded(item.filepath)  # decoded by the predictor, or sent to a worker as is
            except PixelLLMError as exc:
                item.error = str(exc)
            except OSError as exc:  # e.g. a path too long for the file system, a file that may not be read
                item.error = f"{item.filepath}: cannot read the file ({exc.strerror or exc})"
        todo = [i for i in todo if not i.error]
        if todo:
            _infer_isolated(task, todo)
        ok = [i for i in todo if i.result is not None and not i.error]
        if ok:
            summary.labels += task.write(dataset, ok)
        errors: dict[str, str | None] = {}
        for item in items:
            if item.skip:
                summary.skipped += 1
                continue
            if item.error:
                summary.add_error(item.id, item.filepath, item.error)
                errors[item.id] = prefix + item.error
                continue
            summary.processed += 1
            box_errors = (item.payload or {}).get("errors") if isinstance(item.payload, dict) else None
            if box_errors:
                if len(summary.errors) < MAX_REPORTED_ERRORS:
                    summary.errors.append({"sample_id": item.id, "filepath": item.filepath,
                                           "error": "; ".join(box_errors)})
                errors[item.id] = prefix + "; ".join(box_errors)
            elif item.error_value and item.error_value.startswith(prefix):
                errors[item.id] = None  # this operation now succeeded: clear its old error
        if errors:
            dataset.set_values(ERROR_FIELD, errors, key_field="id")
            extra = [ERROR_FIELD] if samples.has_field(ERROR_FIELD) else []
        if progress:
            progress(summary.done, summary.total, summary)
    if summary.failed:
        summary.message = (f"{summary.failed} of {summary.total} samples failed; see the {ERROR_FIELD!r} field "
                           "and 'errors'")
    return summary


def _predictor(predictor: PredictorProtocol | None, model: str | None) -> PredictorProtocol:
    return predictor if predictor is not None else get_predictor(model or None)


def run_refer(samples, *, prompt: str | Sequence[str] | None = None, prompt_field: str | None = None,
              label_field: str = DEFAULT_REFER_FIELD, overwrite: bool = False,
              batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
              predictor: PredictorProtocol | None = None, progress: ProgressCallback | None = None) -> RunSummary:
    """Find the box a referring expression names, on every sample of ``samples``.

    ``prompt`` applies to every sample; otherwise ``prompt_field`` names a text field (a string, a list of
    strings or a Classification) holding each sample's expression(s). Writes ``fo.Detections`` to
    ``label_field``: one box per expression with ``confidence``, ``prompt`` and ``model_version``.
    """
    task = _ReferTask(prompt, prompt_field, label_field)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress)


def run_caption_regions(samples, *, boxes_field: str | None = None,
                        caption_attribute: str = DEFAULT_CAPTION_ATTRIBUTE,
                        selected_labels: Sequence[dict] | None = None, overwrite: bool = False,
                        batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
                        max_new_tokens: int = 20, num_beams: int = 1,
                        predictor: PredictorProtocol | None = None,
                        progress: ProgressCallback | None = None) -> RunSummary:
    """Caption existing boxes in place: each box of ``boxes_field`` (or each of ``selected_labels``, the
    App's selection format) gets ``<caption_attribute>``, ``<caption_attribute>_score`` and
    ``<caption_attribute>_model_version`` attributes. Label ids are kept."""
    task = _CaptionRegionsTask(boxes_field, caption_attribute, selected_labels, max_new_tokens, num_beams)
    selected_labels = _selected_labels(selected_labels)
    if selected_labels and isinstance(samples, foc.SampleCollection):
        samples = samples.select(sorted({s["sample_id"] for s in selected_labels}))
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress)


def run_dense_caption(samples, *, label_field: str = DEFAULT_DENSE_FIELD, max_regions: int = 20,
                      min_score: float = 0.3, overwrite: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                      model: str | None = None, predictor: PredictorProtocol | None = None,
                      progress: ProgressCallback | None = None) -> RunSummary:
    """Propose regions and caption each: ``fo.Detections`` with a short ``label`` and a ``caption``."""
    task = _DenseTask(label_field, max_regions, min_score)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress)


def run_caption_with_trace(samples, *, caption_field: str = DEFAULT_CAPTION_FIELD,
                           trace_field: str = DEFAULT_TRACE_FIELD, overwrite: bool = False,
                           batch_size: int = DEFAULT_BATCH_SIZE, model: str | None = None,
                           max_new_tokens: int = 40, num_beams: int = 1,
                           predictor: PredictorProtocol | None = None,
                           progress: ProgressCallback | None = None) -> RunSummary:
    """Caption every image and trace its words: a ``Classification`` in ``caption_field``, one
    ``Keypoint`` per word in ``trace_field`` and the word path as a ``Polyline`` in ``<trace_field>_path``."""
    task = _TraceTask(caption_field, trace_field, max_new_tokens, num_beams)
    return _run(task, samples, overwrite=overwrite, batch_size=batch_size, model=model, predictor=predictor,
                progress=progress)


RUNNERS: dict[str, Callable[..., RunSummary]] = {
    "refer": run_refer, "caption_regions": run_caption_regions, "dense_caption": run_dense_caption,
    "caption_with_trace": run_caption_with_trace,
}

# the parameters of each operator of the ``@pixelllm/pixelllm`` plugin (besides the common ones)
OPERATOR_PARAMETERS: dict[str, tuple[str, ...]] = {
    "refer": ("prompt", "prompt_field", "label_field"),
    "caption_regions": ("boxes_field", "caption_attribute"),
    "dense_caption": ("label_field", "max_regions", "min_score"),
    "caption_with_trace": ("caption_field", "trace_field"),
}
COMMON_PARAMETERS = ("model", "batch_size", "overwrite")
_OPERATOR_DEFAULTS = {"max_regions": 20, "min_score": 0.3}


def operator_kwargs(operation: str, params: Mapping | None) -> dict:
    """The keyword arguments of ``RUNNERS[operation]`` for an operator's ``ctx.params``, every one checked
    without touching a dataset or a model: the plugin's form and its ``execute`` both call this.

    A missing, ``None`` or ``""`` parameter takes its default; parameters the operator does not have are
    ignored. Raises ``FieldError`` (a field name), ``InvalidPromptError`` (a prompt) or
    ``InvalidParameterError`` (a number, a flag, the model), each a ``PixelLLMError`` whose ``param``
    attribute names the parameter.
    """
    if operation not in OPERATOR_PARAMETERS:
        raise InvalidParameterError(f"unknown operation {_shown(operation)}; one of "
                                    f"{', '.join(OPERATOR_PARAMETERS)}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParameterError(f"the parameters must be a dict, got {type(params).__name__}")

    def get(name):
        value = params.get(name)
        if value is None or (isinstance(value, str) and value == ""):
            return _OPERATOR_DEFAULTS.get(name)
        return value

    kwargs = {name: get(name) for name in OPERATOR_PARAMETERS[operation]}
    if operation == "refer":
        _ReferTask(kwargs["prompt"], kwargs["prompt_field"], kwargs["label_field"])
    elif operation == "caption_regions":
        _CaptionRegionsTask(kwargs["boxes_field"], kwargs["caption_attribute"], None, 20, 1)
    elif operation == "dense_caption":
        _DenseTask(kwargs["label_field"], kwargs["max_regions"], kwargs["min_score"])
    else:
        _TraceTask(kwargs["caption_field"], kwargs["trace_field"], 40, 1)
    batch_size, overwrite, model = _check_common(get("batch_size"), get("overwrite"), get("model"))
    kwargs.update(batch_size=batch_size, overwrite=overwrite, model=model)
    return kwargs


def free_model() -> int:
    """Release every cached predictor of this process (frees GPU memory); returns how many."""
    return release_predictors()


# ---- fiftyone Model wrapper (dataset.apply_model) --------------------------------------------------------

OPERATIONS = ("refer", "caption_regions", "dense_caption", "caption_with_trace")


class PixelLLMModel(fom.Model, fom.SamplesMixin):
    """PixelLLM for ``dataset.apply_model``.

    ``operation`` is one of ``refer`` (text -> box; ``prompt=`` or ``apply_model(..., prompt_field=...)``),
    ``caption_regions`` (``apply_model(..., boxes_field=...)``: returns a copy of the boxes with captions),
    ``dense_caption`` and ``caption_with_trace`` (returns a dict, written as ``<label_field>_caption``,
    ``<label_field>_trace`` and ``<label_field>_path``). Batches go to the predictor as one call.
    A sample that cannot be processed gets an empty label carrying a ``pixelllm_error`` attribute.
    """

    def __init__(self, operation: str = "refer", *, prompt: str | None = None, model: str | None = None,
                 predictor: PredictorProtocol | None = None, max_regions: int = 20, min_score: float = 0.3,
                 caption_attribute: str = DEFAULT_CAPTION_ATTRIBUTE, max_new_tokens: int | None = None,
                 num_beams: int = 1):
        fom.SamplesMixin.__init__(self)
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
        self.operation = operation
        self.prompt = prompt
        self.prompts = _prompt_list(prompt)
        self.model_name = _model_name(model)
        self._predictor = predictor
        self.max_regions = int(_number("max_regions", max_regions, "max_regions"))
        self.min_score = float(_number("min_score", min_score, "min_score"))
        self.caption_attribute = _attribute_name(caption_attribute, "caption_attribute",
                                                 DEFAULT_CAPTION_ATTRIBUTE)
        self.max_new_tokens = None if max_new_tokens is None else _number("max_new_tokens", max_new_tokens,
                                                                          "max_new_tokens")
        self.num_beams = _number("num_beams", num_beams, "num_beams")
        self._preprocess = False

    # fom.Model interface
    @property
    def media_type(self):
        return "image"

    @property
    def ragged_batches(self):
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    @property
    def predictor(self) -> PredictorProtocol:
        if self._predictor is None:
            self._predictor = get_predictor(self.model_name or None)
        return self._predictor

    @property
    def model_version(self) -> str:
        return str(self.predictor.model_version)

    def predict(self, arg, sample=None):
        return self.predict_all([arg], samples=[sample])[0]

    def _image(self, arg, sample):
        """``apply_model`` hands over FiftyOne's decoded copy. An in-process predictor takes those pixels; a
        worker gets the sample's file as it is rather than a PNG re-encoded from them."""
        if isinstance(arg, (str, os.PathLike)):
            return open_encoded(arg)
        path = getattr(sample, "filepath", None)
        if path and not callable(getattr(self.predictor, "prepare", None)):
            size = arg.size if isinstance(arg, Image.Image) else tuple(np.shape(arg)[1::-1])  # (w, h)
            with contextlib.suppress(PixelLLMError, OSError):
                encoded = open_encoded(path)
                if encoded.size == size and encoded.orientation == 1:  # the same picture FiftyOne read
                    return encoded
        return load_image(arg)

    def predict_all(self, args, samples=None):
        samples = list(samples) if samples is not None else [None] * len(args)
        images, errors = [], []
        for arg, sample in zip(args, samples):
            try:
                images.append(self._image(arg, sample))
                errors.append(None)
            except PixelLLMError as exc:
                images.append(None)
                errors.append(str(exc))
            except OSError as exc:  # e.g. a path too long for the file system
                images.append(None)
                errors.append(f"cannot read the image ({exc.strerror or exc})")
        inputs = [self._inputs(s) if e is None else e for s, e in zip(samples, errors)]
        results: list[Any] = [None] * len(args)
        ready = [k for k, x in enumerate(inputs) if not isinstance(x, str)]
        if ready:
            try:
                out = self._infer([images[k] for k in ready], [inputs[k] for k in ready])
                for k, r in zip(ready, out):
                    results[k] = r
            except PixelLLMError:
                for k in ready:
                    try:
                        results[k] = self._infer([images[k]], [inputs[k]])[0]
                    except PixelLLMError as exc:
                        inputs[k] = str(exc)
        return [self._to_labels(images[k], inputs[k], results[k]) for k in range(len(args))]

    def _inputs(self, sample):
        if self.operation == "refer":
            if self.prompts:
                return list(self.prompts)
            name = self.needs_fields.get("prompt_field")
            if not name:
                return "give prompt= or apply_model(..., prompt_field=<text field>)"
            return _texts_from(sample.get_field(name) if sample is not None and sample.has_field(name)
                               else None, name)
        if self.operation == "caption_regions":
            name = self.needs_fields.get("boxes_field")
            if not name:
                return "give apply_model(..., boxes_field=<Detections field>)"
            value = sample.get_field(name) if sample is not None and sample.has_field(name) else None
            if value is None:
                return fol.Detections()
            if not isinstance(value, fol.Detections):
                return f"boxes_field {name!r} holds {type(value).__name__}, not Detections"
            return fol.Detections.from_dict(value.to_dict())  # a copy that keeps the label ids
        return True

    def _infer(self, images, inputs):
        p = self.predictor
        kw = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
        if self.operation == "refer":
            return p.refer(images, inputs)
        if self.operation == "caption_regions":
            boxes = []
            for im, dets in zip(images, inputs):
                w, h = im.size
                boxes.append([_box_xyxy(d, w, h)
                              for d in dets.detections])
            return p.caption_regions(images, boxes, num_beams=self.num_beams, **kw)
        if self.operation == "dense_caption":
            return p.dense_caption(images, max_regions=self.max_regions, min_score=self.min_score)
        return p.caption(images, trace=True, num_beams=self.num_beams, **kw)

    def _to_labels(self, image, inputs, result):
        error = inputs if isinstance(inputs, str) else None
        version = self.model_version
        if self.operation == "caption_with_trace":
            if error:
                return {"caption": fol.Classification(pixelllm_error=error)}
            caption, trace, path = trace_to_labels(result, *image.size, version)
            return {"caption": caption, "trace": trace, "path": path}
        if error:
            return fol.Detections(pixelllm_error=error)
        w, h = image.size
        if self.operation == "refer":
            return refer_to_detections(result, inputs, w, h, version)
        if self.operation == "dense_caption":
            return dense_to_detections(result, w, h, version)
        for det, region in zip(inputs.detections, result):
            det[self.caption_attribute] = region.text
            det[f"{self.caption_attribute}_score"] = float(region.score)
            det[f"{self.caption_attribute}_model_version"] = region.model_version or version
        inputs.model_version = version
        return inputs


# ---- model zoo ---------------------------------------------------------------------------------------------


def download_model(model_name: str, model_path: str) -> None:
    """Zoo hook: the weights ship inside the ``pixelllm-plugins`` package, so only a marker is written."""
    os.makedirs(model_path, exist_ok=True)
    with open(os.path.join(model_path, "README.md"), "w") as f:
        f.write(f"# {model_name}\n\nPixelLLM weights are embedded in the pixelllm-plugins package; this folder "
                "only marks the zoo model as downloaded.\n")


def load_model(model_name: str, model_path: str, **kwargs) -> PixelLLMModel:
    """Zoo hook: ``foz.load_zoo_model("pixelllm", operation=..., prompt=..., model=...)``."""
    kwargs.setdefault("operation", "refer")
    return PixelLLMModel(**kwargs)


def resolve_input(model_name: str, ctx):
    """Zoo hook: the extra form shown by ``@voxel51/zoo/apply_zoo_model``."""
    import fiftyone.operators.types as types

    inputs = types.Object()
    inputs.enum("operation", list(OPERATIONS), default="refer", label="Task",
                view=types.DropdownView())
    inputs.str("prompt", default="", label="Referring expression (refer)")
    return types.Property(inputs)


def parse_parameters(model_name: str, ctx, params: dict) -> None:
    """Zoo hook: drop an empty prompt so a prompt_field can be used instead."""
    if not params.get("prompt"):
        params.pop("prompt", None)


_ZOO_SHIM = '''"""PixelLLM model-zoo source (written by pixelllm_plugins.integrations.fiftyone.install_zoo_source)."""
from pixelllm_plugins.integrations.fiftyone import (  # noqa: F401
    download_model, load_model, parse_parameters, resolve_input,
)
'''


def install_zoo_source(zoo_dir: str | os.PathLike | None = None) -> Path:
    """Make the model listable/loadable from the zoo: writes ``<zoo_dir>/pixelllm/{manifest.json,__init__.py}``.

    ``zoo_dir`` defaults to ``fo.config.model_zoo_dir`` (``FIFTYONE_MODEL_ZOO_DIR``). Afterwards
    ``foz.list_zoo_models()`` includes ``pixelllm`` and ``foz.load_zoo_model("pixelllm", ...)`` works.
    """
    root = Path(zoo_dir or fo.config.model_zoo_dir) / ZOO_SOURCE_NAME
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ZOO_MANIFEST_PATH, root / "manifest.json")
    (root / "__init__.py").write_text(_ZOO_SHIM)
    try:  # fiftyone memoises the manifest in some configurations
        import fiftyone.zoo.models as fozm

        fozm._invalidate_zoo_models_manifest()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return root


def plugin_source_dir() -> Path:
    """The folder of the installed ``fiftyone_plugin`` package (holds ``fiftyone.yml``)."""
    import importlib.util

    spec = importlib.util.find_spec("fiftyone_plugin")
    if spec is None or not spec.submodule_search_locations:
        raise PixelLLMError("the fiftyone_plugin package is not installed; pip install 'pixelllm-plugins[fiftyone]'")
    return Path(next(iter(spec.submodule_search_locations)))


def install_plugin(plugins_dir: str | os.PathLike | None = None, *, copy: bool = False) -> Path:
    """Link (or copy) the plugin into ``plugins_dir`` (default ``fo.config.plugins_dir``) as ``pixelllm``."""
    root = Path(plugins_dir or fo.config.plugins_dir or Path.home() / "fiftyone" / "__plugins__")
    root.mkdir(parents=True, exist_ok=True)
    target = root / "pixelllm"
    source = plugin_source_dir()
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    if copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        target.symlink_to(source, target_is_directory=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pixelllm_plugins.integrations.fiftyone install-plugin|install-zoo [--dir D] [--copy]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pixelllm_plugins.integrations.fiftyone",
                                     description="Install the PixelLLM FiftyOne plugin and model-zoo source")
    parser.add_argument("command", choices=["install-plugin", "install-zoo"])
    parser.add_argument("--dir", default=None, help="plugins dir / model zoo dir (default: FiftyOne config)")
    parser.add_argument("--copy", action="store_true", help="copy the plugin instead of linking it")
    args = parser.parse_args(argv)
    if args.command == "install-plugin":
        print(install_plugin(args.dir, copy=args.copy))
    else:
        print(install_zoo_source(args.dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
