"""Checks of a Predictor call's arguments, shared by ``Predictor`` and ``RemotePredictor``: a wrong type or
length becomes the project's error, saying what to pass instead, before any work starts."""

from __future__ import annotations

import os

import numpy as np

from ..bounds import check as check_bound
from ..errors import InvalidPromptError


def check_generation(max_new_tokens: int, num_beams: int) -> tuple[int, int]:
    """The checked (max_new_tokens, num_beams) as ints (a numeric string or 5.0 is 5)."""
    return int(check_bound("max_new_tokens", max_new_tokens)), int(check_bound("num_beams", num_beams))


def image_list(images, task: str, *single_types: type) -> list:
    """``images`` as a list, one entry per image; a lone image (a path, bytes, a PIL image, an array, or one
    of ``single_types``) or something that is no list at all is refused with what to pass instead."""
    single = (str, bytes, os.PathLike, np.ndarray, *single_types)
    if isinstance(images, single) or type(images).__module__.startswith("PIL.") or images is None:
        raise InvalidPromptError(f"{task} takes a list of images, got {type(images).__name__}; wrap one image "
                                 f"in a list: {task}([image], ...)")
    try:
        return list(images)
    except TypeError:
        raise InvalidPromptError(f"{task} takes a list of images, got {type(images).__name__}") from None


def per_image(value, n: int, what: str, task: str) -> list:
    """``value`` (one entry per image) as a list of ``n``; else the project's error saying what to pass."""
    if isinstance(value, (str, bytes)) or value is None:
        raise InvalidPromptError(f"{task}: {what} must be a list with one entry per image, got "
                                 f"{type(value).__name__}")
    try:
        value = list(value)
    except TypeError:
        raise InvalidPromptError(f"{task}: {what} must be a list with one entry per image, got "
                                 f"{type(value).__name__}") from None
    if len(value) != n:
        raise InvalidPromptError(f"{task} got {n} images but {len(value)} {what}; give one per image")
    return value


def adapter_name(adapter, what: str = "adapter") -> str:
    """An adapter name or folder as text; the project's error for anything else, or an empty one."""
    if not isinstance(adapter, (str, os.PathLike)):
        raise InvalidPromptError(f"{what} must be an adapter name or folder, got {type(adapter).__name__}")
    text = os.fspath(adapter)
    if not isinstance(text, str) or not text.strip():
        raise InvalidPromptError(f"{what} is empty; give the adapter's name or folder (or none for the base "
                                 "model)")
    return text


def check_labels(i: int, labels, count: int) -> list[int]:
    if not isinstance(labels, (list, tuple)):
        raise InvalidPromptError(f"image {i}: point_labels must be a list with one label per point (1 the "
                                 f"object, 0 not the object), got {type(labels).__name__}; give one list per "
                                 "image, e.g. [[1, 0]]")
    labels = list(labels)
    if len(labels) != count:
        raise InvalidPromptError(f"image {i}: {count} points but {len(labels)} point_labels; give one label per "
                                 "point (1 the object, 0 not the object)")
    for j, label in enumerate(labels):
        if isinstance(label, bool) or label not in (0, 1):
            raise InvalidPromptError(f"image {i} point_labels[{j}]: must be 1 (the object) or 0 (not the "
                                     f"object), got {str(label)[:20]}")
    return [int(v) for v in labels]
