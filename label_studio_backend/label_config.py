"""Parse a Label Studio labeling config and find the tags this backend works with.

Tags are discovered from the project's config by type and ``toName`` links, never by hard-coded names:

- the image: the ``<Image>`` object the box control points at;
- boxes: a ``<RectangleLabels>`` (or ``<Rectangle>``) control on that image;
- per-region captions: a ``<TextArea perRegion="true">`` on that image;
- the typed prompt: a ``<TextArea>`` on that image that is not per-region and shows a submit button
  (or whose name contains "prompt"); any other whole-image ``<TextArea>`` is the image caption;
- the task's referring expression: a ``<Text value="$field">`` object (batch pre-annotation reads
  ``task["data"][field]``).

Optional attributes on the box control (same convention as the upstream examples' ``model_*``):
``model_task`` (``refer`` / ``caption_regions`` / ``dense_caption`` / ``caption_trace``),
``model_score_threshold``, ``model_max_regions``, ``model_max_boxes``, ``model_default_prompt``.
The numbers are checked against ``pixelllm_plugins.bounds`` (``LabelConfig.model_options``): a value out of
range is a ``LabelConfigError`` naming the tag, the attribute and the range.
Labels map through ``<Label value="Cup" predicted_values="mug,cup"/>``.

A config is walked once (linear in its size) and refused beyond ``MAX_TAGS`` tags or ``MAX_DEPTH`` levels.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from pixelllm_plugins.bounds import check as check_bound
from pixelllm_plugins.errors import InvalidParameterError
from pixelllm_plugins.tokenizer import lone_surrogate_at

from .errors import BackendError

MAX_CONFIG_CHARS = 1_000_000
MAX_TAGS = 10_000  # Label Studio's own configs have tens of tags
MAX_DEPTH = 64  # levels of nesting (<View> in <View> ...)
# numeric model_* attributes of the box control -> their entry in pixelllm_plugins.bounds.BOUNDS
NUMERIC_ATTRS = {"model_max_regions": "max_regions", "model_max_boxes": "max_boxes",
                 "model_score_threshold": "score_threshold"}
_WORD = re.compile(r"[\w-]+")
TASKS = ("refer", "caption_regions", "dense_caption", "caption_trace", "segment")
POLYGON_TYPES = ("polygonlabels", "polygon")
BRUSH_TYPES = ("brushlabels", "brush")
_OBJECT_TAGS = {"image", "text", "hypertext", "audio", "video", "timeseries", "paragraphs", "table",
                "pdf", "html", "header"}
_CONTROL_TAGS = {"rectanglelabels", "rectangle", "textarea", "labels", "choices", "keypointlabels",
                 "keypoint", "polygonlabels", "polygon", "brushlabels", "brush", "number", "rating",
                 "taxonomy", "ellipselabels", "ellipse", "relations", "pairwise", "ranker", "datetime"}


class LabelConfigError(BackendError):
    """The labeling config is not usable (malformed XML, or missing the tags a task needs)."""


@dataclass(frozen=True)
class ModelOptions:
    """The box control's numeric ``model_*`` attributes, checked (defaults where an attribute is absent)."""

    max_regions: int = 20  # model_max_regions: dense-caption regions per image
    max_boxes: int = 1  # model_max_boxes: boxes per referring expression
    score_threshold: float | None = None  # model_score_threshold: lowest score kept (dense default: bounds.DEFAULT_MIN_SCORE)


@dataclass
class ObjectTag:
    name: str
    type: str  # lower-case tag name: image, text, ...
    value: str  # the task data key ("$image" -> "image"); "" for a literal value
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class ControlTag:
    name: str
    type: str  # lower-case: rectanglelabels, textarea, ...
    to_name: list[str]
    attrs: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    labels_attrs: dict[str, dict[str, str]] = field(default_factory=dict)
    tag: str = ""  # the tag as written (RectangleLabels), for messages

    def describe(self) -> str:
        return f'<{self.tag or self.type} name="{self.name}">'

    @property
    def per_region(self) -> bool:
        return _truthy(self.attrs.get("perregion"))

    def attr(self, name: str, default: str | None = None) -> str | None:
        return self.attrs.get(name.lower(), default)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


@dataclass
class LabelConfig:
    """A parsed config plus the roles this backend needs, resolved once."""

    xml: str
    objects: dict[str, ObjectTag]
    controls: dict[str, ControlTag]

    # ---- generic lookups (upstream: get_first_tag_occurence) ----
    def first_control(self, control_type: str | tuple[str, ...], object_type: str | None = None, *,
                      name_filter=None, to_name_filter=None) -> tuple[str, str, str] | None:
        """``(from_name, to_name, value)`` of the first matching control, like upstream's
        ``get_first_tag_occurence``; ``None`` when there is none."""
        types = (control_type,) if isinstance(control_type, str) else control_type
        types = tuple(t.lower() for t in types)
        for name, ctl in self.controls.items():
            if ctl.type not in types or (name_filter and not name_filter(name)):
                continue
            for to_name in ctl.to_name:
                obj = self.objects.get(to_name)
                if obj is None or (object_type and obj.type != object_type.lower()):
                    continue
                if to_name_filter and not to_name_filter(to_name):
                    continue
                return name, to_name, obj.value
        return None

    # ---- roles ----
    @functools.cached_property
    def box_control(self) -> ControlTag | None:
        found = self.first_control(("rectanglelabels", "rectangle"), "image")
        return self.controls[found[0]] if found else None

    @functools.cached_property
    def polygon_control(self) -> ControlTag | None:
        """``<PolygonLabels>`` (or ``<Polygon>``) on an image: masks as polygons (segmentation configs)."""
        found = self.first_control(POLYGON_TYPES, "image")
        return self.controls[found[0]] if found else None

    @functools.cached_property
    def brush_control(self) -> ControlTag | None:
        """``<BrushLabels>`` (or ``<Brush>``) on an image: masks in Label Studio's brush RLE."""
        found = self.first_control(BRUSH_TYPES, "image")
        return self.controls[found[0]] if found else None

    @property
    def mask_control(self) -> ControlTag | None:
        """Where predicted masks go: the polygon control, else the brush control (None: not a mask config)."""
        return self.polygon_control or self.brush_control

    @functools.cached_property
    def image(self) -> ObjectTag | None:
        box = self.box_control or self.mask_control
        if box is not None:
            return next(self.objects[n] for n in box.to_name if n in self.objects
                        and self.objects[n].type == "image")
        return next((o for o in self.objects.values() if o.type == "image"), None)

    @functools.cached_property
    def _image_textareas(self) -> list[ControlTag]:
        image = self.image
        if image is None:
            return []
        return [c for c in self.controls.values() if c.type == "textarea" and image.name in c.to_name]

    @functools.cached_property
    def caption_control(self) -> ControlTag | None:
        """Per-region TextArea: the caption of each box (shares the box's region id)."""
        return next((c for c in self._image_textareas if c.per_region), None)

    @functools.cached_property
    def prompt_control(self) -> ControlTag | None:
        """Whole-image TextArea where the labeller types a referring expression."""
        whole = [c for c in self._image_textareas if not c.per_region]
        for c in whole:
            if "prompt" in c.name.lower() or _truthy(c.attr("showsubmitbutton")):
                return c
        return None

    @functools.cached_property
    def image_caption_control(self) -> ControlTag | None:
        """Whole-image TextArea that is not the prompt: receives the whole-image (traced) caption."""
        prompt = self.prompt_control
        return next((c for c in self._image_textareas if not c.per_region and c is not prompt), None)

    @functools.cached_property
    def expression_object(self) -> ObjectTag | None:
        """``<Text value="$field">``: the task field holding the referring expression."""
        return next((o for o in self.objects.values() if o.type == "text" and o.value), None)

    @functools.cached_property
    def keypoint_control(self) -> ControlTag | None:
        found = self.first_control(("keypointlabels",), "image")
        return self.controls[found[0]] if found else None

    @property
    def task(self) -> str:
        """What batch pre-annotation does for this config (``model_task`` overrides). A config with a
        ``<PolygonLabels>`` or ``<BrushLabels>`` on the image segments (``segment``)."""
        box = self.box_control or self.mask_control
        explicit = (box.attr("model_task") or "").strip().lower() if box else ""
        if explicit:
            if explicit not in TASKS:
                raise LabelConfigError(f"model_task={explicit!r} on <{box.type}> is not one of {TASKS}")
            if explicit == "segment" and self.mask_control is None:
                raise LabelConfigError(f"model_task='segment' on <{box.type}> needs a <PolygonLabels> or <BrushLabels> "
                                       "on the image for the masks")
            return explicit
        if self.mask_control is not None:
            return "segment"
        if self.expression_object is not None or self.prompt_control is not None:
            return "refer"
        if self.image_caption_control is not None:
            return "caption_trace"
        return "dense_caption"

    def model_options(self) -> ModelOptions:
        """The box control's (else the mask control's) numeric ``model_*`` attributes, each checked against ``pixelllm_plugins.bounds``;
        ``LabelConfigError`` naming the tag, attribute and range for a value that is not a number or out of
        range (``model_max_regions="1000000000"`` would otherwise ask the model for a billion regions)."""
        box = self.box_control or self.mask_control
        values: dict[str, int | float] = {}
        if box is not None:
            for attr, bound in NUMERIC_ATTRS.items():
                raw = box.attr(attr)
                if raw is None or not raw.strip():
                    continue
                try:
                    values[bound] = check_bound(bound, raw, label=f"{box.describe()} {attr}")
                except InvalidParameterError as exc:
                    raise LabelConfigError(f"{exc}; fix it in the project's labeling config") from None
        return ModelOptions(**values)

    def check(self) -> str:
        """Everything a prediction needs from the config, checked once: the task (returned) and the numeric
        ``model_*`` attributes. ``LabelConfigError`` otherwise."""
        task = self.task
        self.model_options()
        return task

    # ---- labels ----
    def label_for(self, text: str, control: ControlTag | None = None) -> str | None:
        """The box label for a text: the first label whose value or ``predicted_values`` appears in the
        text as a whole word (case-insensitive); else the control's first label; ``None`` for a plain
        ``<Rectangle>``."""
        control = control or self.box_control
        if control is None or not control.labels:
            return None
        words = " " + " ".join(_WORD.findall(text.lower())) + " "
        for label in control.labels:
            names = [label] + [v for v in control.labels_attrs.get(label, {}).get("predicted_values", "")
                               .split(",")]
            for name in names:
                name = " ".join(_WORD.findall(name.lower()))
                if name and f" {name} " in words:
                    return label
        return control.labels[0]

    def build_label_map(self, tag_name: str, names: list[str]) -> dict[str, str]:
        """Model names -> config labels (upstream ``build_label_map``): exact label values and every
        entry of ``predicted_values``, case-insensitive."""
        control = self.controls.get(tag_name)
        if control is None:
            return {}
        lookup: dict[str, str] = {}
        for label in control.labels:
            lookup[label.lower()] = label
            for v in control.labels_attrs.get(label, {}).get("predicted_values", "").split(","):
                if v.strip():
                    lookup[v.strip().lower()] = label
        return {n: lookup[n.lower()] for n in names if n.lower() in lookup}

    def to_parsed(self) -> dict:
        """Upstream ``parsed_label_config`` shape (controls keyed by name)."""
        out = {}
        for name, c in self.controls.items():
            inputs = [{"type": self.objects[t].type.capitalize(), "value": self.objects[t].value}
                      for t in c.to_name if t in self.objects]
            out[name] = {"type": c.type, "to_name": c.to_name, "inputs": inputs, "labels": c.labels,
                         "labels_attrs": c.labels_attrs}
        return out


def parse_label_config(xml: object) -> LabelConfig:
    """Parse a labeling config, refusing DTDs/entities, huge or deeply nested input and configs without
    an image. One walk over the tree: a ``<Label>``/``<Choice>`` belongs to its nearest enclosing control."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is missing or not a string; send the project's XML config")
    if len(xml) > MAX_CONFIG_CHARS:
        raise LabelConfigError(f"label config is larger than {MAX_CONFIG_CHARS:,} characters")
    bad = lone_surrogate_at(xml)
    if bad is not None:
        raise LabelConfigError(f"label config is not valid Unicode (a lone surrogate at character {bad}); "
                               "send it as UTF-8")
    upper = xml.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise LabelConfigError("label config must not contain <!DOCTYPE> or <!ENTITY> declarations")
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError) as exc:
        raise LabelConfigError(f"label config is not well-formed XML ({exc}); fix it in the project "
                               "settings (Labeling Interface > Code)") from exc
    objects: dict[str, ObjectTag] = {}
    controls: dict[str, ControlTag] = {}
    count = 0
    # (element, depth, nearest enclosing control); children pushed reversed: document order
    stack: list[tuple[ET.Element, int, ControlTag | None]] = [(root, 1, None)]
    while stack:
        el, depth, owner = stack.pop()
        count += 1
        if count > MAX_TAGS:
            raise LabelConfigError(f"label config has more than {MAX_TAGS:,} tags; a labeling interface needs "
                                   "far fewer")
        if depth > MAX_DEPTH:
            raise LabelConfigError(f"label config nests tags more than {MAX_DEPTH} levels deep; flatten it")
        if isinstance(el.tag, str):
            tag = el.tag.lower()
            attrs = {k.lower(): v for k, v in el.attrib.items()}
            name = attrs.get("name")
            if tag in ("label", "choice") and owner is not None:
                value = el.attrib.get("value") or el.attrib.get("alias")
                if value:
                    owner.labels.append(value)
                    owner.labels_attrs[value] = attrs
            elif name and tag in _OBJECT_TAGS and "value" in attrs:
                value = attrs["value"]
                objects[name] = ObjectTag(name, tag, value[1:] if value.startswith("$") else "", attrs)
            elif name and tag in _CONTROL_TAGS and attrs.get("toname"):
                to_name = [t.strip() for t in attrs["toname"].split(",") if t.strip()]
                owner = controls[name] = ControlTag(name, tag, to_name, attrs, tag=el.tag)
        stack.extend((child, depth + 1, owner) for child in reversed(el))
    if not any(o.type == "image" for o in objects.values()):
        raise LabelConfigError("label config has no <Image name=... value=\"$field\"/>; this backend "
                               "labels images")
    return LabelConfig(xml, objects, controls)
