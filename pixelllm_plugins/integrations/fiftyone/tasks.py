"""The four operations as tasks: which fields each reads, how it checks, prepares, infers and writes a batch.

A task's constructor checks its parameters (no database); ``check`` checks the fields against a collection.
``runs`` drives the tasks over a collection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fiftyone.core.labels as fol

from ...errors import InvalidPromptError, PixelLLMError
from ...inference.protocol import PredictorProtocol
from .labels import (
    _box_xyxy,
    _refer_key,
    dense_to_detections,
    path_field_for,
    refer_to_detections,
    trace_to_labels,
)
from .params import (
    DEFAULT_CAPTION_ATTRIBUTE,
    DEFAULT_CAPTION_FIELD,
    DEFAULT_DENSE_FIELD,
    DEFAULT_REFER_FIELD,
    DEFAULT_TRACE_FIELD,
    FieldError,
    _attribute_name,
    _field_name,
    _number,
    _output_field_name,
    _prompt_list,
    _selected_labels,
    _tag,
    _texts_from,
)


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
