"""Request checks: every parameter of a run, checked before a dataset is read or a model loaded.

Numbers go through ``bounds.check``, texts through ``tokenizer.validate_text``; field names must be plain
FiftyOne field names. Each error carries ``param``: the operator parameter it is about (the FiftyOne form
marks that input invalid with the message). Also the default field names and the limits they are checked
against.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Mapping

import fiftyone.core.labels as fol
import numpy as np
from bson import ObjectId

from ...bounds import BOUNDS
from ...bounds import check as check_bound
from ...errors import InvalidParameterError, InvalidPromptError, PixelLLMError
from ...tokenizer import validate_text

DEFAULT_REFER_FIELD = "pixelllm"
DEFAULT_DENSE_FIELD = "pixelllm_regions"
DEFAULT_CAPTION_FIELD = "pixelllm_caption"
DEFAULT_TRACE_FIELD = "pixelllm_trace"
DEFAULT_MASK_FIELD = "pixelllm_masks"
DEFAULT_CAPTION_ATTRIBUTE = "caption"
DEFAULT_BATCH_SIZE = 8
ERROR_FIELD = "pixelllm_error"

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


def _check_common(batch_size: object, overwrite: object, model: object) -> tuple[int, bool, object]:
    """``batch_size``, ``overwrite`` and ``model`` of a run, checked (None: the default)."""
    batch_size = int(_number("batch_size", DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                             "batch_size"))
    return batch_size, _flag(overwrite, "overwrite"), _model_name(model)


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
